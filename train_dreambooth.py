#!/usr/bin/env python
"""DreamBooth with spectral adapters (SVDiff, SVFit, SVFT, VectorFit), or PEFT LoRA / PiSSA for comparison.

    accelerate launch train_dreambooth.py --method svfit            # embedded tiny model + example toy, offline
    accelerate launch train_dreambooth.py --method svdiff --pretrained_model_name_or_path <hub id or folder> \
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" --output_dir out

Flags follow diffusers' train_dreambooth_lora.py (`--help` lists them all). Outputs in --output_dir:
svd_adapter.safetensors (pipe.load_svd_adapter), optional pytorch_lora_weights.safetensors, validation
images and grid.png, README.md (model card), checkpoint-N/ folders. Stable Diffusion 1.x/2.x bases.
"""

from __future__ import annotations

import itertools
import logging
import os
import math
import shlex
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from svdiff_tools.training.args import TrainingInputError, parse_args

logger = logging.getLogger("train_dreambooth")
LORA_FILE = "pytorch_lora_weights.safetensors"


class TrainingDiverged(RuntimeError):
    pass


# ----------------------------------------------------------------------------------- set-up helpers
def resolve_base(args) -> str:
    if args.embedded_model:
        from svdiff_tools.tiny import tiny_pipeline_path

        return str(tiny_pipeline_path("sd15"))
    return args.pretrained_model_name_or_path


def pipeline_class_name(args, base: str) -> str:
    """The base's pipeline class from its model_index.json; refuses families this trainer does not handle."""
    from diffusers import DiffusionPipeline

    try:
        cls = DiffusionPipeline.load_config(base, revision=args.revision).get("_class_name", "")
    except Exception as exc:
        raise TrainingInputError(f"{base} is not a diffusers model folder or reachable hub id "
                                 f"({type(exc).__name__}); check --pretrained_model_name_or_path.") from None
    if "3" in cls or "Flux" in cls:
        raise TrainingInputError(f"{base} is a {cls}; this trainer handles Stable Diffusion 1.x/2.x and SDXL bases.")
    return cls


def text_encoder_classes(sdxl: bool) -> dict:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {"text_encoder": CLIPTextModel, **({"text_encoder_2": CLIPTextModelWithProjection} if sdxl else {})}


