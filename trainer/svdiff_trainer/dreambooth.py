#!/usr/bin/env python
"""DreamBooth with spectral adapters (SVDiff, SVFit, SVFT, VectorFit), or PEFT LoRA / PiSSA for comparison.

    accelerate launch train_dreambooth.py --method svfit            # the embedded base + its example subject
    accelerate launch train_dreambooth.py --method svdiff --pretrained_model_name_or_path <hub id or folder> \
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" --output_dir out

Flags follow diffusers' train_dreambooth_lora.py (`--help` lists them all). Outputs in --output_dir:
svd_adapter.safetensors (pipe.load_svd_adapter), optional pytorch_lora_weights.safetensors, validation
images and grid.png, README.md (model card), checkpoint-N/ folders. Stable Diffusion 1.x/2.x and SDXL bases.
The method-specific parts live in `svdiff_trainer.backends`, the loss in `svdiff_trainer.loss`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List

import torch

from svdiff_trainer.args import TrainingInputError, flag_defaults, parse_args, recipe_lines
from svdiff_trainer.checkpoints import CheckpointWriteError
from svdiff_trainer.config import DataConfig, OptimConfig, OutputConfig, RunConfig

logger = logging.getLogger("train_dreambooth")


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class Run:
    """What a run is, settled before any weight is loaded."""

    cfg: RunConfig
    base: str
    pipeline_cls: str
    sdxl: bool
    backend: object
    plan: object  # checkpoints.RunPlan: fresh, or resuming which checkpoint
    subjects: List  # data.SubjectData: one, or several (--subject)
    seed: int

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output.output_dir)

    def load_pipeline(self, **components):
        from svdiff_trainer.base_model import load_pipeline

        return load_pipeline(self.cfg.model, self.base, self.pipeline_cls, **components)


def prepare_run(cfg: RunConfig) -> Run:
    """Every check that needs no weights: images readable, base known, targets valid, output folder fit."""
    from svdiff_trainer import checkpoints
    from svdiff_trainer.backends import check_targets, make_backend
    from svdiff_trainer.base_model import pipeline_class_name, resolve_base, weightless_models
    from svdiff_trainer.data import SubjectData, check_user_images, load_captions, load_folder, warn_captions_without
    from svdiff_trainer.validation import check_class_images, class_images_made_by

    specs = cfg.data.subjects or [None]  # corrupt files fail here, before any model
    ext = cfg.data.caption_extension or None

    def subject(folder: Path, identifier: str, class_word: str, prompt: str) -> SubjectData:
        warn_captions_without(folder, ext, identifier or cfg.data.identifier)  # the recipe read it from the prompt
        images, captions = check_user_images(folder, load_folder(folder, ext), load_captions(folder, ext, prompt), ext)
        return SubjectData(images, identifier, class_word, prompt, captions)

    subjects = [subject(Path(cfg.data.instance_data_dir), "", "", cfg.data.instance_prompt) if spec is None
                else subject(spec.folder, spec.identifier, spec.class_word, spec.prompt) for spec in specs]
    base = resolve_base(cfg.model)
    pipeline_cls = pipeline_class_name(cfg.model, base)
    sdxl = "XL" in pipeline_cls
    backend = make_backend(cfg)
    check_targets(backend, *weightless_models(cfg, base, sdxl))
    try:
        out = cfg.output
        plan = checkpoints.plan_run(Path(out.output_dir), checkpoints.run_config(cfg), out.resume_from_checkpoint,
                                    out.overwrite_output_dir, defaults=flag_defaults())
    except checkpoints.RunConflict as exc:
        raise TrainingInputError(str(exc)) from None
    seed = cfg.optim.seed if cfg.optim.seed is not None else 0
    run = Run(cfg, base, pipeline_cls, sdxl, backend, plan, subjects, seed)
    for folder, prompt in class_image_sets(cfg.data, run):  # class images made for another base or prompt: refused
        check_class_images(folder, class_images_made_by(cfg, base, prompt))
    return run


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    # several processes and no CUDA: Accelerate runs DDP over gloo only when told the run is on the CPU
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_cpu, gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        mixed_precision=cfg.optim.mixed_precision,
        log_with=None if cfg.output.report_to == "none" else cfg.output.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output.output_dir,
                                            logging_dir=str(Path(cfg.output.output_dir) / cfg.output.logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if cfg.optim.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def make_data(cfg: RunConfig, run: Run, accelerator, class_items):
    """(dataset, sampler, loader, max optimizer steps). An accumulation window may span two epochs (Accelerate
    counts micro-batches across them), so positions are counted in micro-batches (see `batches`)."""
    from svdiff_trainer.data import DreamBoothDataset, EpochSampler, collate

    dataset = DreamBoothDataset([], cfg.data.resolution, cfg.data.center_crop, cfg.data.random_flip, run.seed,
                                [img for img, _ in class_items], subjects=run.subjects,
                                class_prompts=[p for _, p in class_items],
                                cutmix_probability=cfg.data.cutmix_probability if cfg.data.cutmix_unmix else 0.0,
                                caption_probability=cfg.data.caption_probability)
    sampler = EpochSampler(len(dataset), run.seed, dataset, accelerator.num_processes, accelerator.process_index)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.optim.train_batch_size, sampler=sampler,
                                         collate_fn=collate, num_workers=cfg.data.dataloader_num_workers)
    updates_per_epoch = math.ceil(len(loader) / cfg.optim.gradient_accumulation_steps)
    max_steps = cfg.optim.max_train_steps or cfg.optim.num_train_epochs * updates_per_epoch
    return dataset, sampler, loader, max_steps


def cached_latents(data: DataConfig, dataset, vae, device, dtype):
    """--cache_latents: every image through the VAE once (epoch-0 crop and flip, as diffusers does), as
    {part: (posterior mean, std)}."""
    parts = ["instance"] + (["class"] if data.with_prior_preservation else [])
    cache = {part: ([], []) for part in parts}
    dataset.set_epoch(0)
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            for part in parts:
                dist = vae.encode(item[part][None].to(device, dtype)).latent_dist
                cache[part][0].append(dist.mean.float().cpu())
                cache[part][1].append(dist.std.float().cpu())
    return {part: (torch.cat(m), torch.cat(sd)) for part, (m, sd) in cache.items()}


def maybe_die(step: int) -> None:
    """Fault injection for the kill-and-resume test: SIGKILL this process after the given step."""
    import signal

    if os.environ.get("SVDIFF_TOOLS_KILL_AFTER_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def batches(loader, sampler, consumed: int):
    """(epoch, batch) forever, starting after the first ``consumed`` micro-batches (a resume: optimizer steps
    times accumulation steps), epoch by epoch as an uninterrupted run would see them."""
    epoch, skip = divmod(consumed, len(loader))
    for epoch in itertools.count(epoch):
        sampler.set_epoch(epoch)
        yield from ((epoch, b) for b in itertools.islice(loader, skip, None))
        skip = 0


# ----------------------------------------------------------------------------------- training
def train(cfg: RunConfig) -> int:
    from svdiff_trainer.checkpoints import RunConflict, output_lock

    try:  # one run per --output_dir: rank 0 of a launch holds its lock for the whole run
        with output_lock(Path(cfg.output.output_dir), enabled=int(os.environ.get("RANK", "0")) == 0):
            return _train(cfg)
    except RunConflict as exc:
        raise TrainingInputError(str(exc)) from None


def _train(cfg: RunConfig) -> int:
    run = prepare_run(cfg)  # bad input fails here, before any model is loaded
    accelerator = make_accelerator(cfg)
    session = build_session(run, accelerator)
    step = training_loop(session)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from svdiff_trainer.validation import final_check_and_card

        backend, out = run.backend, run.output_dir
        files = backend.save_final(out, run.base, run.pipeline_cls, session.raw_unet, session.raw_encoders,
                                   run.load_pipeline)
        captioned = sum(c != sub.prompt for sub in run.subjects for c in sub.captions or ())
        grid = final_check_and_card(cfg, run.base, backend, files, out, session.trainable, step, run.load_pipeline,
                                    captioned, run.subjects)
        push_to_hub(cfg.output, out)
        print(f"done: {files[0]} ({session.trainable:,} trainable parameters); validation grid {grid}; model card "
              f"{out / 'README.md'}")
    accelerator.wait_for_everyone()  # every rank tears the process group down together (pytorch/pytorch#75097:
    accelerator.end_training()       # a rank that destroys it while rank 0 still saves can hang the launcher)
    return 0


@dataclass
class Session:
    """Everything the training loop touches, built by `build_session`."""

    run: Run
    accelerator: object
    base: object  # BaseModels (frozen VAE, scheduler, tokenizers)
    unet: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped with several processes)
    encoders: dict
    raw_unet: torch.nn.Module
    raw_encoders: dict
    trained: List[str]  # text encoders being trained
    optimizer: object
    lr_scheduler: object
    loader: object
    sampler: object
    max_steps: int
    loss_fn: object
    trainable: int
    start_step: int


def build_session(run: Run, accelerator) -> Session:
    """Frozen base models, the backend's adapters, optimizer and schedule, data, loss; resumed if planned."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from svdiff_trainer import checkpoints
    from svdiff_trainer.base_model import PromptEncoder, load_base_models, weight_dtype_of
    from svdiff_trainer.data import load_folder
    from svdiff_trainer.loss import DreamBoothLoss
    from svdiff_trainer.validation import LOSS_FILE, class_images_made_by, generate_class_images

    cfg, backend = run.cfg, run.backend
    logger.info("%s on %d process(es), device %s, mixed precision %s, base %s", cfg.method.method,
                accelerator.num_processes, accelerator.device, accelerator.mixed_precision, run.base)
    if accelerator.is_main_process:
        for line in recipe_lines(cfg):
            logger.info("%s", line)
    set_seed(run.seed)
    weight_dtype = weight_dtype_of(accelerator)
    class_sets = class_image_sets(cfg.data, run)  # (folder, prompt) per class
    if accelerator.is_main_process:
        checkpoints.start(run.output_dir, run.plan)
        if run.plan.fresh:
            (run.output_dir / LOSS_FILE).unlink(missing_ok=True)
        for folder, prompt in class_sets:
            generate_class_images(cfg, run.load_pipeline, accelerator, weight_dtype, folder, prompt,
                                  class_images_made_by(cfg, run.base, prompt))
    accelerator.wait_for_everyone()
    class_items = [(img, prompt) for folder, prompt in class_sets
                   for img in load_folder(folder)[: cfg.data.num_class_images]]
    base = load_base_models(cfg, run.base, run.sdxl, accelerator.device, weight_dtype)
    if accelerator.is_main_process:
        from svdiff_trainer.args import recipe_of
        from svdiff_trainer.data import check_identifier

        for sub in run.subjects:
            check_identifier(base.tokenizers[0], sub.identifier or cfg.data.identifier, sub.class_word or
                             cfg.data.class_word, recipe_of(cfg).known_words)
    unet, encoders = base.unet, base.encoders
    backend.inject(unet, encoders)  # frozen weights stay in weight_dtype; adapter tensors are float32
    if cfg.optim.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in encoders.values() if cfg.method.train_text_encoder else ():
            encoder.gradient_checkpointing_enable()
    trainable = sum(p.numel() for m in (unet, *encoders.values()) for p in m.parameters() if p.requires_grad)
    if cfg.optim.scale_lr:
        optim = cfg.optim
        optim.learning_rate *= optim.gradient_accumulation_steps * optim.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(cfg.optim, backend.parameter_groups(unet, encoders))
    dataset, sampler, loader, max_steps = make_data(cfg, run, accelerator, class_items)
    lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.optim.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=cfg.optim.lr_num_cycles)
    trained = list(encoders) if cfg.method.train_text_encoder else []  # our loader stays ours (see EpochSampler)
    prepared = accelerator.prepare(unet, *[encoders[n] for n in trained], optimizer, lr_scheduler)
    unet, optimizer, lr_scheduler = prepared[0], prepared[-2], prepared[-1]
    encoders.update(zip(trained, prepared[1:-2]))
    raw_unet = accelerator.unwrap_model(unet)
    raw_encoders = {n: accelerator.unwrap_model(m) for n, m in encoders.items()}
    backend.attach(optimizer, raw_unet)
    register_state_hooks(accelerator, backend, raw_unet, raw_encoders)
    encode = PromptEncoder(base.tokenizers, encoders, run.sdxl, accelerator.device)
    recorder = None
    if cfg.data.cutmix_unmix:
        from svdiff_trainer.unmix import UnmixRecorder, install

        recorder = UnmixRecorder()
        install(raw_unet, recorder)
    loss_fn = DreamBoothLoss(cfg, base, encode, accelerator.device, cache_prompts=not cfg.method.train_text_encoder,
                             latent_cache=cached_latents(cfg.data, dataset, base.vae, accelerator.device, weight_dtype)
                             if cfg.optim.cache_latents else None, unmix=recorder, tokenizer=base.tokenizers[0])
    start = resume(run, accelerator, backend)
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-svd", config={k: v for k, v in cfg.flat().items()
                                                            if isinstance(v, (int, float, str, bool))})
    return Session(run, accelerator, base, unet, encoders, raw_unet, raw_encoders, trained, optimizer, lr_scheduler,
                   loader, sampler, max_steps, loss_fn, trainable, start)


