"""Crash-safe checkpoints that belong to one run, and the rules for starting or resuming a run in a folder.

A checkpoint is written into ``.checkpoint-N.tmp`` and renamed into place, so a kill at any moment leaves
either the previous set of checkpoints or the new one complete; ``latest`` never sees half a folder.

A *run* is one training trajectory: ``run.json`` in the output folder records its id and the
configuration that determines it (every flag but the operational ones, see `OPERATIONAL_FLAGS`), and each
checkpoint's ``trainer_state.json`` records the same. Pruning and ``latest`` only ever see the current
run's checkpoints; a new run refuses a folder that holds another run's results unless asked to overwrite
them; a resume refuses a checkpoint whose configuration differs from the command line's, before any model
is loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from svdiff_tools.errors import first_line

from .config import RunConfig

logger = logging.getLogger(__name__)
PATTERN = re.compile(r"^checkpoint-(\d+)$")
LOCK_FILE = ".svdiff-tools.lock"
STATE_FILE = "trainer_state.json"
RUN_FILE = "run.json"
ADAPTER_STATE = "adapter_state.safetensors"
FINAL_FILES = ("svd_adapter.safetensors", "pytorch_lora_weights.safetensors")
# Flags that may change between a run and its resumption: where things go and how often, not what is learned.
OPERATIONAL_FLAGS = frozenset({
    "output_dir", "logging_dir", "report_to", "resume_from_checkpoint", "overwrite_output_dir",
    "checkpointing_steps", "checkpoints_total_limit", "validation_prompt", "num_validation_images", "dino_model",
    "clip_model",
    "validation_steps", "push_to_hub", "hub_model_id", "hub_token", "dataloader_num_workers", "export_lora_rank",
    "sample_batch_size", "prior_generation_precision", "max_train_steps", "num_train_epochs", "embedded_model",
    "num_inference_steps", "embedded_kind", "validation_prompts", "validation_seed",
    "guidance_scale",
})


class RunConflict(ValueError):
    """The output folder or checkpoint does not fit this command line (one sentence says what to do)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, most often); the previous checkpoints are intact."""


def no_space(exc: BaseException, folder: Path) -> bool:
    """Whether ``exc`` is a full disk: ENOSPC or EDQUOT on it or its causes, or, for the errors that carry no errno
    (torch's ``basic_ios::clear: iostream error``, safetensors' write error), under 1 MiB left in ``folder``."""
    import errno

    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


@contextlib.contextmanager
def output_lock(output_dir: Path, enabled: bool = True):
    """Hold ``<output_dir>/.svdiff-tools.lock`` exclusively (``fcntl.flock``) for the block: a second run on the same
    folder is refused with `RunConflict` naming the holder's PID. The kernel drops the lock of a process that dies
    (kill -9 included), so a stale lock is simply taken over (logged). A folder the lock had to create is removed
    again if the block leaves nothing else in it (a refused run leaves no output). ``enabled=False``: a no-op (the
    other ranks of a multi-process run; rank 0 holds the lock for all)."""
    import fcntl

    if not enabled:
        yield
        return
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunConflict(f"{output_dir} is in use by another training run (PID {holder}); wait for it to finish "
                              "or choose another --output_dir.") from None
        handle.seek(0)
        previous = handle.read().strip()
        if previous and previous != str(os.getpid()):
            logger.warning("took over %s from PID %s, which no longer runs", output_dir / LOCK_FILE, previous)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock; the file stays (removing it would race with a waiting opener)
        if created and output_dir.is_dir() and {p.name for p in output_dir.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(output_dir, ignore_errors=True)


def run_config(cfg: RunConfig) -> dict:
    """The configuration that determines a run's trajectory, JSON-friendly."""
    out = {}
    for key, value in sorted(cfg.flat().items()):
        if key in OPERATIONAL_FLAGS:
            continue
        out[key] = value if isinstance(value, (int, float, str, bool, type(None))) else json.loads(
            json.dumps(value, default=str))
    return out


def config_difference(recorded: dict, current: dict, defaults: Optional[dict] = None) -> Optional[str]:
    """'--method: svdiff in the checkpoint, svfit now' for the first differing flag, or None. A flag the recorded
    run did not have (a newer release's) is no difference while it is at its default (``defaults``)."""
    for key in sorted(set(recorded) | set(current)):
        if key in OPERATIONAL_FLAGS:
            continue
        if key not in recorded and defaults is not None and key in defaults and current.get(key) == defaults[key]:
            continue
        a, b = recorded.get(key), current.get(key)
        if a != b:
            return f"--{key}: {a!r} in the checkpoint, {b!r} now"
    return None


def checkpoints(output_dir: Path, run_id: Optional[str] = None) -> List[Tuple[int, Path]]:
    """Complete checkpoints (of ``run_id`` when given), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = PATTERN.match(p.name)
        if not (m and p.is_dir() and (p / STATE_FILE).is_file()):
            continue
        if run_id is not None and _state_or_empty(p).get("run_id") != run_id:
            continue
        found.append((int(m.group(1)), p))
    return sorted(found)


def _state_or_empty(path: Path) -> dict:
    try:
        state = json.loads((path / STATE_FILE).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def incomplete_reason(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete trainer checkpoint, or None."""
    path = Path(path)
    if not path.is_dir():
        return "it does not exist"
    state = _state_or_empty(path)
    if not isinstance(state.get("global_step"), int):
        return f"it has no readable {STATE_FILE}"
    for required in (ADAPTER_STATE, "optimizer*.bin", "scheduler*.bin", "random_states_*.pkl"):
        if not list(path.glob(required)):
            return f"it lacks {required}"
    return None


