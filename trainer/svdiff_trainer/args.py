"""Command-line flags of `train_dreambooth.py`: diffusers' DreamBooth-LoRA flag set plus the methods' own.

`validate` checks everything that needs no model (paths, images, numbers, flag combinations) so that bad
input fails before any weight is loaded, with one sentence and no output written.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from svdiff_tools.config import BASIS_STORAGE
from svdiff_tools.export import rank_argument
from svdiff_tools.methods import METHODS, REGISTRY, add_option_flags, option_values
from svdiff_tools.targets import PRESETS

from . import presets
from .presets import EXAMPLE_DATA

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
PEFT_METHODS = {"lora": "diffusers' train_dreambooth_lora.py default", "pissa": "as LoRA"}  # the PEFT backend's
PEFT_LR = 1e-4
FULL_LR = 5e-6  # diffusers' train_dreambooth.py (full fine-tuning) default
ALL_METHODS = METHODS + tuple(PEFT_METHODS) + ("full",)  # the built-in ones (`all_methods`: also later ones)


def all_methods() -> tuple:
    """Every method the trainer runs: the registered spectral ones (a method registered later included), PEFT's
    LoRA / PiSSA, and full fine-tuning."""
    return tuple(REGISTRY) + tuple(PEFT_METHODS) + ("full",)


def _lr_help() -> str:
    parts = [f"{n} {c.default_lr:g} ({c.lr_source})" for n, c in REGISTRY.items()]
    parts += [f"{n} {PEFT_LR:g} ({source})" for n, source in PEFT_METHODS.items()]
    parts.append(f"full {FULL_LR:g} (diffusers' train_dreambooth.py)")
    return "default per method: " + "; ".join(parts)


class TrainingInputError(ValueError):
    """Bad flags or data, found before any model is loaded."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DreamBooth with spectral adapters (SVDiff, SVFit, SVFT, VectorFit) or, for comparison, "
                    "PEFT LoRA / PiSSA. With no model or data flags it trains the embedded tiny Stable Diffusion "
                    "on the shipped example subject, offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("method")
    m.add_argument("--method", choices=all_methods(), default="svfit",
                   help="adapter method; 'full' fine-tunes every UNet weight (DreamBooth's original recipe)")
    m.add_argument("--rank", type=float, default=None,
                   help="svfit: top-r (int) or energy fraction in (0, 1); svft: top-r truncation; lora/pissa: rank "
                        "(default 4). svdiff and vectorfit train every singular value.")
    m.add_argument("--target_modules", default=None,
                   help=f"comma-separated module names, a regex, or a preset ({', '.join(PRESETS)}); default: "
                        "'unet' for spectral methods, 'unet-attention' for lora/pissa")
    add_option_flags(m)  # each method's own options (--svft_pattern, --avf_k, ...), as the method declares them
    m.add_argument("--train_norms", action="store_true", help="SVDiff recipe: also train norm (1-D) weight deltas")
    m.add_argument("--basis_storage", choices=BASIS_STORAGE, default="auto",
                   help="full-spectrum methods: one_sided stores the least memory (derives the larger singular "
                        "factor from W, more flops on square weights), both the most; auto is one-sided where "
                        "the weight has >= 2**18 elements and is not a convolution wider than 1x1 with out > in")
    m.add_argument("--learning_rate_1d", type=float, default=1e-6,
                   help="learning rate of 1-D (norm) deltas; SVDiff paper: 1e-6")
    m.add_argument("--export_lora_rank", type=rank_argument, default=None,
                   help="also write pytorch_lora_weights.safetensors: 0 = exact, an int = at most that rank per layer, "
                        "a fraction in (0, 1] = per layer the fewest components holding that share of the delta's "
                        "energy (e.g. 0.99)")

    d = p.add_argument_group("model and data")
    d.add_argument("--pretrained_model_name_or_path", default=None,
                   help="hub id or local folder; default: the embedded tiny Stable Diffusion (offline)")
    d.add_argument("--revision", default=None)
    d.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    d.add_argument("--pretrained_vae_model_name_or_path", default=None)
    d.add_argument("--instance_data_dir", default=None, help="subject images; default: the shipped example toy")
    d.add_argument("--instance_prompt", default=None, help="default: 'a photo of sks toy' for the example data")
    d.add_argument("--subject", action="append", default=None, metavar="DIR:IDENTIFIER:CLASS",
                   help="several subjects in one run (repeatable), each prompted 'a photo of IDENTIFIER CLASS'; "
                        "replaces --instance_data_dir/--instance_prompt; with prior preservation each class gets "
                        "'a photo of a CLASS' images in --class_data_dir/CLASS")
    d.add_argument("--cutmix_unmix", action="store_true",
                   help="SVDiff's Cut-Mix-Unmix (needs two or more --subject): cut-and-mixed pairs prompted "
                        "'... IDENTIFIER1 CLASS1 on the left and IDENTIFIER2 CLASS2 on the right' plus the unmix "
                        "regularisation of the identifiers' cross-attention; views on a flat backdrop are cut out "
                        "and placed on one backdrop, others are put side by side")
    d.add_argument("--cutmix_probability", type=float, default=0.5, help="share of instance items that are mixed")
    d.add_argument("--unmix_weight", type=float, default=0.1,
                   help="weight of the unmix term (the squared share of an identifier's attention on the wrong "
                        "half, in [0, 1])")
    d.add_argument("--caption_extension", default=".txt",
                   help="an instance image's own prompt is read from a file of its name with this extension "
                        "(photo.png -> photo.txt, as kohya); images without one use --instance_prompt. '' = off")
    d.add_argument("--caption_probability", type=float, default=None,
                   help="share of a captioned image's steps trained on its caption, the rest on --instance_prompt "
                        "(default 1; on the toy world each method's, mostly 0.5: the identifier must also work "
                        "without the caption's words)")
    d.add_argument("--class_data_dir", default=None)
    d.add_argument("--class_prompt", default=None)
    d.add_argument("--with_prior_preservation", action="store_true")
    d.add_argument("--prior_loss_weight", type=float, default=None, help="default 1 (the toy world: per method)")
    d.add_argument("--num_class_images", type=int, default=None, help="default: 100 (32 for the embedded model)")
    d.add_argument("--sample_batch_size", type=int, default=4)
    d.add_argument("--prior_generation_precision", choices=["no", "fp32", "fp16", "bf16"], default=None)
    d.add_argument("--resolution", type=int, default=None, help="default: 512, or 32 for the embedded model")
    d.add_argument("--center_crop", action="store_true")
    d.add_argument("--random_flip", action="store_true")
    d.add_argument("--dataloader_num_workers", type=int, default=0)

    t = p.add_argument_group("training")
    t.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="adapt the text encoder(s) too (default: off, on for the toy world)")
    t.add_argument("--text_encoder_lr", type=float, default=None,
                   help="default: --learning_rate (the toy world: per method, unless --learning_rate is given)")
    t.add_argument("--train_batch_size", type=int, default=1)
    t.add_argument("--max_train_steps", type=int, default=None, help="default: 400, or 12 for the embedded model")
    t.add_argument("--num_train_epochs", type=int, default=1, help="used when --max_train_steps is not set")
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--gradient_checkpointing", action="store_true")
    t.add_argument("--learning_rate", type=float, default=None, help=_lr_help())
    t.add_argument("--scale_lr", action="store_true")
    t.add_argument("--lr_scheduler", default=None,
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
                   help="default: constant (on the toy world svfit decays on a cosine: METHOD_DEFAULTS in "
                        "svdiff_toyworld/preset.py)")
    t.add_argument("--lr_warmup_steps", type=int, default=0)
    t.add_argument("--lr_num_cycles", type=int, default=1)
    t.add_argument("--use_8bit_adam", action="store_true", help="needs bitsandbytes (pip install svdiff-tools[bnb])")
    t.add_argument("--adam_beta1", type=float, default=0.9)
    t.add_argument("--adam_beta2", type=float, default=0.999)
    t.add_argument("--adam_weight_decay", type=float, default=0.0, help="acts on the deltas: pulls toward the base")
    t.add_argument("--adam_epsilon", type=float, default=1e-8)
    t.add_argument("--max_grad_norm", type=float, default=1.0)
    t.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting (5.0 is common)")
    t.add_argument("--noise_offset", type=float, default=0.0)
    t.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: Accelerate's config; frozen weights use it, trainable tensors stay float32")
    t.add_argument("--allow_tf32", action="store_true")
    t.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    t.add_argument("--cache_latents", action="store_true", help="encode every image with the VAE once")
    t.add_argument("--seed", type=int, default=None)

    o = p.add_argument_group("output, checkpoints, validation")
    o.add_argument("--output_dir", default="svd-dreambooth-model")
    o.add_argument("--overwrite_output_dir", action="store_true",
                   help="start a new run in an --output_dir that holds another run's results (its checkpoints are "
                        "removed, its final files overwritten)")
    o.add_argument("--checkpointing_steps", type=int, default=500)
    o.add_argument("--checkpoints_total_limit", type=int, default=None)
    o.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    o.add_argument("--validation_prompt", default=None, help="default: the instance prompt")
    o.add_argument("--validation_prompts", nargs="+", default=None,
                   help="several validation prompts (the same seeds for each); overrides --validation_prompt")
    o.add_argument("--num_validation_images", type=int, default=None,
                   help="per validation prompt; default: 2 (8 for the embedded model)")
    o.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance of validation and class images (default: 7.5, the toy world's 5)")
    o.add_argument("--validation_seed", type=int, default=None,
                   help="validation image i uses seed validation_seed + i (default: --seed)")
    o.add_argument("--num_inference_steps", type=int, default=None,
                   help="denoising steps for validation and class images (default: 25, or 4 for the embedded model)")
    o.add_argument("--validation_steps", type=int, default=None, help="validate every N steps (default: only at the end)")
    o.add_argument("--report_to", default="none", help="tensorboard, wandb, all or none")
    o.add_argument("--logging_dir", default="logs")
    o.add_argument("--push_to_hub", action="store_true")
    o.add_argument("--hub_model_id", default=None)
    o.add_argument("--hub_token", default=None)
    return p


def flag_defaults() -> dict:
    """Every flag's default as the parser declares it (before `fill_defaults`)."""
    return vars(build_parser().parse_args([]))


def list_images(folder: Path) -> List[Path]:
    """The image files of ``folder`` by name; hidden files (``.DS_Store``, macOS's ``._photo.jpg``, this tool's
    records) are not images."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    fill_defaults(args)
    validate(args)
    return args


def fill_defaults(args: argparse.Namespace) -> None:
    embedded = args.pretrained_model_name_or_path is None
    args.embedded_model = embedded
    args.embedded_kind = None
    args.validation_prompts = args.validation_prompts or None
    args.subjects = [parse_subject(spec) for spec in args.subject or []]
    if args.subjects:
        first = args.subjects[0]
        args.instance_data_dir, args.instance_prompt = str(first.folder), first.prompt
    if embedded:
        _preset_defaults(args)
    _fill(args, train_text_encoder=False, caption_probability=1.0, prior_loss_weight=1.0, lr_scheduler="constant",
          resolution=64 if embedded else 512, num_class_images=100, num_validation_images=2, num_inference_steps=25,
          guidance_scale=7.5)
    if args.instance_data_dir is None:
        args.instance_data_dir = str(EXAMPLE_DATA)
        args.instance_prompt = args.instance_prompt or "a photo of sks toy"
    if args.target_modules is None:
        args.target_modules = "unet-attention" if args.method in PEFT_METHODS else "unet"
    elif "," in args.target_modules:
        args.target_modules = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if args.rank is not None and float(args.rank).is_integer() and args.rank >= 1:
        args.rank = int(args.rank)
    if args.method in PEFT_METHODS and args.rank is None:
        args.rank = 4
    if args.learning_rate is None:
        args.learning_rate = PEFT_LR if args.method in PEFT_METHODS else FULL_LR if args.method == "full" else \
            _spectral_lr(args)
    if args.validation_prompt is None:
        args.validation_prompt = args.instance_prompt
    if args.validation_prompts is None:
        args.validation_prompts = [args.validation_prompt]
        if len(args.subjects) > 1:  # every subject, and the first two together
            args.validation_prompts = [sub.prompt for sub in args.subjects] + [
                mixed_prompt(args.subjects[0], args.subjects[1])]
    else:
        args.validation_prompt = args.validation_prompts[0]


@dataclass
class SubjectSpec:
    """``--subject DIR:IDENTIFIER:CLASS``."""

    folder: Path
    identifier: str
    class_word: str

    @property
    def prompt(self) -> str:
        return f"a photo of {self.identifier} {self.class_word}"


def mixed_prompt(left, right) -> str:
    """The prompt of a Cut-Mix image: ``left`` and ``right`` are subjects (an identifier and a class word each)."""
    return f"a photo of {left.identifier} {left.class_word} on the left and {right.identifier} {right.class_word} " \
           "on the right"


def parse_subject(spec: str) -> SubjectSpec:
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise TrainingInputError(f"--subject {spec!r} must be DIR:IDENTIFIER:CLASS, e.g. ./dog:sks:dog.")
    return SubjectSpec(Path(parts[0]), parts[1].strip(), parts[2].strip())


def _fill(args: argparse.Namespace, **defaults) -> None:
    """Set each flag the user left unset (None) to its default."""
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _preset_defaults(args: argparse.Namespace) -> None:
    """The embedded base's flag defaults (flags the user gave win; a learning rate the user gives covers the text
    encoder too); with no data flags also its shipped subject: folder, prompts, prior preservation, class images
    and validation prompts (`presets.Preset`)."""
    try:
        preset = presets.choose()
    except ValueError as exc:
        raise TrainingInputError(str(exc)) from None
    args.embedded_kind = preset.name
    defaults = preset.defaults(args.method)
    if args.learning_rate is not None:
        defaults.pop("text_encoder_lr", None)
    # `is None`, not `or`: a 0 the user gives is theirs (guidance 0 is unconditional sampling; a count of 0 is
    # refused by `validate`), never silently replaced by the preset's default
    _fill(args, **defaults)
    if args.instance_data_dir is not None:
        return
    subject = preset.subject(args.num_inference_steps, args.guidance_scale, args.resolution)
    args.with_prior_preservation = args.with_prior_preservation or subject.pop("with_prior_preservation", False)
    if args.validation_prompt is not None or args.validation_prompts is not None:
        subject.pop("validation_prompts", None)
    args.instance_data_dir = subject.pop("instance_data_dir")
    _fill(args, **subject)


def validate(args: argparse.Namespace) -> None:
    """Raise `TrainingInputError` on the first problem found."""
    def fail(msg: str) -> None:
        raise TrainingInputError(msg)

    for sub in args.subjects:
        if not sub.folder.is_dir() or not list_images(sub.folder):
            fail(f"--subject folder {sub.folder} does not exist or holds no images; point it at subject photos.")
    if not 0.0 <= args.caption_probability <= 1.0:
        fail(f"--caption_probability {args.caption_probability} must lie in [0, 1].")
    if args.cutmix_unmix:
        if len(args.subjects) < 2:
            fail("--cutmix_unmix needs at least two --subject DIR:IDENTIFIER:CLASS.")
        if args.cache_latents:
            fail("--cutmix_unmix mixes images in pixel space each step; drop --cache_latents.")
        if not 0.0 < args.cutmix_probability <= 1.0:
            fail("--cutmix_probability must lie in (0, 1].")
    if not args.instance_prompt:
        fail("--instance_prompt is required with your own --instance_data_dir, e.g. 'a photo of sks dog'.")
    folder = Path(args.instance_data_dir)
    if not folder.is_dir():
        fail(f"--instance_data_dir {folder} does not exist; point it at a folder of subject images.")
    if not list_images(folder):
        fail(f"--instance_data_dir {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add 3-20 photos.")
    if args.resolution <= 0 or args.resolution % 8:
        fail(f"--resolution {args.resolution} must be a positive multiple of 8 (the VAE downsamples by 8).")
    if args.with_prior_preservation:
        if not args.class_prompt and not args.subjects:
            fail("--with_prior_preservation needs --class_prompt, e.g. 'a photo of a dog'.")
        if not args.class_data_dir:
            fail("--with_prior_preservation needs --class_data_dir (missing class images are generated there).")
        if args.num_class_images < 1:
            fail("--with_prior_preservation needs --num_class_images of at least 1 (100-200 is usual).")
    out = Path(args.output_dir)
    for parent in [out, *out.parents]:
        if parent.is_symlink() and not parent.exists():
            what = "is" if parent == out else f"lies under {parent}, which is"
            fail(f"--output_dir {out} {what} a symbolic link to a missing folder or a loop of links; point it at a "
                 "real folder or remove the link.")
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == out else f"lies under the file {parent}"
            fail(f"--output_dir {out} {what}; pass a folder path.")
        if parent.is_dir():
            import os

            if not os.access(parent, os.W_OK | os.X_OK):
                fail(f"--output_dir {out} cannot be created or written (no permission on {parent}); pass a "
                     "writable folder.")
            break
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                 "sample_batch_size", "num_validation_images", "avf_interval", "num_inference_steps"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        fail("--max_train_steps must be at least 1.")
    for name in ("learning_rate", "text_encoder_lr"):
        rate = getattr(args, name)
        if rate is not None and not rate > 0:  # also NaN
            fail(f"--{name} {rate} must be a positive number, e.g. 1e-3.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        fail("--checkpoints_total_limit must be at least 1.")
    if args.method in REGISTRY:
        from svdiff_tools.errors import SVDConfigError

        try:
            spectral_config(args)
        except SVDConfigError as exc:
            fail(str(exc))
    elif isinstance(args.rank, float) or (args.rank is not None and args.rank < 1):
        fail(f"--rank {args.rank} must be a positive int for {args.method}.")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir() and not (Path(args.output_dir) / path).is_dir():
            fail(f"--resume_from_checkpoint {path} does not exist; pass a checkpoint-N folder or 'latest'.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401  (only whether it imports)
        except Exception:
            fail("--use_8bit_adam needs bitsandbytes: pip install 'svdiff-tools[bnb]' (or drop the flag).")


def _spectral_lr(args: argparse.Namespace) -> float:
    from svdiff_tools.errors import SVDConfigError

    try:
        return REGISTRY[args.method].learning_rate(spectral_config(args))
    except SVDConfigError:  # reported by validate, in one sentence
        return REGISTRY[args.method].default_lr


def spectral_config(args: argparse.Namespace, train_text_encoder: bool = False):
    """The `SVDAdapterConfig` for the UNet (or, with ``train_text_encoder``, the text encoders)."""
    from svdiff_tools.config import SVDAdapterConfig

    rank = args.rank if REGISTRY[args.method].rank_forms else None
    return SVDAdapterConfig(
        method=args.method, rank=rank,
        target_modules="text-encoder" if train_text_encoder else args.target_modules,
        train_norms=args.train_norms and not train_text_encoder, basis_storage=args.basis_storage,
        **option_values(args))
