"""Pretraining the toy-world Stable Diffusion pipeline, in stages, resumable, seeded.

    python -m svdiff_toyworld.pretrain vae  --output_dir runs/toyworld   # AutoencoderKL, 64 px -> 16x16x4
    python -m svdiff_toyworld.pretrain unet --output_dir runs/toyworld   # UNet + CLIP text encoder
    python -m svdiff_toyworld.pretrain export --output_dir runs/toyworld --to DIR

Each stage streams fresh scenes (scene seed = step * batch + i, so a resumed run sees exactly the data an
uninterrupted one would), writes `<output_dir>/<stage>/checkpoint-N/` every `--checkpoint_every` steps
(renamed into place when complete; the last `--keep` kept) and resumes from the latest one by default.
The stage's final weights (EMA) go to `<output_dir>/<stage>/final/`. Progress lines go to `log.jsonl`.
Accelerate handles devices and mixed precision, so the same command runs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from svdiff_trainer import checkpoints
from . import models
from . import metric
from .metric import psnr
from .render import RENDER_VERSION, render_tensor
from .world import caption, sample_scene, with_identifier

EVAL_SEED = 10**9          # evaluation scenes start here, far from the training stream


def epsilon_loss_weight(alpha_bar: torch.Tensor, floor: float, gamma: float) -> torch.Tensor:
    """Weight of each sample's epsilon-MSE so that its x0-MSE is weighed by clamp(SNR, floor, gamma).

    epsilon-MSE = SNR * x0-MSE with SNR = alpha_bar / (1 - alpha_bar), so the weight is clamp(SNR, floor, gamma) /
    SNR: Min-SNR-gamma (Hang et al. 2023) for floor 0; a floor lifts the noisiest steps (SNR < floor), where the
    image's layout is decided, to the x0 weight `floor` (v-prediction's is SNR + 1)."""
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(min=floor, max=gamma) / snr


def token_identity_loss(hidden: torch.Tensor, ids: torch.Tensor, embeddings: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Cross-entropy of reading each token back from the text encoder's output at its own position, through the
    (tied) input embeddings: hidden (B, L, D) @ embeddings (V, D)^T against ids (B, L), over the tokens up to and
    including the first end-of-text (padding repeats it). A text encoder trained only through the UNet's loss
    maps words the UNet has not yet used to one output (the toy world's "left" and "right" reached cosine 1.0),
    and then the UNet can never learn them; this keeps every word readable, as CLIP's contrastive pretraining
    does for Stable Diffusion."""
    is_eos = ids == eos_id
    keep = (is_eos.cumsum(1) - is_eos.long()) == 0
    logits = hidden.float() @ embeddings.float().T
    return F.cross_entropy(logits[keep], ids[keep])


