"""Command-line flags of `train_dreambooth.py`: diffusers' DreamBooth-LoRA flag set plus the methods' own.

`validate` checks everything that needs no model (paths, images, numbers, flag combinations) so that bad
input fails before any weight is loaded, with one sentence and no output written.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from svdiff_tools.config import BASIS_STORAGE
from svdiff_tools.export import rank_argument
from svdiff_tools.methods import METHODS, REGISTRY, add_option_flags
from svdiff_tools.targets import PRESETS

from . import presets
from .config import MethodConfig, RunConfig
from .presets import EXAMPLE_DATA
from .recipe import NAMED_BASE_RECIPE, Recipe, class_cache_dir, class_prompt_for, read_subject, steps_for

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
PEFT_METHODS = {"lora": "diffusers' train_dreambooth_lora.py default", "pissa": "as LoRA"}  # the PEFT backend's
PEFT_LR = 1e-4
FULL_LR = 5e-6  # diffusers' train_dreambooth.py (full fine-tuning) default
ALL_METHODS = METHODS + tuple(PEFT_METHODS) + ("full",)  # the built-in ones (`all_methods`: also later ones)


def all_methods() -> tuple:
    """Every method the trainer runs: the registered spectral ones (a method registered later included), PEFT's
    LoRA / PiSSA, and full fine-tuning."""
    return tuple(REGISTRY) + tuple(PEFT_METHODS) + ("full",)


# Defaults that depend on the base, for flags left unset: `fill_defaults` fills them from here (after the embedded
# preset's own) and --help shows them from here and from the preset, so the help never describes another default
# than the one used.
NAMED_BASE_DEFAULTS = dict(train_text_encoder=False, caption_probability=1.0, prior_loss_weight=1.0,
                           lr_scheduler="constant", resolution=512, num_validation_images=2,
                           num_inference_steps=25, guidance_scale=7.5)
EMBEDDED_FALLBACK = dict(resolution=64)  # an embedded base whose preset does not say


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Argparse's defaults in the help, except None: those flags' help says what fills them."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _help_preset():
    """The preset an embedded run would use, for --help (None where none can be chosen)."""
    try:
        return presets.choose()
    except Exception:  # noqa: BLE001 (a broken plug-in or environment must not break --help)
        return None


_PRESET_VIEWS: Dict[str, tuple] = {}


def _preset_view(preset) -> tuple:
    """(method -> the preset's flag defaults, its shipped subject's flags), once per process: the subject's class
    folder is named by a hash of the preset's weights, which --help must not read again for every flag."""
    if preset.name not in _PRESET_VIEWS:
        try:
            subject = preset.subject(25, 7.5, 64)
        except Exception:  # noqa: BLE001 (a broken plug-in must not break --help)
            subject = {}
        _PRESET_VIEWS[preset.name] = ({m: preset.defaults(m) for m in all_methods()}, subject)
    return _PRESET_VIEWS[preset.name]