def _has_results(output_dir: Path) -> bool:
    return output_dir.is_dir() and (any(p.name.startswith("checkpoint-") for p in output_dir.iterdir())
                                    or any((output_dir / f).exists() for f in FINAL_FILES + (RUN_FILE,)))


def _read_run(output_dir: Path) -> Optional[dict]:
    """run.json, or None when it is absent or not what this trainer writes (an id and a config object)."""
    try:
        run = json.loads((output_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(run, dict) and isinstance(run.get("run_id"), str) and isinstance(run.get("config"), dict)):
        return None
    return run


@dataclass
class RunPlan:
    """What this invocation does: resume ``resume_path`` (or start fresh) as run ``run_id``."""

    run_id: str
    resume_path: Optional[Path]
    fresh: bool              # a new run: run.json is (re)written and older runs' checkpoints removed
    config: dict


def plan_run(output_dir: Path, config: dict, resume: Optional[str], overwrite: bool,
             defaults: Optional[dict] = None) -> RunPlan:
    """Decide, before any model is loaded, whether this command starts a run or resumes one; raise
    `RunConflict` when the folder holds another run's results or the checkpoint another configuration
    (``defaults``: the flags' defaults, for flags newer than the recorded run, `config_difference`)."""
    output_dir = Path(output_dir)
    current = _read_run(output_dir)
    if current is None and (output_dir / RUN_FILE).exists() and not overwrite:
        raise RunConflict(f"{output_dir / RUN_FILE} (which run owns this folder) is unreadable, damaged or edited; "
                          "pass --overwrite_output_dir to start a new run there, or choose another --output_dir.")
    if resume and resume != "latest":
        path = Path(resume)
        path = path if path.is_dir() else output_dir / path
        reason = incomplete_reason(path)
        if reason:
            raise RunConflict(f"--resume_from_checkpoint {resume} is not a complete checkpoint ({reason}); pass a "
                              "checkpoint-N folder or 'latest'.")
        return _resume(path, config, defaults)
    if resume == "latest" and current is not None and \
            config_difference(current.get("config", {}), config, defaults) is None:
        own = [p for _, p in checkpoints(output_dir, current["run_id"]) if incomplete_reason(p) is None]
        if own:
            return _resume(own[-1], config, defaults)
        return RunPlan(current["run_id"], None, False, config)  # this run never reached a checkpoint
    if _has_results(output_dir) and not overwrite:
        if current is not None and resume == "latest":
            diff = config_difference(current.get("config", {}), config, defaults)
            raise RunConflict(f"{output_dir} holds a run with another configuration ({diff.replace('checkpoint', 'folder')}); "
                              "pass --overwrite_output_dir to replace it, or choose another --output_dir.")
        raise RunConflict(f"{output_dir} already holds a training run's results; pass --resume_from_checkpoint latest "
                          "to continue it, --overwrite_output_dir to replace it, or choose another --output_dir.")
    return RunPlan(uuid.uuid4().hex, None, True, config)


def _resume(path: Path, config: dict, defaults: Optional[dict] = None) -> RunPlan:
    state = read_state(path)
    recorded = state.get("config")
    if recorded is not None:
        diff = config_difference(recorded, config, defaults)
        if diff:
            raise RunConflict(f"{path} was trained with other settings ({diff}); resume with the same flags, or "
                              "start a new run in another --output_dir.")
    return RunPlan(state.get("run_id") or uuid.uuid4().hex, path, False, config)


def start(output_dir: Path, plan: RunPlan) -> None:
    """Main process, before training: record the run; a fresh run removes older runs' checkpoints and every
    temporary file a killed writer left."""
    from svdiff_tools.atomic import remove_orphans, write_text

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for tmp in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    remove_orphans(output_dir)
    if plan.fresh:
        for _, old in checkpoints(output_dir):
            if _state_or_empty(old).get("run_id") != plan.run_id:
                shutil.rmtree(old, ignore_errors=True)
        for p in output_dir.glob("checkpoint-*"):
            if p.is_dir() and not (p / STATE_FILE).is_file():
                shutil.rmtree(p, ignore_errors=True)  # a folder an older version left half written
    write_text(output_dir / RUN_FILE, json.dumps({"run_id": plan.run_id, "config": plan.config}, indent=2,
                                                 sort_keys=True))


def save(output_dir: Path, step: int, accelerator, state: dict,
         tensor_files: Optional[Dict[str, Dict]] = None, total_limit: Optional[int] = None,
         run_id: Optional[str] = None) -> Path:
    """``accelerator.save_state`` into ``.checkpoint-N.tmp`` (on every process: Accelerate's collective save),
    then on the main process the safetensors ``tensor_files`` ({file name: tensors}) and the trainer state;
    the folder is renamed into place and this run's oldest checkpoints beyond ``total_limit`` are pruned."""
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    main = accelerator.is_main_process
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every process's files (its RNG state) are in tmp before it is renamed
        if main:
            for name, tensors in (tensor_files or {}).items():
                save_file(tensors, str(tmp / name))
            (tmp / STATE_FILE).write_text(json.dumps(dict(state, global_step=step, run_id=run_id), indent=2))
    except Exception as exc:  # OSError, torch's RuntimeError, SafetensorError: the kept checkpoints are intact
        full = no_space(exc, output_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        kept = checkpoints(output_dir, run_id)
        last = f"{kept[-1][1].name}" if kept else "none (no checkpoint was written yet)"
        reason = first_line(exc, 120)
        what = "no space left on the device" if full else f"could not write ({reason})"
        raise CheckpointWriteError(f"{what} writing checkpoint-{step} in {output_dir}; the last good checkpoint is "
                                   f"{last}: free space (or fix the folder) and rerun with --resume_from_checkpoint "
                                   "latest.") from None
    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for _, old in checkpoints(output_dir, run_id)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
