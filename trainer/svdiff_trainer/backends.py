"""What differs between adapter families in the trainer, behind one small interface.

`SpectralBackend` (svdiff, svfit, svft, vectorfit: this library's adapters), `PeftLoraBackend` (lora, pissa:
real PEFT, as diffusers' DreamBooth-LoRA script runs them) and `FullBackend` (every UNet weight) each answer: check the targets on a weightless
model, inject, give the optimizer's parameter groups, capture and restore the trainable state for
checkpoints, act after an optimizer step, write the final files, and load those files into a pipeline.
`train_dreambooth.py` has no method branches; a new family is a new backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from svdiff_tools import diffusers as _pipeline_verbs  # noqa: F401  (pipe.load_svd_adapter; export_lora of a pipeline)
from .args import PEFT_METHODS, TrainingInputError, spectral_config
from .config import RunConfig

LORA_FILE = "pytorch_lora_weights.safetensors"


class Backend:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # --- before any weight is loaded --------------------------------------------------------
    def check_targets(self, unet: nn.Module, encoders: List[nn.Module]) -> None:
        raise NotImplementedError

    # --- training -----------------------------------------------------------------------------
    def inject(self, unet: nn.Module, encoders: Dict[str, nn.Module]) -> None:
        """Adapters on the UNet (and the text encoders with --train_text_encoder); only they stay trainable."""
        raise NotImplementedError

    def parameter_groups(self, unet: nn.Module, encoders: Dict[str, nn.Module]) -> List[dict]:
        raise NotImplementedError

    def state(self, unet: nn.Module, encoders: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
        """The trainable state of the run (for checkpoints), by name, float32 on the CPU."""
        raise NotImplementedError

    def restore(self, unet: nn.Module, encoders: Dict[str, nn.Module], tensors: Dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def attach(self, optimizer, unet: nn.Module) -> None:
        """Hook into the optimizer (VectorFit's Adaptive Vector Freezing)."""

    def after_step(self) -> None:
        """Once per optimizer step."""

    def checkpoint_extra(self) -> tuple:
        """(JSON-able state, {file name: tensors}) to store in a checkpoint beside the trainable state."""
        return None, {}

    def resume_extra(self, state, folder: Path) -> None:
        pass

    # --- outputs ------------------------------------------------------------------------------
    def save_final(self, output_dir: Path, base: str, pipeline_cls: str, unet: nn.Module,
                   encoders: Dict[str, nn.Module], load_pipeline) -> List[Path]:
        """Write the final adapter file(s); the first is the one a user loads."""
        raise NotImplementedError

    def load_into(self, pipe, files: List[Path]) -> None:
        raise NotImplementedError


def _adapted(unet, encoders, train_text_encoder: bool):
    yield "unet", unet
    if train_text_encoder:
        yield from encoders.items()


class SpectralBackend(Backend):
    """svdiff / svfit / svft / vectorfit through `svdiff_tools` (`inject_adapter`, `save_adapter`)."""

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.avf = None  # VectorFit's Adaptive Vector Freezing, attached to the optimizer

    def check_targets(self, unet, encoders):
        from svdiff_tools.model import plan_adapters

        plan_adapters(unet, spectral_config(self.cfg.method), "default")
        for encoder in encoders:
            plan_adapters(encoder, spectral_config(self.cfg.method, train_text_encoder=True), "default")

    def inject(self, unet, encoders):
        from svdiff_tools.model import inject_adapter

        inject_adapter(unet, spectral_config(self.cfg.method))
        if self.cfg.method.train_text_encoder:
            for encoder in encoders.values():
                inject_adapter(encoder, spectral_config(self.cfg.method, train_text_encoder=True))

    def parameter_groups(self, unet, encoders):
        from svdiff_tools.model import get_parameter_groups

        cfg = self.cfg
        groups = get_parameter_groups(unet, cfg.optim.learning_rate, lr_1d=cfg.method.learning_rate_1d,
                                      weight_decay=cfg.optim.adam_weight_decay)
        if cfg.method.train_text_encoder:
            te_lr = cfg.optim.text_encoder_lr or cfg.optim.learning_rate
            for encoder in encoders.values():
                groups += [dict(g, lr=te_lr) for g in get_parameter_groups(encoder, te_lr,
                                                                           weight_decay=cfg.optim.adam_weight_decay)]
        return groups

    def state(self, unet, encoders):
        from svdiff_tools.model import adapter_parameters, get_adapter_names

        out = {}
        for prefix, model in (("unet", unet), *encoders.items()):
            if get_adapter_names(model):
                out.update({f"{prefix}.{k}": v for k, v in adapter_parameters(model, "default").items()})
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def restore(self, unet, encoders, tensors):
        from svdiff_tools.model import adapter_parameters

        for prefix, model in (("unet", unet), *encoders.items()):
            part = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            if part:
                params = adapter_parameters(model, "default")
                with torch.no_grad():
                    for name, value in part.items():
                        params[name].copy_(value)

    def attach(self, optimizer, unet):
        from svdiff_tools.avf import AdaptiveVectorFreezing
        from svdiff_tools.methods import REGISTRY

        if REGISTRY[self.cfg.method.method].supports_avf and self.cfg.method.options["avf_k"] > 0:
            self.avf = AdaptiveVectorFreezing.from_model(unet)
            self.avf.attach(optimizer)

    def after_step(self):
        if self.avf is not None:
            self.avf.step()

    def checkpoint_extra(self):
        if self.avf is None:
            return None, {}
        state = self.avf.state_dict()
        return {"avf": {k: state[k] for k in ("steps", "frozen")}}, {"avf_initial.safetensors": state["initial"]}

    def resume_extra(self, state, folder):
        from safetensors.torch import load_file

        if self.avf is not None and state.get("avf"):
            self.avf.load_state_dict(dict(state["avf"], initial=load_file(str(folder / "avf_initial.safetensors"))))

    def save_final(self, output_dir, base, pipeline_cls, unet, encoders, load_pipeline):
        from svdiff_tools.export import export_lora
        from svdiff_tools.io import component_state, write_adapter_file

        cfg = self.cfg
        parts = {name: component_state(model, "default") for name, model in
                 _adapted(unet, encoders, cfg.method.train_text_encoder)}
        extra = {"pipeline_class": pipeline_cls, "base_model": base, "trainer": "train_dreambooth.py"}
        written = [write_adapter_file(output_dir, parts, "default", extra)]
        if cfg.method.export_lora_rank is not None:
            report = export_lora(written[0], output_dir / LORA_FILE, base=load_pipeline(),
                                 rank=cfg.method.export_lora_rank or None)
            import logging

            logging.getLogger("train_dreambooth").info("exported LoRA (rank %s): %s",
                                                       cfg.method.export_lora_rank or "exact", report.summary)
            written.append(output_dir / LORA_FILE)
        return written

    def load_into(self, pipe, files):
        pipe.load_svd_adapter(files[0])


class PeftLoraBackend(Backend):
    """PEFT LoRA (Gaussian init) or PiSSA (principal singular components), as diffusers' DreamBooth-LoRA script
    adds them (``unet.add_adapter``); saved with ``save_lora_weights``."""

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.pissa_init = None  # PiSSA's initial factors, for the export on the original weights

    def _config(self, model, targets):
        from peft import LoraConfig

        from svdiff_tools.targets import resolve_targets

        names = [n for n, _ in resolve_targets(model, targets)]
        return LoraConfig(r=self.cfg.method.rank, lora_alpha=self.cfg.method.rank, target_modules=names,
                          init_lora_weights="pissa" if self.cfg.method.method == "pissa" else "gaussian")

    def check_targets(self, unet, encoders):
        from svdiff_tools.targets import resolve_targets

        resolve_targets(unet, self.cfg.method.target_modules)
        for encoder in encoders:
            resolve_targets(encoder, "text-encoder")

    def inject(self, unet, encoders):
        from peft.utils import get_peft_model_state_dict

        unet.add_adapter(self._config(unet, self.cfg.method.target_modules))
        if self.cfg.method.train_text_encoder:
            from peft import inject_adapter_in_model

            # PEFT itself rather than transformers' `add_adapter`, which demands a newer PEFT than PyPI has (5.x
            # asks for >= 0.22); the result is the same: LoRA layers named `default`, only they trainable
            for encoder in encoders.values():
                inject_adapter_in_model(self._config(encoder, "text-encoder"), encoder, adapter_name="default")
        for model in (unet, *encoders.values()):
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if self.cfg.method.method == "pissa":
            self.pissa_init = {f"{name}_lora_layers": {k: v.detach().clone() for k, v in
                                                       get_peft_model_state_dict(model).items()}
                               for name, model in _adapted(unet, encoders, self.cfg.method.train_text_encoder)}

    def parameter_groups(self, unet, encoders):
        groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": self.cfg.optim.learning_rate}]
        if self.cfg.method.train_text_encoder:
            te_lr = self.cfg.optim.text_encoder_lr or self.cfg.optim.learning_rate
            groups += [{"params": [p for p in e.parameters() if p.requires_grad], "lr": te_lr}
                       for e in encoders.values()]
        return groups

    def state(self, unet, encoders):
        from peft.utils import get_peft_model_state_dict

        out = {}
        for prefix, model in _adapted(unet, encoders, self.cfg.method.train_text_encoder):
            out.update({f"{prefix}.{k}": v for k, v in get_peft_model_state_dict(model).items()})
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def restore(self, unet, encoders, tensors):
        from peft.utils import set_peft_model_state_dict

        for prefix, model in (("unet", unet), *encoders.items()):
            part = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            if part:
                set_peft_model_state_dict(model, part)

    def lora_layers(self, unet, encoders) -> Dict[str, Dict[str, torch.Tensor]]:
        """``{"unet_lora_layers": ..., "text_encoder_lora_layers": ...}`` as ``save_lora_weights`` takes them.
        PiSSA trained on ``W_res = W - B0 A0``; ``W_res + B A = W + (B A - B0 A0)``, a rank-2r LoRA on the
        original weights: ``[B, -B0] [A; A0]``."""
        from peft.utils import get_peft_model_state_dict

        layers = {f"{name}_lora_layers": get_peft_model_state_dict(model)
                  for name, model in _adapted(unet, encoders, self.cfg.method.train_text_encoder)}
        if self.pissa_init is not None:
            for key, sd in layers.items():
                for k in [k for k in sd if ".lora_A." in k]:
                    kb = k.replace(".lora_A.", ".lora_B.")
                    A0, B0 = self.pissa_init[key][k], self.pissa_init[key][kb]
                    sd[k] = torch.cat([sd[k], A0.to(sd[k].dtype)], 0)
                    sd[kb] = torch.cat([sd[kb], -B0.to(sd[kb].dtype)], 1)
        return layers

    def save_final(self, output_dir, base, pipeline_cls, unet, encoders, load_pipeline):
        import diffusers

        getattr(diffusers, pipeline_cls).save_lora_weights(output_dir, safe_serialization=True,
                                                           **self.lora_layers(unet, encoders))
        return [output_dir / LORA_FILE]

    def load_into(self, pipe, files):
        pipe.load_lora_weights(str(files[0].parent), weight_name=files[0].name)


class FullBackend(Backend):
    """Full fine-tuning of the UNet (and the text encoders with --train_text_encoder), DreamBooth's original
    recipe and the quality benchmark's upper anchor: every weight trains in float32; the final files are
    diffusers model folders (``unet/``, ``text_encoder/``) that replace the base's components."""

    def check_targets(self, unet, encoders):
        pass

    def inject(self, unet, encoders):
        for _, model in _adapted(unet, encoders, self.cfg.method.train_text_encoder):
            model.to(torch.float32)  # master weights in float32, as diffusers' script keeps them
            model.requires_grad_(True)

    def parameter_groups(self, unet, encoders):
        groups = [{"params": list(unet.parameters()), "lr": self.cfg.optim.learning_rate}]
        if self.cfg.method.train_text_encoder:
            te_lr = self.cfg.optim.text_encoder_lr or self.cfg.optim.learning_rate
            groups += [{"params": list(e.parameters()), "lr": te_lr} for e in encoders.values()]
        return groups

    def state(self, unet, encoders):
        return {f"{prefix}.{k}": v.detach().float().cpu().contiguous()
                for prefix, model in _adapted(unet, encoders, self.cfg.method.train_text_encoder)
                for k, v in model.state_dict().items()}

    def restore(self, unet, encoders, tensors):
        for prefix, model in _adapted(unet, encoders, self.cfg.method.train_text_encoder):
            part = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            model.load_state_dict(part)

    def save_final(self, output_dir, base, pipeline_cls, unet, encoders, load_pipeline):
        written = []
        for name, model in _adapted(unet, encoders, self.cfg.method.train_text_encoder):
            model.save_pretrained(output_dir / name, safe_serialization=True)
            written.append(output_dir / name)
        return written

    def load_into(self, pipe, files):
        for folder in files:
            current = getattr(pipe, folder.name)
            setattr(pipe, folder.name, type(current).from_pretrained(folder, torch_dtype=current.dtype))


def make_backend(cfg: RunConfig) -> Backend:
    if cfg.method.method == "full":
        return FullBackend(cfg)
    return PeftLoraBackend(cfg) if cfg.method.method in PEFT_METHODS else SpectralBackend(cfg)


def check_targets(backend: Backend, unet: nn.Module, encoders: List[nn.Module]) -> None:
    """`Backend.check_targets` with the library's errors turned into the trainer's one-sentence input errors."""
    from svdiff_tools.errors import SVDAdapterError

    try:
        backend.check_targets(unet, encoders)
    except SVDAdapterError as exc:
        raise TrainingInputError(str(exc)) from None

