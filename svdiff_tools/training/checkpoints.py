"""Crash-safe checkpoints: ``checkpoint-N/`` folders that appear only when complete.

A checkpoint is written into ``.checkpoint-N.tmp`` and renamed into place, so a kill at any moment leaves
either the previous set of checkpoints or the new one complete; ``latest`` never sees half a folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Tuple

PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoints(output_dir: Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := PATTERN.match(p.name))
             and (p / STATE_FILE).is_file()]
    return sorted(found)


def resolve_resume(output_dir: Path, spec: Optional[str]) -> Optional[Path]:
    if not spec:
        return None
    if spec == "latest":
        found = checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(spec)
    return path if path.is_dir() else output_dir / path


def save(output_dir: Path, step: int, save_state: Callable[[Path], None], write_files: Callable[[Path], None],
         state: dict, is_main: bool, wait: Callable[[], None], total_limit: Optional[int] = None) -> Path:
    """``save_state(tmp)`` runs on every process (Accelerate's collective save); the main process adds its
    files and the trainer state, then renames the folder into place and prunes the oldest."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    wait()
    save_state(tmp)
    if is_main:
        write_files(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(dict(state, global_step=step), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for _, old in checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    wait()
    return final


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())
