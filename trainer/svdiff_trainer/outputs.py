"""Any trained output into a diffusers pipeline, whatever made it: the one loader the evaluator uses.

| what the path is | how it loads |
| --- | --- |
| an svd adapter file (``format = svdiff-tools.adapter`` in its metadata) | ``pipe.load_svd_adapter`` |
| a LoRA file in diffusers', kohya's or PEFT-state-dict keys | ``pipe.load_lora_weights`` |
| a trainer output folder | its ``svd_adapter.safetensors``, else ``pytorch_lora_weights.safetensors``, else its ``unet/`` (full fine-tuning) |
| a PEFT folder (``adapter_config.json``: ``save_pretrained`` of a PeftModel on the UNet, LoRA or an SVD method) | ``PeftModel.from_pretrained`` on the UNet, merged |

Anything else is refused with `OutputNotLoadable` naming what was found and what is accepted.
"""

from __future__ import annotations

from pathlib import Path

SVD_FILE = "svd_adapter.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_CONFIG = "adapter_config.json"
ACCEPTED = (f"an adapter or LoRA .safetensors file, a trainer output folder ({SVD_FILE}, {LORA_FILE} or unet/), or a "
            f"PEFT folder ({PEFT_CONFIG})")


class OutputNotLoadable(ValueError):
    """The path is no output this loader reads; the message says what was found and what is accepted."""


def output_kind(path) -> str:
    """'svd adapter file', 'lora file', 'peft folder' or 'full fine-tuning folder' (a trainer output folder is the
    kind of the file it holds)."""
    path = Path(path)
    if path.is_dir():
        for name in (SVD_FILE, LORA_FILE):
            if (path / name).is_file():
                return output_kind(path / name)
        if (path / PEFT_CONFIG).is_file():
            return "peft folder"
        if (path / "unet" / "config.json").is_file():
            return "full fine-tuning folder"
        raise OutputNotLoadable(f"{path} holds no trained output; expected {ACCEPTED}.")
    if not path.is_file():
        raise OutputNotLoadable(f"{path} does not exist; pass {ACCEPTED}.")
    if path.suffix != ".safetensors":
        raise OutputNotLoadable(f"{path} is not a .safetensors file; pass {ACCEPTED}.")
    from svdiff_tools.io import FORMAT, read_adapter_file

    try:
        _, metadata = read_adapter_file(path)
    except Exception as exc:  # noqa: BLE001 (its own one-sentence error)
        raise OutputNotLoadable(str(exc)) from None
    return "svd adapter file" if metadata.get("format") == FORMAT else "lora file"


def load_output(pipe, path) -> str:
    """Load ``path`` into ``pipe`` (see the module table); returns its kind. The pipeline is left unchanged when
    loading fails (the loaders' own guarantee; a PEFT folder is loaded onto a copy first)."""
    import svdiff_tools.diffusers  # noqa: F401  (pipe.load_svd_adapter)

    path = Path(path)
    kind = output_kind(path)
    if path.is_dir() and kind in ("svd adapter file", "lora file"):
        path = path / (SVD_FILE if kind == "svd adapter file" else LORA_FILE)
    try:
        if kind == "svd adapter file":
            pipe.load_svd_adapter(str(path))
        elif kind == "lora file":
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        elif kind == "peft folder":
            _load_peft_folder(pipe, path)
        else:
            from diffusers import UNet2DConditionModel

            pipe.unet = UNet2DConditionModel.from_pretrained(path / "unet").to(pipe.unet.device, pipe.unet.dtype)
    except OutputNotLoadable:
        raise
    except Exception as exc:  # noqa: BLE001 (a file for another base, a foreign key layout: one sentence)
        raise OutputNotLoadable(f"{path} ({kind}) does not load into this {type(pipe).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return kind


def _load_peft_folder(pipe, folder: Path) -> None:
    """A PEFT ``save_pretrained`` folder of the UNet (LoRA, or an SVD method through its PEFT registration), merged
    into a copy of the pipeline's UNet that replaces it only once whole."""
    import copy
    import json

    import svdiff_tools.peft  # noqa: F401  (the SVD methods' PEFT configs)
    from peft import PeftModel

    config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path") or ""
    if "text_encoder" in base:
        raise OutputNotLoadable(f"{folder} adapts a text encoder ({base}); pass the UNet's PEFT folder.")
    unet = PeftModel.from_pretrained(copy.deepcopy(pipe.unet), str(folder)).merge_and_unload()
    pipe.unet = unet
