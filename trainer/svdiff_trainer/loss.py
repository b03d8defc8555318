"""The DreamBooth loss of one batch: the denoising loss on the instance images, plus the prior-preservation
loss on the class images.

    loss = w(t) * || eps_theta(z_t, t, c_instance) - target ||^2 + prior_weight * || ... (class) ... ||^2

with ``z = scaling_factor * E(x)`` (sampled from the VAE posterior, or from cached posterior statistics),
``z_t = sqrt(a_t) z + sqrt(1 - a_t) eps``, ``target = eps`` (epsilon models) or the velocity (v-prediction), and
``w(t) = min(SNR(t), gamma) / SNR(t)`` (Min-SNR, ``--snr_gamma``; times ``SNR / (SNR + 1)`` for v-prediction) or 1;
with Cut-Mix training plus ``unmix_weight`` times SVDiff's unmix term (`unmix.py`). Each item brings its own prompt.
Every random draw comes from the generator passed in, so a resumed run repeats it.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F


class DreamBoothLoss:
    def __init__(self, cfg, base, encode_prompts, device, cache_prompts: bool = True,
                 latent_cache: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None, unmix=None,
                 tokenizer=None):
        """base: `BaseModels`; encode_prompts: prompts -> (embeddings, pooled); cache_prompts: the text encoders
        are frozen, so each distinct prompt is embedded once; latent_cache: part -> (posterior mean, std);
        unmix: an `unmix.UnmixRecorder` installed in the UNet's cross-attention (Cut-Mix training), with the
        tokenizer that places the identifiers."""
        self.cfg, self.base, self.encode, self.device = cfg, base, encode_prompts, device
        self.prompt_cache = {} if cache_prompts else None
        self.latent_cache, self.unmix, self.tokenizer = latent_cache, unmix, tokenizer
        self.parts = ["instance"] + (["class"] if cfg.data.with_prior_preservation else [])
        res = cfg.data.resolution
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
            if self.cfg.data.with_prior_preservation:
                pixels = torch.cat([pixels, batch["class_pixel_values"]])
            with torch.no_grad():
                latents = base.vae.encode(pixels.to(self.device, base.weight_dtype)).latent_dist.sample(gen)
        return latents * base.vae.config.scaling_factor

    def embed(self, prompts):
        """(embeddings, pooled or None) of ``prompts``: encoded each step when the text encoders train, else
        looked up per distinct prompt (embedded once, without gradients)."""
        if self.prompt_cache is None:
            return self.encode(prompts)
        for p in prompts:
            if p not in self.prompt_cache:
                with torch.no_grad():
                    self.prompt_cache[p] = self.encode([p])
        embeds = torch.cat([self.prompt_cache[p][0] for p in prompts])
        pooled = torch.cat([self.prompt_cache[p][1] for p in prompts]) if self.base.sdxl else None
        return embeds, pooled

    def conditioning(self, batch: dict) -> dict:
        """UNet keyword arguments for the batch's instance (and class) items."""
        prompts = list(batch["prompts"]) + (list(batch["class_prompts"]) if self.cfg.data.with_prior_preservation
                                            else [])
        embeds, pooled = self.embed(prompts)
        out = {"encoder_hidden_states": embeds.to(self.base.weight_dtype)}
        if self.base.sdxl:
            out["added_cond_kwargs"] = {"text_embeds": pooled.to(self.base.weight_dtype),
                                        "time_ids": self.time_ids.expand(embeds.shape[0], -1)}
        return out

    def unmix_entries(self, batch: dict):
        """(batch index, left identifier's token positions, right identifier's) of the mixed items."""
        from .unmix import identifier_positions

        return [(i, identifier_positions(self.tokenizer, batch["prompts"][i], mix[0]),
                 identifier_positions(self.tokenizer, batch["prompts"][i], mix[1]))
                for i, mix in enumerate(batch["mix"]) if mix]

    def __call__(self, unet, batch: dict, gen: torch.Generator) -> torch.Tensor:
        cfg, scheduler = self.cfg, self.base.noise_scheduler
        latents = self.latents(batch, gen)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        if cfg.optim.noise_offset:
            noise = noise + cfg.optim.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen).to(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=gen).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if self.unmix is not None:
            self.unmix.begin(self.unmix_entries(batch), tuple(latents.shape[-2:]))
        pred = unet(noisy, timesteps, **self.conditioning(batch)).sample
        unmix = self.unmix.end() if self.unmix is not None else None
        velocity = scheduler.config.prediction_type == "v_prediction"
        target = scheduler.get_velocity(latents, noise, timesteps) if velocity else noise
        prior_loss = None
        if cfg.data.with_prior_preservation:
            pred, pred_prior = pred.chunk(2)
            target, target_prior = target.chunk(2)
            prior_loss = F.mse_loss(pred_prior.float(), target_prior.float())
        if cfg.optim.snr_gamma is None:
            loss = F.mse_loss(pred.float(), target.float())
        else:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(scheduler, timesteps[: pred.shape[0]])
            w = torch.minimum(snr, cfg.optim.snr_gamma * torch.ones_like(snr)) / snr
            if velocity:
                w = w * snr / (snr + 1)
            loss = (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        if prior_loss is not None:
            loss = loss + cfg.data.prior_loss_weight * prior_loss
        return loss if unmix is None else loss + cfg.data.unmix_weight * unmix