def _default_note(name: str, preset, named: str = "") -> str:
    """'default: X; the embedded toyworld base: Y' (or its value per method), from the tables that fill them, in
    `fill_defaults`' order: the preset's defaults, then its shipped subject's, then the trainer's."""
    named = named or repr(NAMED_BASE_DEFAULTS.get(name))
    note = f"default: {named}"
    if preset is None:
        return note
    by_method, subject = _preset_view(preset)
    fallback = EMBEDDED_FALLBACK.get(name, NAMED_BASE_DEFAULTS.get(name))
    values = {m: d.get(name, subject.get(name, fallback)) for m, d in by_method.items()}
    from_subject = any(name not in d and name in subject for d in by_method.values())
    shown = {m: named if v is None else repr(v) for m, v in values.items()}  # None: what fills it for a named base
    if set(shown.values()) == {named}:
        return note
    if len(set(shown.values())) == 1:
        where = " with its shipped subject (no data flags)" if from_subject else ""
        return f"{note}; on the embedded {preset.name} base{where}: {next(iter(shown.values()))}"
    return f"{note}; on the embedded {preset.name} base, per method: " + ", ".join(
        f"{m} {v}" for m, v in shown.items())


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
        formatter_class=_HelpFormatter)
    preset = _help_preset()
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
    d.add_argument("--instance_prompt", default=None,
                   help="DreamBooth's 'a photo of IDENTIFIER CLASS' (e.g. 'a photo of zwx car'): the recipe reads the "
                        "identifier and class from it; default: 'a photo of sks toy' for the example data")
    d.add_argument("--identifier", default=None,
                   help="the subject's rare word, where --instance_prompt is not 'a photo of IDENTIFIER CLASS'")
    d.add_argument("--class_word", default=None,
                   help="the subject's class (e.g. 'teddy bear'), where the prompt does not show it as one word")
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
                        "(the identifier must also work without the caption's words); " +
                        _default_note("caption_probability", preset))
    d.add_argument("--class_data_dir", default=None,
                   help="class images (missing ones are generated there); default: a folder per base, class prompt "
                        "and sampling settings in ~/.cache/svdiff-tools/class-images")
    d.add_argument("--class_prompt", default=None, help="default: 'a photo of a CLASS', CLASS read from the prompt")
    d.add_argument("--with_prior_preservation", action=argparse.BooleanOptionalAction, default=None,
                   help="train on class images of the base too, so the class keeps its look (DreamBooth's prior "
                        "preservation); default: on where the class can be read from the prompt (the recipe), "
                        "except on the embedded tiny base (random weights); --no-with_prior_preservation turns it off")
    d.add_argument("--prior_loss_weight", type=float, default=None, help=_default_note("prior_loss_weight", preset))
    d.add_argument("--num_class_images", type=int, default=None,
                   help=f"default (the recipe's): {NAMED_BASE_RECIPE.num_class_images}" + (
                       f"; on the embedded {preset.name} base: {preset.recipe.num_class_images}" if preset else ""))
    d.add_argument("--sample_batch_size", type=int, default=4)
    d.add_argument("--prior_generation_precision", choices=["no", "fp32", "fp16", "bf16"], default=None)
    d.add_argument("--resolution", type=int, default=None, help=_default_note("resolution", preset))
    d.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                   help="crop non-square images to their centre square (--no-center_crop: a random square per step, "
                        "diffusers' behaviour without --center_crop)")
    d.add_argument("--random_flip", action="store_true")
    d.add_argument("--dataloader_num_workers", type=int, default=0)

    t = p.add_argument_group("training")
    t.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="adapt the text encoder(s) too; " + _default_note("train_text_encoder", preset))
    t.add_argument("--text_encoder_lr", type=float, default=None,
                   help=_default_note("text_encoder_lr", preset, "--learning_rate") +
                        " (a --learning_rate given covers the text encoder too)")
    t.add_argument("--train_batch_size", type=int, default=1)
    t.add_argument("--max_train_steps", type=int, default=None,
                   help=_default_note("max_train_steps", preset, f"{NAMED_BASE_RECIPE.steps} for "
                                       f"{NAMED_BASE_RECIPE.reference_images} images") +
                        " (the recipe scales a default to the image count; a number given is used as it is)")
    t.add_argument("--num_train_epochs", type=int, default=None,
                   help="train this many epochs instead of the recipe's steps (used when --max_train_steps is not set)")
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--gradient_checkpointing", action="store_true")
    t.add_argument("--learning_rate", type=float, default=None,
                   help=_lr_help() + "; " + _default_note("learning_rate", preset, "as above").split("; ", 1)[-1])
    t.add_argument("--scale_lr", action="store_true")
    t.add_argument("--lr_scheduler", default=None,
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
                   help=_default_note("lr_scheduler", preset))
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
                   help="per validation prompt; " + _default_note("num_validation_images", preset))
    o.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance of validation and class images; " +
                        _default_note("guidance_scale", preset))
    o.add_argument("--validation_seed", type=int, default=None,
                   help="validation image i uses seed validation_seed + i (default: --seed)")
    o.add_argument("--num_inference_steps", type=int, default=None,
                   help="denoising steps for validation and class images; " +
                        _default_note("num_inference_steps", preset))
    o.add_argument("--dino_model", default=None,
                   help="score the final images with DINO subject fidelity against the instance images, with this "
                        "transformers model (hub id or folder, e.g. facebook/dino-vits16 or facebook/dinov2-small)")
    o.add_argument("--clip_model", default=None,
                   help="score the final images with CLIP-I and CLIP-T, with this transformers CLIP model (e.g. "
                        "openai/clip-vit-base-patch32)")
    o.add_argument("--validation_steps", type=int, default=None,
                   help="validate every N steps (default: only at the end)")
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


