"""The DreamBooth loss of one batch: the denoising loss on the instance images, plus the prior-preservation
loss on the class images.

    loss = w(t) * || eps_theta(z_t, t, c_instance) - target ||^2 + prior_weight * || ... (class) ... ||^2

with ``z = scaling_factor * E(x)`` (sampled from the VAE posterior, or from cached posterior statistics),
``z_t = sqrt(a_t) z + sqrt(1 - a_t) eps``, ``target = eps`` (epsilon models) or the velocity (v-prediction), and
``w(t) = min(SNR(t), gamma) / SNR(t)`` (Min-SNR, ``--snr_gamma``; times ``SNR / (SNR + 1)`` for v-prediction) or 1.
Every random draw comes from the generator passed in, so a resumed run repeats it.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F


class DreamBoothLoss:
    def __init__(self, args, base, encode_prompts, device, prompt_cache: Optional[Dict] = None,
                 latent_cache: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None):
        """base: `BaseModels`; encode_prompts: prompts -> (embeddings, pooled); prompt_cache: {"instance",
        "class"} -> encoded prompt (frozen text encoders); latent_cache: part -> (posterior mean, std)."""
        self.args, self.base, self.encode, self.device = args, base, encode_prompts, device
        self.prompt_cache, self.latent_cache = prompt_cache, latent_cache
        self.parts = ["instance"] + (["class"] if args.with_prior_preservation else [])
        res = args.resolution
        self.time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=base.weight_dtype, device=device)

    def latents(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        base = self.base
        if self.latent_cache is not None:  # stored mean/std of each image: sample as the VAE would
            keys = batch["index"].tolist()
            mean = torch.cat([self.latent_cache[part][0][keys] for part in self.parts])
            std = torch.cat([self.latent_cache[part][1][keys] for part in self.parts])
            latents = (mean + std * torch.randn(mean.shape, generator=gen)).to(self.device, base.weight_dtype)
        else:
            pixels = batch["pixel_values"]
            if self.args.with_prior_preservation:
                pixels = torch.cat([pixels, batch["class_pixel_values"]])
            with torch.no_grad():
                latents = base.vae.encode(pixels.to(self.device, base.weight_dtype)).latent_dist.sample(gen)
        return latents * base.vae.config.scaling_factor

    def conditioning(self, n_instance: int) -> dict:
        """UNet keyword arguments for ``n_instance`` instance (and as many class) items."""
        args, sdxl = self.args, self.base.sdxl
        if self.prompt_cache is not None:
            parts = [self.prompt_cache[p] for p in self.parts]
            embeds = torch.cat([e.expand(n_instance, -1, -1) for e, _ in parts])
            pooled = torch.cat([p.expand(n_instance, -1) for _, p in parts]) if sdxl else None
        else:
            prompts = [args.instance_prompt] * n_instance + ([args.class_prompt] * n_instance
                                                             if args.with_prior_preservation else [])
            embeds, pooled = self.encode(prompts)
        out = {"encoder_hidden_states": embeds.to(self.base.weight_dtype)}
        if sdxl:
            out["added_cond_kwargs"] = {"text_embeds": pooled.to(self.base.weight_dtype),
                                        "time_ids": self.time_ids.expand(embeds.shape[0], -1)}
        return out

    def __call__(self, unet, batch: dict, gen: torch.Generator) -> torch.Tensor:
        args, scheduler = self.args, self.base.noise_scheduler
        latents = self.latents(batch, gen)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        if args.noise_offset:
            noise = noise + args.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen).to(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=gen).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, **self.conditioning(batch["pixel_values"].shape[0])).sample
        velocity = scheduler.config.prediction_type == "v_prediction"
        target = scheduler.get_velocity(latents, noise, timesteps) if velocity else noise
        prior_loss = None
        if args.with_prior_preservation:
            pred, pred_prior = pred.chunk(2)
            target, target_prior = target.chunk(2)
            prior_loss = F.mse_loss(pred_prior.float(), target_prior.float())
        if args.snr_gamma is None:
            loss = F.mse_loss(pred.float(), target.float())
        else:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(scheduler, timesteps[: pred.shape[0]])
            w = torch.minimum(snr, args.snr_gamma * torch.ones_like(snr)) / snr
            if velocity:
                w = w * snr / (snr + 1)
            loss = (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        return loss if prior_loss is None else loss + args.prior_loss_weight * prior_loss