def training_loop(s: Session) -> int:
    """Optimizer steps from ``s.start_step`` to ``s.max_steps``; returns the last step."""
    from tqdm.auto import tqdm

    from svdiff_trainer.validation import record_loss, render_validation

    cfg, accelerator, backend = s.run.cfg, s.accelerator, s.run.backend
    step, accum_index, last_good = s.start_step, 0, s.run.plan.resume_path
    if step >= s.max_steps:  # resumed at (or past) a shorter --max_train_steps
        return step
    with tqdm(total=s.max_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process) as bar:
        s.unet.train()
        for name in s.trained:
            s.encoders[name].train()
        for _, batch in batches(s.loader, s.sampler, step * cfg.optim.gradient_accumulation_steps):
            with accelerator.accumulate(s.unet):
                # noise depends only on (seed, step, micro-batch within the step, process): resumable
                gen = torch.Generator().manual_seed(s.run.seed * 1_000_003 + step * 997 + accum_index
                                                    + 7919 * accelerator.process_index)
                accum_index += 1
                loss = s.loss_fn(s.unet, batch, gen)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {loss.item()} at step {step}; lower --learning_rate or use "
                        f"--mixed_precision no. The last good checkpoint is {last_good or 'none (no checkpoint yet)'}.")
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                    accelerator.clip_grad_norm_([p for g in s.optimizer.param_groups for p in g["params"]],
                                                cfg.optim.max_grad_norm)
                s.optimizer.step()
                s.lr_scheduler.step()
                s.optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            accum_index, step = 0, step + 1
            backend.after_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            accelerator.log({"loss": loss.item(), "lr": s.lr_scheduler.get_last_lr()[0]}, step=step)
            if accelerator.is_main_process:
                record_loss(s.run.output_dir, step, loss.item())
            if step % cfg.output.checkpointing_steps == 0 and step < s.max_steps:
                last_good = save_checkpoint(s.run, accelerator, backend, s.raw_unet, s.raw_encoders, step, last_good)
            # the last step's images are the final check's, rendered from the saved file (not twice)
            every = cfg.validation.validation_steps
            if every and step % every == 0 and step < s.max_steps and accelerator.is_main_process:
                pipe = s.run.load_pipeline(unet=s.raw_unet, vae=s.base.vae, torch_dtype=s.base.weight_dtype,
                                           **s.raw_encoders)
                render_validation(cfg, pipe, step, s.run.output_dir / "validation", accelerator)
                s.unet.train()
            maybe_die(step)
            if step >= s.max_steps:
                break
    return step