def parse_args(argv: Optional[List[str]] = None) -> RunConfig:
    """The command line as a `RunConfig`: the parsed flags, their defaults filled in (`fill_defaults`) and
    validated (`validate`). The ``argparse.Namespace`` ends here."""
    cfg = RunConfig.from_flags(vars(build_parser().parse_args(argv)))
    fill_defaults(cfg)
    validate(cfg)
    return cfg


def fill_defaults(cfg: RunConfig) -> None:
    embedded = cfg.model.pretrained_model_name_or_path is None
    cfg.model.embedded_model = embedded
    cfg.model.embedded_kind = None
    cfg.validation.validation_prompts = cfg.validation.validation_prompts or None
    cfg.data.subjects = [parse_subject(spec) for spec in cfg.data.subject or []]
    if cfg.data.subjects:
        first = cfg.data.subjects[0]
        cfg.data.instance_data_dir, cfg.data.instance_prompt = str(first.folder), first.prompt
    if embedded:
        _preset_defaults(cfg)
    _fill(cfg, "the trainer's default", **NAMED_BASE_DEFAULTS)
    if embedded:
        _fill(cfg, "the trainer's default for an embedded base", **EMBEDDED_FALLBACK)
    if cfg.data.instance_data_dir is None:
        _fill(cfg, "the trainer's example subject", instance_data_dir=str(EXAMPLE_DATA))
        if not cfg.data.instance_prompt:
            cfg.data.instance_prompt, cfg.chosen["instance_prompt"] = "a photo of sks toy", "the example subject's"
    if cfg.method.target_modules is None:
        _fill(cfg, f"{cfg.method.method}'s default targets",
              target_modules="unet-attention" if cfg.method.method in PEFT_METHODS else "unet")
    elif "," in cfg.method.target_modules:
        cfg.method.target_modules = [t.strip() for t in cfg.method.target_modules.split(",") if t.strip()]
    if cfg.method.rank is not None and float(cfg.method.rank).is_integer() and cfg.method.rank >= 1:
        cfg.method.rank = int(cfg.method.rank)
    if cfg.method.method in PEFT_METHODS and cfg.method.rank is None:
        _fill(cfg, "diffusers' LoRA default", rank=4)
    if cfg.optim.learning_rate is None:
        method = cfg.method.method
        if method in REGISTRY:
            _fill(cfg, f"{method}'s default: {REGISTRY[method].lr_source}", learning_rate=_spectral_lr(cfg.method))
        else:
            _fill(cfg, PEFT_METHODS[method] if method in PEFT_METHODS else "diffusers' train_dreambooth.py",
                  learning_rate=PEFT_LR if method in PEFT_METHODS else FULL_LR)
    recipe = recipe_of(cfg)
    if not cfg.data.subjects:
        _apply_recipe(cfg, recipe)
    elif cfg.data.with_prior_preservation:
        _fill(cfg, f"the recipe ({recipe.tuned_on})", num_class_images=recipe.num_class_images)
    if cfg.optim.max_train_steps is None and cfg.optim.num_train_epochs is None:
        cfg.optim.num_train_epochs = 1
    if cfg.validation.validation_prompt is None:
        cfg.validation.validation_prompt = cfg.data.instance_prompt
    if cfg.validation.validation_prompts is None:
        cfg.validation.validation_prompts = [cfg.validation.validation_prompt]
        if len(cfg.data.subjects) > 1:  # every subject, and the first two together
            cfg.validation.validation_prompts = [sub.prompt for sub in cfg.data.subjects] + [
                mixed_prompt(cfg.data.subjects[0], cfg.data.subjects[1])]
    else:
        cfg.validation.validation_prompt = cfg.validation.validation_prompts[0]
    if cfg.data.with_prior_preservation is None:
        cfg.data.with_prior_preservation = False


