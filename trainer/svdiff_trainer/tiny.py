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
from typing import List, Optional

import torch

KINDS = ("sd15", "sd2", "sdxl", "sd3", "flux")
VOCAB_SIZE = 514
BOS_ID, EOS_ID = 512, 513


def bytes_to_unicode() -> List[str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode table."""
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
    chars = bytes_to_unicode()
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


def tiny_t5_tokenizer():
    """A real `T5TokenizerFast` over single characters (a `tokenizers` word-level model, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _flow_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def _tiny_flow_pipeline(kind: str):
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import T5Config, T5EncoderModel

    if kind == "sd3":  # two CLIP encoders; the optional T5 left out (the pipeline pads with zeros)
        transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                            joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
        return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                        vae=_flow_vae(4), text_encoder=_text_encoder(True), tokenizer=tiny_tokenizer(),
                                        text_encoder_2=_text_encoder(True), tokenizer_2=tiny_tokenizer(),
                                        text_encoder_3=None, tokenizer_3=None)
    t5 = T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(1), text_encoder=_text_encoder(False),
                        tokenizer=tiny_tokenizer(), text_encoder_2=t5, tokenizer_2=tiny_t5_tokenizer(),
                        transformer=transformer)


def tiny_pipeline(kind: str = "sd15", seed: int = 0):
    """A randomly initialised pipeline: sd15 (epsilon), sd2 (v-prediction, linear projections), sdxl, sd3 and
    flux (flow matching; run Flux with a short ``max_sequence_length``)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    torch.manual_seed(seed)
    pipe = _tiny_flow_pipeline(kind) if kind in ("sd3", "flux") else _tiny_sd_pipeline(kind)
    for component in pipe.components.values():  # as from_pretrained leaves them: no dropout
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _tiny_sd_pipeline(kind: str):
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

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
                              set_alpha_to_one=False, steps_offset=1,
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