def lr_at(step: int, base: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up then cosine decay to `floor * base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


class Stage:
    """What differs between stages: the trainable modules, a batch's loss and the periodic evaluation."""

    name = ""

    def __init__(self, args, accelerator):
        self.args, self.accelerator = args, accelerator

    def modules(self) -> dict:
        raise NotImplementedError

    def loss(self, step: int) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, step: int) -> dict:
        return {}

    def finish(self, final: Path) -> None:
        raise NotImplementedError

    def scenes(self, step: int, batch: int):
        return [sample_scene(step * batch + i + self.args.seed * 7_919_000) for i in range(batch)]


class VAEStage(Stage):
    """AutoencoderKL: L1 + MSE reconstruction + a small KL term (SD's VAE used 1e-6)."""

    name = "vae"

    def __init__(self, args, accelerator):
        super().__init__(args, accelerator)
        self.vae = models.vae()
        self.eval_x = render_tensor([sample_scene(EVAL_SEED + i) for i in range(128)])

    def modules(self):
        return {"vae": self.vae}

    def loss(self, step):
        x = render_tensor(self.scenes(step, self.args.batch_size), self.accelerator.device)
        posterior = self.vae.encode(x).latent_dist
        rec = self.vae.decode(posterior.sample()).sample
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + self.args.kl_weight * posterior.kl().mean()

    @torch.no_grad()
    def evaluate(self, step):
        vae = self.accelerator.unwrap_model(self.vae)
        x = self.eval_x.to(self.accelerator.device)
        latents = vae.encode(x).latent_dist.mode()
        return {"psnr": round(psnr(vae.decode(latents).sample, x), 3), "latent_std": round(float(latents.std()), 4)}

    def finish(self, final):
        vae = self.accelerator.unwrap_model(self.vae)
        with torch.no_grad():
            x = render_tensor([sample_scene(EVAL_SEED + 5000 + i) for i in range(256)], self.accelerator.device)
            std = float(vae.encode(x).latent_dist.mode().std())
        vae.register_to_config(scaling_factor=round(1.0 / std, 5))   # latents * factor have unit variance
        vae.save_pretrained(final)


class UNetStage(Stage):
    """UNet + CLIP text encoder on the frozen VAE's latents: epsilon prediction weighted by
    `epsilon_loss_weight` (x0 error weighed by SNR clamped to [1, 5]), plus `token_identity_loss` on the text
    encoder, 10% empty captions for classifier-free guidance. Evaluation samples the eval prompts with the
    assembled pipeline and reads them back with the metric network."""

    name = "unet"

    def __init__(self, args, accelerator):
        from diffusers import AutoencoderKL, DDPMScheduler

        from .tokenizer import load_tokenizer, write_tokenizer_files

        super().__init__(args, accelerator)
        root = Path(args.output_dir)
        vae_path = root / "vae" / "final"
        if not (vae_path / "config.json").is_file():
            raise SystemExit(f"no VAE at {vae_path}; run the vae stage first")
        self.vae_frozen = AutoencoderKL.from_pretrained(vae_path).to(accelerator.device).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(write_tokenizer_files(root / "tokenizer"))
        vocab = self.tokenizer.get_vocab()
        self.text_encoder = models.text_encoder(len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"])
        self.unet = models.unet()
        self.noise_scheduler = DDPMScheduler(**models.noise_scheduler_config())
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(accelerator.device)
        self._perm, self._perm_epoch, self._net = None, -1, None
        self.latent_mean, self.latent_std = self.latent_table()

    def modules(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def latent_table(self):
        """Posterior mean and std (fp16) of ``--latent_cache`` training scenes, encoded once and kept in
        ``<output_dir>/unet/latents-rV-N.safetensors`` (V: the renderer's version; scene i has seed
        ``i + seed * 7_919_000``)."""
        from safetensors.torch import load_file

        from svdiff_tools.atomic import save_safetensors

        n = self.args.latent_cache
        path = Path(self.args.output_dir) / "unet" / f"latents-r{RENDER_VERSION}-{n}.safetensors"
        if path.is_file():
            table = load_file(str(path))
            return table["mean"], table["std"]
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, n, 256):
                scenes = [sample_scene(self.scene_seed(i)) for i in range(start, min(n, start + 256))]
                dist = self.vae_frozen.encode(render_tensor(scenes, self.accelerator.device)).latent_dist
                means.append(dist.mean.half().cpu().contiguous())
                stds.append(dist.std.half().cpu().contiguous())
                if start % 10240 == 0:
                    print(json.dumps({"encoded": start + len(scenes), "of": n}), flush=True)
        table = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}
        save_safetensors(table, path)
        return table["mean"], table["std"]

    def scene_seed(self, i: int) -> int:
        return i + self.args.seed * 7_919_000

    def batch(self, step):
        """Scene indices, captions (a fresh random description each epoch) and dropped captions for a step."""
        n, total = self.args.batch_size, self.latent_mean.shape[0]
        picks = []
        for j in range(step * n, (step + 1) * n):
            epoch, pos = divmod(j, total)
            if self._perm_epoch != epoch:
                self._perm = torch.randperm(total, generator=torch.Generator().manual_seed(self.args.seed + epoch))
                self._perm_epoch = epoch
            picks.append((int(self._perm[pos]), epoch))
        texts = []
        for i, epoch in picks:
            seed = self.scene_seed(i)
            rng = random.Random(seed * 31 + epoch)
            text = "" if rng.random() < self.args.caption_dropout else caption(sample_scene(seed), rng)
            texts.append(with_identifier(text, rng, self.args.identifier_rate))
        return [i for i, _ in picks], texts

    def token_ids(self, texts):
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.accelerator.device)

    def loss(self, step):
        index, texts = self.batch(step)
        g = torch.Generator(device="cpu").manual_seed(step * 31 + self.args.seed)
        mean, std = self.latent_mean[index].float(), self.latent_std[index].float()
        eps = torch.randn(mean.shape, generator=g)
        latents = ((mean + std * eps) * self.vae_frozen.config.scaling_factor).to(self.accelerator.device)
        noise = torch.randn(latents.shape, generator=g).to(latents.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g)
        t = t.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        ids = self.token_ids(texts)
        hidden = self.text_encoder(ids)[0]
        pred = self.unet(noisy, t, hidden).sample
        weight = epsilon_loss_weight(self.alphas_cumprod[t], self.args.snr_floor, self.args.snr_gamma)
        loss = (weight * F.mse_loss(pred.float(), noise.float(), reduction="none").mean((1, 2, 3))).mean()
        if self.args.token_loss:
            embeddings = self.accelerator.unwrap_model(self.text_encoder).get_input_embeddings().weight
            loss = loss + self.args.token_loss * token_identity_loss(hidden, ids, embeddings,
                                                                     self.tokenizer.eos_token_id)
        return loss

    def pipeline(self):
        from diffusers import StableDiffusionPipeline

        unwrap = self.accelerator.unwrap_model
        return StableDiffusionPipeline(vae=self.vae_frozen, text_encoder=unwrap(self.text_encoder),
                                       tokenizer=self.tokenizer, unet=unwrap(self.unet),
                                       scheduler=models.sampling_scheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    @torch.no_grad()
    def evaluate(self, step):
        from .gate import attribute_accuracy

        pipe = self.pipeline()
        pipe.set_progress_bar_config(disable=True)
        was_training = [m.training for m in (pipe.unet, pipe.text_encoder)]
        pipe.unet.eval(), pipe.text_encoder.eval()
        try:
            if self._net is None:
                self._net = metric.load(self.args.metric)
            result = attribute_accuracy(pipe, n_prompts=self.args.eval_prompts, seeds=(0,), steps=20, net=self._net)
        finally:
            for m, w in zip((pipe.unet, pipe.text_encoder), was_training):
                m.train(w)
        return {"gate": result["accuracy"]}

    def finish(self, final):
        pipe = self.pipeline()
        pipe.save_pretrained(final, safe_serialization=True)


STAGES = {"vae": VAEStage, "unet": UNetStage}


def train(args) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    stage = STAGES[args.stage](args, accelerator)
    root = Path(args.output_dir) / args.stage
    root.mkdir(parents=True, exist_ok=True)
    modules = stage.modules()
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    prepared = accelerator.prepare(*modules.values(), optimizer)
    for name, module in zip(modules, prepared[:-1]):
        setattr(stage, name, module)
    optimizer = prepared[-1]
    emas = {name: EMAModel(accelerator.unwrap_model(m).parameters(), decay=args.ema_decay) for name, m in
            zip(modules, prepared[:-1])}
    for ema in emas.values():
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    start = 0
    found = checkpoints.checkpoints(root)
    if found and not args.restart:
        step_found, path = found[-1]
        accelerator.load_state(str(path))
        start = checkpoints.read_state(path)["global_step"]
        print(f"resumed {args.stage} from {path} (step {start})", flush=True)
    log = root / "log.jsonl"
    t0, done_since = time.time(), 0
    for step in range(start, args.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup, args.max_steps)
        loss = stage.loss(step)
        if not torch.isfinite(loss):
            raise SystemExit(f"loss is {loss.item()} at step {step}; resume from the last checkpoint with a lower --lr")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, ema in emas.items():
            ema.step(accelerator.unwrap_model(getattr(stage, name)).parameters())
        done = step + 1
        done_since += 1
        if done % args.log_every == 0 or done == args.max_steps:
            record = {"step": done, "loss": round(loss.item(), 5), "lr": optimizer.param_groups[0]["lr"],
                      "s_per_step": round((time.time() - t0) / done_since, 3)}
            if done % args.eval_every == 0 or done == args.max_steps:
                record.update(with_ema(stage, emas, lambda: stage.evaluate(done)))
            print(json.dumps(record), flush=True)
            with log.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        if done % args.checkpoint_every == 0 or done == args.max_steps:
            checkpoints.save(root, done, accelerator, {"stage": args.stage, "max_steps": args.max_steps},
                             total_limit=args.keep)
    final = root / "final"
    tmp = root / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with_ema(stage, emas, lambda: stage.finish(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    print(f"{args.stage} done: {final}", flush=True)
    return final


def with_ema(stage, emas, fn: Callable):
    """Run `fn` with the EMA weights swapped in, then restore the training weights."""
    for name, ema in emas.items():
        params = list(stage.accelerator.unwrap_model(getattr(stage, name)).parameters())
        ema.store(params)
        ema.copy_to(params)
    try:
        return fn()
    finally:
        for name, ema in emas.items():
            ema.restore(list(stage.accelerator.unwrap_model(getattr(stage, name)).parameters()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stage", choices=sorted(STAGES) + ["export"])
    p.add_argument("--output_dir", default="runs/toyworld")
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument("--snr_gamma", type=float, default=5.0)
    p.add_argument("--snr_floor", type=float, default=1.0,
                   help="unet: weigh each step's x0 error by clamp(SNR, floor, gamma) (0: Min-SNR-gamma); a floor "
                        "gives the noisiest steps, where the layout is decided, more weight than epsilon-MSE does "
                        "(1.0: v-prediction's weight there)")
    p.add_argument("--token_loss", type=float, default=0.1,
                   help="unet: weight of `token_identity_loss`, which keeps every caption word readable in the "
                        "text encoder's output")
    p.add_argument("--identifier_rate", type=float, default=0.1,
                   help="unet: fraction of captions whose first article is a random identifier (`sks red toy`), so "
                        "identifiers are distinct, weak-prior words for DreamBooth (`world.with_identifier`)")
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--eval_prompts", type=int, default=48)
    p.add_argument("--metric", default=None, help="unet: metric network folder for the evaluation (default: shipped)")
    p.add_argument("--latent_cache", type=int, default=100_000, help="unet: training scenes encoded once")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=25)
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--checkpoint_every", type=int, default=250)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints")
    p.add_argument("--to", default=None, help="export: the pipeline folder to write")
    args = p.parse_args(argv)
    defaults = {"vae": (6000, 1e-3), "unet": (16000, 1e-3)}.get(args.stage, (0, 0))
    args.max_steps = args.max_steps or defaults[0]
    args.lr = args.lr or defaults[1]
    return args


def export(args) -> Path:
    """The UNet stage's final pipeline as float16 safetensors in ``--to`` (the shipped folder)."""
    from diffusers import StableDiffusionPipeline

    source = Path(args.output_dir) / "unet" / "final"
    if not (source / "model_index.json").is_file():
        raise SystemExit(f"no pretrained pipeline at {source}; run the unet stage first")
    pipe = StableDiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32)
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        component.half()
    target = Path(args.to)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # float16 on disk, float32 when loaded: diffusers loads its models in float32 by default, transformers would
    # keep the text encoder's float16 and the pipeline would mix dtypes on a CPU
    config_path = tmp / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"exported {target} ({size / 2**20:.1f} MiB)")
    return target


def main(argv=None):
    args = parse_args(argv)
    if args.stage == "export":
        if not args.to:
            raise SystemExit("export needs --to DIR (e.g. toyworld/svdiff_toyworld/data/pipeline)")
        export(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
