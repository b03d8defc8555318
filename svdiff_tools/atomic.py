"""Files that appear only when complete: written under a temporary name beside the target, then renamed.

The temporary file is ``.<name>.<random>.tmp`` in the target's folder (so the rename never crosses file
systems); it is removed on any failure, and a kill leaves at most such an orphan, which
`remove_orphans` cleans. The final file gets the mode the process's umask gives new files (``mkstemp``
alone would leave 0600, unreadable to a serving process running as another user).

Safetensors files are written with a canonical header (keys sorted, compact JSON, space padding to 8 bytes):
safetensors itself writes ``__metadata__`` in a per-process hash order, so the same tensors and metadata gave
different bytes in another process, and users hash and diff adapter files.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
from safetensors.torch import save_file

SUFFIX = ".tmp"


def default_mode() -> int:
    """What ``open(..., "w")`` would give a new file: 0666 minus the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to ``path`` (umask mode), else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def canonical_header(header: bytes) -> bytes:
    """A safetensors JSON header rewritten canonically: sorted keys, no spaces, padded with spaces to 8 bytes.

    Offsets in the header are relative to the data section, so the payload after it is unchanged."""
    text = json.dumps(json.loads(header), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * (-len(text) % 8)


def canonicalize_safetensors(path: os.PathLike) -> None:
    """Rewrite the header of the safetensors file at ``path`` canonically, in place (same length: overwritten;
    otherwise the file is rewritten)."""
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = fh.read(n)
        new = canonical_header(header)
        if len(new) == n:
            fh.seek(8)
            fh.write(new)
            return
        payload = fh.read()
        fh.seek(0)
        fh.write(struct.pack("<Q", len(new)) + new + payload)
        fh.truncate()


def save_safetensors(tensors: Dict[str, torch.Tensor], path: os.PathLike,
                     metadata: Optional[Dict[str, str]] = None) -> Path:
    """``safetensors.torch.save_file`` with a canonical header (identical content gives identical bytes), appearing
    only when complete."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        canonicalize_safetensors(tmp)
    return Path(path)


def write_text(path: os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text)`` (UTF-8), appearing only when complete."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_image(image, path: os.PathLike) -> Path:
    """``image.save(path)`` for a PIL image, appearing only when complete (the format from ``path``'s suffix)."""
    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image suffix {path.suffix!r}; use .png, .jpg or .webp")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)
    return path


def remove_orphans(folder: os.PathLike, older_than_s: float = 0.0) -> int:
    """Delete temporary files `atomic_path` left behind in ``folder`` (a killed writer's), those at least
    ``older_than_s`` old; returns how many."""
    folder, removed = Path(folder), 0
    if not folder.is_dir():
        return 0
    now = time.time()
    for p in folder.glob(f".*{SUFFIX}"):
        try:
            if p.is_file() and now - p.stat().st_mtime >= older_than_s:
                p.unlink()
                removed += 1
        except OSError:
            pass
    return removed
