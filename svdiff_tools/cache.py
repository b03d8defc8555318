"""On-disk cache of decompositions, keyed by a hash of the exact weight bytes.

Location: ``$SVDIFF_TOOLS_CACHE`` if set (``0``, ``off``, ``false`` or ``none`` disables the cache),
else ``$XDG_CACHE_HOME/svdiff-tools/svd`` (``~/.cache/svdiff-tools/svd``). Entries are safetensors files
written atomically; an unreadable entry is ignored and recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

ENV_VAR = "SVDIFF_TOOLS_CACHE"
_DISABLED = {"0", "off", "false", "none", "no"}


def cache_dir() -> Optional[Path]:
    """The cache folder, or None when the cache is disabled."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        if value.strip().lower() in _DISABLED or not value.strip():
            return None
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "svdiff-tools" / "svd"


def weight_digest(tensor: torch.Tensor) -> str:
    """blake2b of the tensor's raw bytes, dtype and shape (exact: a different dtype is another key)."""
    data = tensor.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{tuple(data.shape)}|{data.dtype}|".encode())
    if data.numel():
        h.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def load(key: str) -> Optional[Dict[str, torch.Tensor]]:
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as exc:  # a corrupt entry is never fatal: recompute it
        logger.warning("ignoring unreadable SVD cache entry %s (%s)", path, exc)
        return None


def store(key: str, tensors: Dict[str, torch.Tensor]) -> None:
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
            os.replace(tmp, folder / f"{key}.safetensors")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as exc:  # a read-only or full disk only costs speed
        logger.warning("could not write SVD cache entry in %s (%s); set %s=off to silence", folder, exc, ENV_VAR)
