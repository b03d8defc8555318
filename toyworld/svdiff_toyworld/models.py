"""Configs of the toy-world pipeline's models (the shapes are part of the shipped pipeline)."""

from __future__ import annotations


def vae():
    """AutoencoderKL, 64x64x3 <-> 16x16x4 (two downsamplings), 0.68 M parameters."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64)


def unet():
    """UNet2DConditionModel on 16x16x4 latents, SDXL's arrangement on three levels: resnets only at 16x16,
    cross-attention transformer blocks at 8x8 and 4x4 and in the mid block, text width 128; 6.7 M parameters.
    Attention at 16x16 as well (SD-1.5's arrangement) took 1.01 s per batch-32 training step on this CPU
    against 0.52 s for this one."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128),
                                layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32)


TEXT_WIDTH = 128


def text_encoder(vocab_size: int, bos_id: int, eos_id: int):
    """A 3-layer CLIPTextModel (width 128) over the toy world's vocabulary; 77 positions as SD's."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=512,
                                        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=bos_id, eos_token_id=eos_id,
                                        pad_token_id=eos_id, projection_dim=TEXT_WIDTH))


def noise_scheduler_config() -> dict:
    """Stable Diffusion 1.x's noise schedule (scaled-linear betas, epsilon prediction), for DDPM training."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", steps_offset=1, clip_sample=False)


def sampling_scheduler():
    """The shipped pipeline's scheduler: DDIM with SD 1.x's schedule (DDPM, Euler and the others load from its
    config with ``from_config``)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**noise_scheduler_config(), set_alpha_to_one=False)