def recipe_of(cfg: RunConfig) -> Recipe:
    """The base's recipe: the embedded preset's, or `NAMED_BASE_RECIPE`."""
    return presets.choose(cfg.model.embedded_kind).recipe if cfg.model.embedded_kind else NAMED_BASE_RECIPE


def _apply_recipe(cfg: RunConfig, recipe: Recipe) -> None:
    """The DreamBooth recipe for the run's folder (`recipe.Recipe`), for the flags left unset: identifier and class
    read from the prompt, the class prompt, prior preservation with cached class images, the validation prompts
    (instance and recontextualised) and the steps scaled to the image count. What it could not derive is left off
    and said in `recipe_lines`."""
    data = cfg.data
    read = read_subject(data.instance_prompt, data.class_prompt) if data.instance_prompt else None
    if read is not None:
        _fill(cfg, f"read from {data.instance_prompt!r}", identifier=read[0], class_word=read[1])
    if data.class_word is not None:
        _fill(cfg, "the recipe: DreamBooth's class prompt", class_prompt=class_prompt_for(data.class_word))
    if data.class_prompt is not None:
        _fill(cfg, f"the recipe ({recipe.tuned_on})", with_prior_preservation=recipe.prior_preservation)
    if data.with_prior_preservation:
        _fill(cfg, f"the recipe ({recipe.tuned_on})", num_class_images=recipe.num_class_images)
        if data.class_data_dir is None:
            _fill(cfg, "the recipe: cached per base, class prompt and sampling settings",
                  class_data_dir=str(_class_dir(cfg, recipe)))
    v = cfg.validation
    if v.validation_prompt is None and v.validation_prompts is None and recipe.recontext and data.identifier \
            and data.class_word and data.instance_prompt:
        _fill(cfg, "the recipe: the instance prompt and a recontextualisation", validation_prompts=[
            data.instance_prompt, recipe.recontext.format(identifier=data.identifier, class_word=data.class_word)])
    if cfg.optim.num_train_epochs is None:
        _fill(cfg, f"the recipe: {recipe.steps} steps for {recipe.reference_images} images",
              max_train_steps=recipe.steps)
    folder = Path(data.instance_data_dir or "")
    if cfg.chosen.get("max_train_steps") and folder.is_dir() and (n := len(list_images(folder))):
        steps = steps_for(cfg.optim.max_train_steps, n, recipe)
        if steps != cfg.optim.max_train_steps:
            cfg.chosen["max_train_steps"] += f", scaled to {n} images (x{steps / cfg.optim.max_train_steps:.2f})"
            cfg.optim.max_train_steps = steps


def _class_dir(cfg: RunConfig, recipe: Recipe) -> Path:
    """The recipe's class-image folder: the preset's own for the standard class prompt, else one per base version
    (a local folder's weights digest, a hub id with its revision), prompt and sampling settings."""
    v, data = cfg.validation, cfg.data
    standard = data.class_word is not None and data.class_prompt == class_prompt_for(data.class_word)
    if recipe.class_dir is not None and standard:
        return recipe.class_dir(v.num_inference_steps, v.guidance_scale, data.resolution, data.class_word)
    from .base_model import resolve_base
    from .validation import weights_digest

    base = resolve_base(cfg.model)
    tag = weights_digest(Path(base).expanduser()) or f"{base}@{cfg.model.revision or 'main'}"
    return class_cache_dir(tag, data.class_prompt, v.num_inference_steps, v.guidance_scale, data.resolution)


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


