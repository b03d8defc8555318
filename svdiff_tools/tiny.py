"""Tiny Stable Diffusion pipelines of the real architectures, built from configs (random weights).

They run offline on a CPU in seconds: the test suite, the benchmarks' CPU column and the trainer's
embedded default use them. `tiny_pipeline_path` saves one with `save_pretrained` (once, cached), so it
loads through the normal `from_pretrained` path like any hub model.

The tokenizer is a real `CLIPTokenizer` over a byte-level vocabulary with no merges: every character is
a token (514 ids: 256 byte symbols, each also with the end-of-word mark, then BOS and EOS).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

KINDS = ("sd15", "sd2", "sdxl")
VOCAB_SIZE = 514
BOS_ID, EOS_ID = 512, 513


def _bytes_to_unicode() -> list:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt for the byte-level character tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    folder = write_tokenizer_files(Path(tempfile.mkdtemp(prefix="svdiff_tok_")))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")


def _text_encoder(projection: bool, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, hidden_size=hidden,
                            intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=VOCAB_SIZE, hidden_act="gelu", projection_dim=32, max_position_embeddings=77)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32)


def tiny_pipeline(kind: str = "sd15", seed: int = 0):
    """A randomly initialised pipeline: sd15 (epsilon), sd2 (v-prediction, linear projections), sdxl."""
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    torch.manual_seed(seed)
    common = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    if kind == "sdxl":
        unet = UNet2DConditionModel(**common, attention_head_dim=(2, 4), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                    cross_attention_dim=64)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="leading", steps_offset=1)
        return StableDiffusionXLPipeline(vae=_vae(), text_encoder=_text_encoder(False),
                                         text_encoder_2=_text_encoder(True), tokenizer=tiny_tokenizer(),
                                         tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=scheduler)
    unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=(2, 4) if kind == "sd2" else 8,
                                use_linear_projection=kind == "sd2")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False,
                              prediction_type="v_prediction" if kind == "sd2" else "epsilon")
    return StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(False), tokenizer=tiny_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_pipeline_path(kind: str = "sd15", cache_dir: Optional[os.PathLike] = None) -> Path:
    """A saved tiny pipeline folder (built once, then reused), loadable with `from_pretrained`."""
    root = Path(cache_dir or os.environ.get("SVDIFF_TOOLS_TINY_DIR")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "svdiff-tools" / "tiny")
    folder = root / f"tiny-{kind}"
    if (folder / "model_index.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tiny-{kind}-"))
    tiny_pipeline(kind).save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder
