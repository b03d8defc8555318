"""On-disk cache of decompositions, keyed by a hash of the exact weight bytes.

Location: ``$SVDIFF_TOOLS_CACHE`` if set (``0``, ``off``, ``false`` or ``none`` disables the cache),
else ``$XDG_CACHE_HOME/svdiff-tools/svd`` (``~/.cache/svdiff-tools/svd``). Entries are safetensors files
written atomically and read into memory whole (never memory-mapped: a file edited or truncated later
cannot reach a live model). An unreadable entry is ignored and recomputed; `decomposition.decompose`
also checks every hit against the weight before trusting it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from .atomic import remove_orphans, save_safetensors
from .errors import first_line

logger = logging.getLogger(__name__)

ENV_VAR = "SVDIFF_TOOLS_CACHE"
_DISABLED = {"0", "off", "false", "none", "no"}
_warned_unwritable: set = set()
ORPHAN_AGE_S = 3600.0  # temporary files this old are a killed writer's, not a concurrent one's


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


def entry_path(key: str) -> Optional[Path]:
    folder = cache_dir()
    return None if folder is None else folder / f"{key}.safetensors"


def load(key: str) -> Optional[Dict[str, torch.Tensor]]:
    """The entry's tensors, copied into memory, or None (absent, disabled or unreadable)."""
    from safetensors.torch import load as load_bytes

    path = entry_path(key)
    if path is None or not path.is_file():
        return None
    try:
        return load_bytes(path.read_bytes())
    except Exception as exc:  # a corrupt entry is never fatal: recompute it
        logger.warning("ignoring unreadable SVD cache entry %s (%s)", path, first_line(exc, 120))
        return None


def store(key: str, tensors: Dict[str, torch.Tensor]) -> None:
    path = entry_path(key)
    if path is None:
        return
    try:
        save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
        remove_orphans(path.parent, ORPHAN_AGE_S)
    except Exception as exc:  # a read-only or full disk (OSError, or safetensors' own error) only costs speed
        reason = first_line(exc)
        if str(path.parent) not in _warned_unwritable:
            _warned_unwritable.add(str(path.parent))
            logger.warning("could not write SVD cache entries in %s (%s); decompositions will not be reused. "
                           "Set %s to a writable folder, or to off to silence this.", path.parent, reason, ENV_VAR)