# ----------------------------------------------------------------------------------- pieces of train()
def make_optimizer(optim: OptimConfig, groups):
    if optim.use_8bit_adam:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(groups, betas=(optim.adam_beta1, optim.adam_beta2), weight_decay=optim.adam_weight_decay,
               eps=optim.adam_epsilon)


def class_image_sets(data: DataConfig, run: Run) -> List:
    """(folder, prompt) of the class images: --class_data_dir with --class_prompt, or with several subjects one
    subfolder per class, prompted 'a photo of a CLASS'."""
    if not data.with_prior_preservation:
        return []
    root = Path(data.class_data_dir)
    if not data.subjects:
        return [(root, data.class_prompt)]
    classes = dict.fromkeys(sub.class_word for sub in run.subjects)
    return [(root / c, f"a photo of a {c}") for c in classes]


def register_state_hooks(accelerator, backend, unet, encoders) -> None:
    """Accelerate saves optimizer, scheduler and RNG states; models are saved as the backend's tensors only."""
    from safetensors.torch import load_file, save_file

    from svdiff_trainer.checkpoints import ADAPTER_STATE

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            save_file(backend.state(unet, encoders), str(Path(folder) / ADAPTER_STATE))
        weights.clear()

    def load_hook(models, folder):
        backend.restore(unet, encoders, load_file(str(Path(folder) / ADAPTER_STATE)))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resume(run: Run, accelerator, backend) -> int:
    """Load the planned checkpoint (if any); returns the step to continue from."""
    from svdiff_trainer import checkpoints

    path = run.plan.resume_path
    if path is None:
        if run.cfg.output.resume_from_checkpoint == "latest":
            logger.info("no checkpoint in %s yet; starting a new run", run.output_dir)
        return 0
    accelerator.load_state(str(path))
    state = checkpoints.read_state(path)
    backend.resume_extra(state, path)
    logger.info("resumed from %s at step %d", path, int(state["global_step"]))
    return int(state["global_step"])


def save_checkpoint(run: Run, accelerator, backend, unet, encoders, step: int, last_good):
    from svdiff_trainer import checkpoints

    if not all(torch.isfinite(t).all() for t in backend.state(unet, encoders).values()):
        raise TrainingDiverged(f"the adapter became NaN/inf at step {step}; lower --learning_rate. The last good "
                               f"checkpoint is {last_good or 'none (no checkpoint yet)'}.")
    extra, files = backend.checkpoint_extra()
    state = {"method": run.cfg.method.method, "config": run.plan.config, **(extra or {})}
    return checkpoints.save(run.output_dir, step, accelerator, state, files, run.cfg.output.checkpoints_total_limit,
                            run.plan.run_id)


def push_to_hub(output: OutputConfig, output_dir: Path) -> None:
    if output.push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        repo = create_repo(output.hub_model_id or output_dir.name, exist_ok=True, token=output.hub_token).repo_id
        upload_folder(repo_id=repo, folder_path=str(output_dir), token=output.hub_token,
                      ignore_patterns=["checkpoint-*", ".checkpoint-*", ".svdiff-tools.lock"])


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        return train(cfg)
    except TrainingInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except CheckpointWriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