def check_targets(args, base: str, sdxl: bool) -> None:
    """Targets and ranks against a weightless UNet (and text encoder) built from the configs, so a bad
    --target_modules or --rank fails before any weight is loaded."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from svdiff_tools.errors import SVDAdapterError
    from svdiff_tools.model import plan_adapters
    from svdiff_tools.targets import resolve_targets
    from svdiff_tools.training.args import spectral_config

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base, subfolder="unet",
                                                                                 revision=args.revision))
        encoders = [cls(CLIPTextConfig.from_pretrained(base, subfolder=name, revision=args.revision))
                    for name, cls in text_encoder_classes(sdxl).items()] if args.train_text_encoder else []
    try:
        if args.method in ("lora", "pissa"):
            resolve_targets(unet, args.target_modules)
            for encoder in encoders:
                resolve_targets(encoder, "text-encoder")
        else:
            plan_adapters(unet, spectral_config(args), "default")
            for encoder in encoders:
                plan_adapters(encoder, spectral_config(args, train_text_encoder=True), "default")
    except SVDAdapterError as exc:
        raise TrainingInputError(str(exc)) from None


def maybe_die(step: int) -> None:
    """Fault injection for the kill-and-resume test: SIGKILL this process after the given step."""
    import os
    import signal

    if os.environ.get("SVDIFF_TOOLS_KILL_AFTER_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def generate_class_images(args, base: str, pipeline_cls: str, accelerator, weight_dtype) -> None:
    """Top up --class_data_dir to --num_class_images with the base model (never regenerates)."""
    from tqdm.auto import tqdm

    from svdiff_tools.training.args import list_images

    folder = Path(args.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    missing = args.num_class_images - len(list_images(folder))
    if missing <= 0:
        return
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.prior_generation_precision, weight_dtype)
    pipe = load_pipeline(args, base, pipeline_cls, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    start = len(list_images(folder))
    with tqdm(total=missing, desc="generating class images", disable=not accelerator.is_local_main_process) as bar:
        done = 0
        while done < missing:
            n = min(args.sample_batch_size, missing - done)
            gen = torch.Generator().manual_seed((args.seed or 0) + start + done)
            images = pipe([args.class_prompt] * n, num_inference_steps=25 if not args.embedded_model else 2,
                          height=args.resolution, width=args.resolution, generator=gen).images
            for i, img in enumerate(images):
                img.save(folder / f"class_{start + done + i:05d}.png")
            done += n
            bar.update(n)
    del pipe


def inject(args, unet, encoders: dict):
    """Adapters on the UNet (and text encoder); returns a function giving the trainable tensors by name."""
    if args.method in ("lora", "pissa"):
        from peft import LoraConfig

        from svdiff_tools.targets import resolve_targets

        def lora_config(model, targets):
            names = [n for n, _ in resolve_targets(model, targets)]
            return LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=names,
                              init_lora_weights="pissa" if args.method == "pissa" else "gaussian")

        unet.add_adapter(lora_config(unet, args.target_modules))
        if args.train_text_encoder:
            for encoder in encoders.values():
                encoder.add_adapter(lora_config(encoder, "text-encoder"))
        for model in (unet, *encoders.values()):
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        return
    import svdiff_tools as st
    from svdiff_tools.training.args import spectral_config

    st.inject_adapter(unet, spectral_config(args))
    if args.train_text_encoder:
        for encoder in encoders.values():
            st.inject_adapter(encoder, spectral_config(args, train_text_encoder=True))


def trainable_parameters(models) -> dict:
    return {f"{i}.{n}": p for i, m in enumerate(models) for n, p in m.named_parameters() if p.requires_grad}


def make_optimizer(args, unet, encoders: dict):
    import svdiff_tools as st

    lr = args.learning_rate
    te_lr = args.text_encoder_lr or lr
    if args.method in ("lora", "pissa"):
        groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": lr}]
        if args.train_text_encoder:
            groups += [{"params": [p for p in e.parameters() if p.requires_grad], "lr": te_lr}
                       for e in encoders.values()]
    else:
        groups = st.get_parameter_groups(unet, lr, lr_1d=args.learning_rate_1d, weight_decay=args.adam_weight_decay)
        if args.train_text_encoder:
            for encoder in encoders.values():
                groups += [dict(g, lr=te_lr) for g in st.get_parameter_groups(encoder, te_lr,
                                                                              weight_decay=args.adam_weight_decay)]
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
               eps=args.adam_epsilon)


# ----------------------------------------------------------------------------------- adapter files
def adapter_tensors(args, unet, encoders: dict) -> dict:
    """The trainable state of the run (for checkpoints), by name."""
    from peft.utils import get_peft_model_state_dict

    import svdiff_tools as st

    out = {}
    for prefix, model in (("unet", unet), *encoders.items()):
        if args.method in ("lora", "pissa"):
            if prefix == "unet" or args.train_text_encoder:
                out.update({f"{prefix}.{k}": v for k, v in get_peft_model_state_dict(model).items()})
        elif st.get_adapter_names(model):
            out.update({f"{prefix}.{k}": v for k, v in st.model.adapter_parameters(model, "default").items()})
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def restore_adapter_tensors(args, unet, encoders: dict, tensors: dict) -> None:
    from peft.utils import set_peft_model_state_dict

    import svdiff_tools as st

    for prefix, model in (("unet", unet), *encoders.items()):
        part = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if not part:
            continue
        if args.method in ("lora", "pissa"):
            set_peft_model_state_dict(model, part)
        else:
            params = st.model.adapter_parameters(model, "default")
            with torch.no_grad():
                for name, value in part.items():
                    params[name].copy_(value)


def save_final_adapter(args, base, unet, encoders: dict, output_dir: Path, pipeline_cls: str,
                       pissa_init=None) -> list:
    """svd_adapter.safetensors (or the LoRA file for lora/pissa), plus the optional LoRA export."""
    import svdiff_tools as st
    from svdiff_tools.io import component_state, write_adapter_file

    written = []
    if args.method in ("lora", "pissa"):
        import diffusers
        from peft.utils import get_peft_model_state_dict

        layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
        if args.train_text_encoder:
            layers.update({f"{name}_lora_layers": get_peft_model_state_dict(e) for name, e in encoders.items()})
        if pissa_init is not None:  # W_res + BA = W + (BA - B0 A0): a rank-2r LoRA on the original weights
            for key, sd in layers.items():
                for k in [k for k in sd if ".lora_A." in k]:
                    kb = k.replace(".lora_A.", ".lora_B.")
                    A0, B0 = pissa_init[key][k], pissa_init[key][kb]
                    sd[k] = torch.cat([sd[k], A0.to(sd[k].dtype)], 0)
                    sd[kb] = torch.cat([sd[kb], -B0.to(sd[kb].dtype)], 1)
        getattr(diffusers, pipeline_cls).save_lora_weights(output_dir, safe_serialization=True, **layers)
        return [output_dir / LORA_FILE]
    parts = {"unet": component_state(unet, "default")}
    if args.train_text_encoder:
        parts.update({name: component_state(e, "default") for name, e in encoders.items()})
    extra = {"pipeline_class": pipeline_cls, "base_model": base, "trainer": "train_dreambooth.py"}
    written.append(write_adapter_file(output_dir, parts, "default", extra))
    if args.export_lora_rank is not None:
        pipe = load_pipeline(args, base, pipeline_cls)
        report = st.export_lora(written[0], output_dir / LORA_FILE, base=pipe,
                                rank=args.export_lora_rank or None)
        logger.info("exported LoRA (rank %s): overall relative error %.3e", args.export_lora_rank or "exact",
                    report.overall_error)
        written.append(output_dir / LORA_FILE)
    return written


def load_pipeline(args, base: str, pipeline_cls: str, **components):
    from diffusers import DiffusionPipeline

    extra = {} if "XL" in pipeline_cls else {"safety_checker": None}
    return DiffusionPipeline.from_pretrained(base, revision=args.revision, variant=args.variant, **extra, **components)


# ----------------------------------------------------------------------------------- validation
def render_validation(args, pipe, step: int, folder: Path, accelerator=None):
    """Generate --num_validation_images with fixed seeds; save them and return the PIL images."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(args.num_validation_images):
        gen = torch.Generator().manual_seed((args.seed or 0) + i)
        img = pipe(args.validation_prompt, num_inference_steps=25 if not args.embedded_model else 4,
                   height=args.resolution, width=args.resolution, generator=gen).images[0]
        img.save(folder / f"step{step:06d}_{i}.png")
        images.append(img)
    if accelerator is not None:
        import numpy as np

        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step,
                                          dataformats="NHWC")
    return images