def _fill(cfg: RunConfig, source: str, **defaults) -> None:
    """Set each flag the user left unset (None) to its default, and note where it came from (`recipe_lines`)."""
    for name, value in defaults.items():
        if cfg.get(name) is None:
            cfg.set(name, value)
            cfg.chosen[name] = source


def recipe_lines(cfg: RunConfig) -> List[str]:
    """What the run will do beyond the flags given, said out loud: each default it chose and where from, the subject
    as the recipe reads it, prior preservation (on, and how to turn it off; or off, and how to turn it on) and the
    validation prompts. The trainer logs these lines first."""
    chosen = ", ".join(f"--{name} {cfg.get(name)!r} ({source})" for name, source in cfg.chosen.items()
                       if name not in ("validation_prompt",))
    lines = [f"defaults chosen (give a flag to change it): {chosen}" if chosen else "no defaults chosen"]
    data = cfg.data
    if data.subjects:
        lines.append(f"subjects: {', '.join(f'{s.identifier} {s.class_word} ({s.folder})' for s in data.subjects)}")
    elif data.identifier and data.class_word:
        lines.append(f"subject: identifier {data.identifier!r}, class {data.class_word!r} (--identifier, --class_word "
                     "change them)")
    else:
        lines.append(f"subject: no identifier and class read from {data.instance_prompt!r} (DreamBooth's form is 'a "
                     "photo of IDENTIFIER CLASS'); pass --identifier and --class_word for the recipe's class prompt, "
                     "prior preservation and recontextualisation prompt")
    if data.with_prior_preservation:
        lines.append(f"prior preservation: on, {data.num_class_images} class images of {data.class_prompt!r} in "
                     f"{data.class_data_dir} (--prior_loss_weight {data.prior_loss_weight:g}; "
                     "--no-with_prior_preservation turns it off)")
    else:
        lines.append("prior preservation: off (--with_prior_preservation --class_prompt 'a photo of a CLASS' turns it "
                     "on; it keeps the base model's idea of the class)")
    lines.append("validation prompts: " + "; ".join(repr(p) for p in cfg.validation.validation_prompts or []))
    return lines


def _preset_defaults(cfg: RunConfig) -> None:
    """The embedded base's flag defaults (flags the user gave win; a learning rate the user gives covers the text
    encoder too); with no data flags also its shipped subject: folder, prompts, prior preservation, class images
    and validation prompts (`presets.Preset`)."""
    try:
        preset = presets.choose()
    except ValueError as exc:
        raise TrainingInputError(str(exc)) from None
    cfg.model.embedded_kind = preset.name
    defaults = preset.defaults(cfg.method.method)
    if cfg.optim.learning_rate is not None:
        defaults.pop("text_encoder_lr", None)
    # `is None`, not `or`: a 0 the user gives is theirs (guidance 0 is unconditional sampling; a count of 0 is
    # refused by `validate`), never silently replaced by the preset's default
    _fill(cfg, f"the {preset.name} preset", **defaults)
    if cfg.data.instance_data_dir is not None:
        return
    subject = preset.subject(cfg.validation.num_inference_steps, cfg.validation.guidance_scale, cfg.data.resolution)
    if cfg.validation.validation_prompt is not None or cfg.validation.validation_prompts is not None:
        subject.pop("validation_prompts", None)
    _fill(cfg, f"the {preset.name} preset's shipped subject", **subject)