def final_check_and_card(args, base: str, files: list, output_dir: Path, trainable: int, steps: int,
                         pipeline_cls: str) -> Path:
    """Reload the saved adapter into a fresh base pipeline, render the final images, write the model card."""
    import svdiff_tools  # noqa: F401
    from svdiff_tools.images import labelled_grid
    from svdiff_tools.training.card import write_model_card

    pipe = load_pipeline(args, base, pipeline_cls)
    if args.method in ("lora", "pissa"):
        pipe.load_lora_weights(str(output_dir), weight_name=LORA_FILE)
    else:
        pipe.load_svd_adapter(files[0])
    images = render_validation(args, pipe, steps, output_dir / "validation", None)
    grid = output_dir / "grid.png"
    labelled_grid([images], [f"{args.method}, step {steps}"], caption=args.validation_prompt).save(grid)
    command = "accelerate launch train_dreambooth.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_model_card(output_dir, base_model=base if not args.embedded_model else "embedded tiny Stable Diffusion",
                     method=args.method, trainable=trainable, adapter_file=files[0],
                     instance_prompt=args.instance_prompt, validation_prompt=args.validation_prompt, steps=steps,
                     grid=grid, extra_files=files[1:], command=command)
    return grid


# ----------------------------------------------------------------------------------- training
def train(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from svdiff_tools.avf import AdaptiveVectorFreezing
    from svdiff_tools.training import checkpoints
    from svdiff_tools.training.data import DreamBoothDataset, EpochSampler, collate, load_folder

    output_dir = Path(args.output_dir)
    instance_images = load_folder(Path(args.instance_data_dir))  # corrupt files fail here, before any model
    base = resolve_base(args)
    pipeline_cls = pipeline_class_name(args, base)
    sdxl = "XL" in pipeline_cls
    check_targets(args, base, sdxl)
    try:
        run = checkpoints.plan_run(output_dir, checkpoints.run_config(args), args.resume_from_checkpoint,
                                   args.overwrite_output_dir)
    except checkpoints.RunConflict as exc:
        raise TrainingInputError(str(exc)) from None
    resume_path = run.resume_path

    # several processes and no CUDA: Accelerate runs DDP over gloo only when told the run is on the CPU
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logger.info("%s on %d process(es), device %s, mixed precision %s, base %s", args.method,
                accelerator.num_processes, accelerator.device, accelerator.mixed_precision, base)
    seed = args.seed if args.seed is not None else 0
    set_seed(seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = weight_dtype_of(accelerator)
    if accelerator.is_main_process:
        checkpoints.start(output_dir, run)
    accelerator.wait_for_everyone()

    class_images = []
    if args.with_prior_preservation:
        if accelerator.is_main_process:
            generate_class_images(args, base, pipeline_cls, accelerator, weight_dtype)
        accelerator.wait_for_everyone()
        class_images = load_folder(Path(args.class_data_dir))[: args.num_class_images]

    load = dict(revision=args.revision)
    names = list(text_encoder_classes(sdxl))
    tokenizers = [AutoTokenizer.from_pretrained(base, subfolder=n.replace("text_encoder", "tokenizer"),
                                                use_fast=False, **load) for n in names]
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **load)
    encoders = {n: cls.from_pretrained(base, subfolder=n, variant=args.variant, **load)
                for n, cls in text_encoder_classes(sdxl).items()}
    vae_path = args.pretrained_vae_model_name_or_path
    vae = AutoencoderKL.from_pretrained(vae_path or base, subfolder=None if vae_path else "vae", **load)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=args.variant, **load)
    for model in (vae, *encoders.values(), unet):
        model.requires_grad_(False)
        model.to(accelerator.device)
        if weight_dtype != torch.float32:
            model.to(dtype=weight_dtype)
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()

    inject(args, unet, encoders)  # frozen weights stay in weight_dtype; adapter tensors are float32
    pissa_init = None
    if args.method == "pissa":
        from peft.utils import get_peft_model_state_dict

        pissa_init = {"unet_lora_layers": {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}}
        if args.train_text_encoder:
            for name, encoder in encoders.items():
                pissa_init[f"{name}_lora_layers"] = {
                    k: v.detach().clone() for k, v in get_peft_model_state_dict(encoder).items()}
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for encoder in encoders.values():
                encoder.gradient_checkpointing_enable()
    trainable = sum(p.numel() for p in trainable_parameters([unet, *encoders.values()]).values())

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, unet, encoders)

    def encode(prompts: list, models: dict):
        """(prompt embeddings, pooled embeddings or None); SDXL: penultimate hidden states of both encoders
        concatenated, pooled from the second (projection) encoder."""
        hidden, pooled = [], None
        for tokenizer, model in zip(tokenizers, models.values()):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(accelerator.device)
            if not sdxl:
                return model(ids)[0], None
            out = model(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled

    dataset = DreamBoothDataset(instance_images, args.resolution, args.center_crop, args.random_flip, seed,
                                class_images)
    sampler = EpochSampler(len(dataset), seed, dataset, accelerator.num_processes, accelerator.process_index)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                         collate_fn=collate, num_workers=args.dataloader_num_workers)
    updates_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles)
    # the loader stays ours (see EpochSampler); trained text encoders are prepared like the UNet
    trained_names = names if args.train_text_encoder else []
    prepared = accelerator.prepare(unet, *[encoders[n] for n in trained_names], optimizer, lr_scheduler)
    unet, optimizer, lr_scheduler = prepared[0], prepared[-2], prepared[-1]
    encoders.update(zip(trained_names, prepared[1:-2]))
    raw_unet = accelerator.unwrap_model(unet)
    raw_encoders = {n: accelerator.unwrap_model(m) for n, m in encoders.items()}

    avf = None
    if args.method == "vectorfit" and args.avf_k > 0:
        avf = AdaptiveVectorFreezing.from_model(raw_unet)
        avf.attach(optimizer)

    # Accelerate saves optimizer, scheduler and RNG states; models are saved as adapter tensors only.
    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            save_file(adapter_tensors(args, raw_unet, raw_encoders), str(Path(folder) / "adapter_state.safetensors"))
        weights.clear()

    def load_hook(models, folder):
        restore_adapter_tensors(args, raw_unet, raw_encoders,
                                load_file(str(Path(folder) / "adapter_state.safetensors")))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    cached = None
    if not args.train_text_encoder:  # frozen text encoders: embed the prompts once
        with torch.no_grad():
            cached = {"instance": encode([args.instance_prompt], encoders)}
            if args.with_prior_preservation:
                cached["class"] = encode([args.class_prompt], encoders)
    res = args.resolution
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=weight_dtype, device=accelerator.device)

    # --cache_latents: every image goes through the VAE once (with the epoch-0 crop and flip, as diffusers does)
    latent_parts = ["instance"] + (["class"] if args.with_prior_preservation else [])
    latent_cache = None
    if args.cache_latents:
        latent_cache = {part: ([], []) for part in latent_parts}
        dataset.set_epoch(0)
        with torch.no_grad():
            for i in range(len(dataset)):
                item = dataset[i]
                for part in latent_parts:
                    dist = vae.encode(item[part][None].to(accelerator.device, weight_dtype)).latent_dist
                    latent_cache[part][0].append(dist.mean.float().cpu())
                    latent_cache[part][1].append(dist.std.float().cpu())
        latent_cache = {part: (torch.cat(m), torch.cat(sd)) for part, (m, sd) in latent_cache.items()}

    global_step, first_epoch, skip_batches = 0, 0, 0
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        state = checkpoints.read_state(resume_path)
        global_step = int(state["global_step"])
        if avf is not None and state.get("avf"):
            avf.load_state_dict(dict(state["avf"], initial=load_file(str(resume_path / "avf_initial.safetensors"))))
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
        logger.info("resumed from %s at step %d", resume_path, global_step)
    elif args.resume_from_checkpoint == "latest":
        logger.info("no checkpoint in %s yet; starting a new run", output_dir)

    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-svd", config={k: v for k, v in vars(args).items()
                                                            if isinstance(v, (int, float, str, bool))})
    last_good = resume_path
    accum_index = 0
    with tqdm(total=max_steps, initial=global_step, desc="training", disable=not accelerator.is_local_main_process) as bar:
        unet.train()
        for name in trained_names:
            encoders[name].train()
        for epoch in range(first_epoch, num_epochs):
            sampler.set_epoch(epoch)
            batches = itertools.islice(loader, skip_batches, None)
            skip_batches = 0
            for batch in batches:
                with accelerator.accumulate(unet):
                    # noise depends only on (seed, step, micro-batch within the step, process): resumable
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + global_step * 997 + accum_index
                                                        + 7919 * accelerator.process_index)
                    accum_index += 1
                    pixels = batch["pixel_values"]
                    if args.with_prior_preservation:
                        pixels = torch.cat([pixels, batch["class_pixel_values"]])
                    if latent_cache is not None:  # stored mean/std of each image: sample as the VAE would
                        keys = batch["index"].tolist()
                        mean = torch.cat([latent_cache[part][0][keys] for part in latent_parts])
                        std = torch.cat([latent_cache[part][1][keys] for part in latent_parts])
                        latents = (mean + std * torch.randn(mean.shape, generator=gen)).to(accelerator.device,
                                                                                           weight_dtype)
                    else:
                        with torch.no_grad():
                            latents = vae.encode(pixels.to(accelerator.device, weight_dtype)).latent_dist.sample(gen)
                    latents = latents * vae.config.scaling_factor
                    noise = torch.randn(latents.shape, generator=gen).to(latents)
                    if args.noise_offset:
                        noise = noise + args.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen).to(latents)
                    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                              generator=gen).to(latents.device)
                    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                    n_inst = batch["pixel_values"].shape[0]
                    if cached is not None:
                        parts = [cached["instance"]] + ([cached["class"]] if args.with_prior_preservation else [])
                        embeds = torch.cat([e.expand(n_inst, -1, -1) for e, _ in parts])
                        pooled = torch.cat([p.expand(n_inst, -1) for _, p in parts]) if sdxl else None
                    else:
                        prompts = [args.instance_prompt] * n_inst + ([args.class_prompt] * n_inst
                                                                     if args.with_prior_preservation else [])
                        embeds, pooled = encode(prompts, encoders)
                    extra = {}
                    if sdxl:
                        extra["added_cond_kwargs"] = {"text_embeds": pooled.to(weight_dtype),
                                                      "time_ids": time_ids.expand(embeds.shape[0], -1)}
                    pred = unet(noisy, timesteps, embeds.to(weight_dtype), **extra).sample
                    if noise_scheduler.config.prediction_type == "v_prediction":
                        target = noise_scheduler.get_velocity(latents, noise, timesteps)
                    else:
                        target = noise
                    if args.with_prior_preservation:
                        pred, pred_prior = pred.chunk(2)
                        target, target_prior = target.chunk(2)
                        prior_loss = F.mse_loss(pred_prior.float(), target_prior.float())
                    if args.snr_gamma is None:
                        loss = F.mse_loss(pred.float(), target.float())
                    else:
                        snr = compute_snr(noise_scheduler, timesteps[: pred.shape[0]])
                        w = torch.minimum(snr, args.snr_gamma * torch.ones_like(snr)) / snr
                        if noise_scheduler.config.prediction_type == "v_prediction":
                            w = w * snr / (snr + 1)
                        loss = (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * w).mean()
                    if args.with_prior_preservation:
                        loss = loss + args.prior_loss_weight * prior_loss
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"the loss became {loss.item()} at step {global_step}; lower --learning_rate or use "
                            f"--mixed_precision no. The last good checkpoint is {last_good or 'none (no checkpoint yet)'}.")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                    args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                accum_index = 0
                global_step += 1
                if avf is not None:
                    avf.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                accelerator.log({"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
                if global_step % args.checkpointing_steps == 0 and global_step < max_steps:
                    if not all(torch.isfinite(t).all() for t in adapter_tensors(args, raw_unet, raw_encoders).values()):
                        raise TrainingDiverged(
                            f"the adapter became NaN/inf at step {global_step}; lower --learning_rate. The last good "
                            f"checkpoint is {last_good or 'none (no checkpoint yet)'}.")
                    avf_state = avf.state_dict() if avf else None
                    state = {"method": args.method, "config": run.config}
                    if avf:
                        state["avf"] = {k: avf_state[k] for k in ("steps", "frozen")}
                    last_good = checkpoints.save(
                        output_dir, global_step, accelerator, state,
                        {"avf_initial.safetensors": avf_state["initial"]} if avf else None,
                        args.checkpoints_total_limit, run.run_id)
                if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    pipe = load_pipeline(args, base, pipeline_cls, unet=raw_unet, vae=vae, torch_dtype=weight_dtype,
                                         **raw_encoders)
                    render_validation(args, pipe, global_step, output_dir / "validation", accelerator)
                    unet.train()
                maybe_die(global_step)
                if global_step >= max_steps:
                    break
            if global_step >= max_steps:
                break
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = save_final_adapter(args, base, raw_unet, raw_encoders, output_dir, pipeline_cls, pissa_init)
        grid = final_check_and_card(args, base, files, output_dir, trainable, global_step, pipeline_cls)
        for tmp in output_dir.glob(".checkpoint-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        if args.push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo = create_repo(args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token).repo_id
            upload_folder(repo_id=repo, folder_path=str(output_dir), token=args.hub_token,
                          ignore_patterns=["checkpoint-*", ".checkpoint-*"])
        print(f"done: {files[0]} ({trainable:,} trainable parameters); validation grid {grid}; model card "
              f"{output_dir / 'README.md'}")
    accelerator.end_training()
    return 0


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        return train(args)
    except TrainingInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