def validate(cfg: RunConfig) -> None:
    """Raise `TrainingInputError` on the first problem found."""
    def fail(msg: str) -> None:
        raise TrainingInputError(msg)

    for sub in cfg.data.subjects:
        if not sub.folder.is_dir() or not list_images(sub.folder):
            fail(f"--subject folder {sub.folder} does not exist or holds no images; point it at subject photos.")
    if not 0.0 <= cfg.data.caption_probability <= 1.0:
        fail(f"--caption_probability {cfg.data.caption_probability} must lie in [0, 1].")
    if cfg.data.cutmix_unmix:
        if len(cfg.data.subjects) < 2:
            fail("--cutmix_unmix needs at least two --subject DIR:IDENTIFIER:CLASS.")
        if cfg.optim.cache_latents:
            fail("--cutmix_unmix mixes images in pixel space each step; drop --cache_latents.")
        if not 0.0 < cfg.data.cutmix_probability <= 1.0:
            fail("--cutmix_probability must lie in (0, 1].")
    if not cfg.data.instance_prompt:
        fail("--instance_prompt is required with your own --instance_data_dir, e.g. 'a photo of sks dog'.")
    folder = Path(cfg.data.instance_data_dir)
    if not folder.is_dir():
        fail(f"--instance_data_dir {folder} does not exist; point it at a folder of subject images.")
    if not list_images(folder):
        fail(f"--instance_data_dir {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add 3-20 photos.")
    if cfg.data.resolution <= 0 or cfg.data.resolution % 8:
        fail(f"--resolution {cfg.data.resolution} must be a positive multiple of 8 (the VAE downsamples by 8).")
    if cfg.data.with_prior_preservation:
        if not cfg.data.class_prompt and not cfg.data.subjects:
            fail("--with_prior_preservation needs --class_prompt (e.g. 'a photo of a dog'), --class_word, or an "
                 "--instance_prompt of the form 'a photo of IDENTIFIER CLASS' to derive it from.")
        if not cfg.data.class_data_dir:
            fail("--with_prior_preservation needs --class_data_dir (missing class images are generated there).")
        if cfg.data.num_class_images < 1:
            fail("--with_prior_preservation needs --num_class_images of at least 1 (100-200 is usual).")
    out = Path(cfg.output.output_dir)
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
        if cfg.get(name) is not None and cfg.get(name) < 1:
            fail(f"--{name} must be at least 1.")
    if cfg.optim.max_train_steps is not None and cfg.optim.max_train_steps < 1:
        fail("--max_train_steps must be at least 1.")
    for name in ("learning_rate", "text_encoder_lr"):
        rate = cfg.get(name)
        if rate is not None and not rate > 0:  # also NaN
            fail(f"--{name} {rate} must be a positive number, e.g. 1e-3.")
    if cfg.output.checkpoints_total_limit is not None and cfg.output.checkpoints_total_limit < 1:
        fail("--checkpoints_total_limit must be at least 1.")
    if cfg.method.method in REGISTRY:
        from svdiff_tools.errors import SVDConfigError

        try:
            spectral_config(cfg.method)
        except SVDConfigError as exc:
            fail(str(exc))
    elif isinstance(cfg.method.rank, float) or (cfg.method.rank is not None and cfg.method.rank < 1):
        fail(f"--rank {cfg.method.rank} must be a positive int for {cfg.method.method}.")
    if cfg.output.resume_from_checkpoint and cfg.output.resume_from_checkpoint != "latest":
        path = Path(cfg.output.resume_from_checkpoint)
        if not path.is_dir() and not (Path(cfg.output.output_dir) / path).is_dir():
            fail(f"--resume_from_checkpoint {path} does not exist; pass a checkpoint-N folder or 'latest'.")
    if cfg.optim.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401  (only whether it imports)
        except Exception:
            fail("--use_8bit_adam needs bitsandbytes: pip install 'svdiff-tools[bnb]' (or drop the flag).")


def _spectral_lr(method: MethodConfig) -> float:
    from svdiff_tools.errors import SVDConfigError

    try:
        return REGISTRY[method.method].learning_rate(spectral_config(method))
    except SVDConfigError:  # reported by validate, in one sentence
        return REGISTRY[method.method].default_lr


def spectral_config(method: MethodConfig, train_text_encoder: bool = False):
    """The `SVDAdapterConfig` for the UNet (or, with ``train_text_encoder``, the text encoders)."""
    from svdiff_tools.config import SVDAdapterConfig

    rank = method.rank if REGISTRY[method.method].rank_forms else None
    return SVDAdapterConfig(
        method=method.method, rank=rank, target_modules="text-encoder" if train_text_encoder else method.target_modules,
        train_norms=method.train_norms and not train_text_encoder, basis_storage=method.basis_storage,
        **method.options)
