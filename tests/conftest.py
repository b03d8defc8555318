"""Shared fixtures: tiny models of the real architectures, built from configs, and the method matrix.

Every method configuration in `METHOD_CASES` runs through every model in `MODEL_CASES` in
`test_methods_suite.py`; adding a method or a model here gives it the whole suite.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="session")
def _hermetic_svd_cache(tmp_path_factory):
    """Decompositions are cached in a per-run folder, never in the user's home."""
    old = os.environ.get("SVDIFF_TOOLS_CACHE")
    os.environ["SVDIFF_TOOLS_CACHE"] = str(tmp_path_factory.mktemp("svd_cache"))
    yield
    if old is None:
        os.environ.pop("SVDIFF_TOOLS_CACHE", None)
    else:
        os.environ["SVDIFF_TOOLS_CACHE"] = old


# ------------------------------------------------------------------------------------ models
@dataclass
class ModelCase:
    """A model factory plus a fixed input and a forward that returns one float tensor."""

    name: str
    build: Callable[[int], nn.Module]  # seed -> fresh model (float32, eval mode)
    inputs: Callable[[], tuple]
    targets: object  # target_modules for this model
    forward: Callable[[nn.Module, tuple], torch.Tensor] = lambda m, x: m(*x)

    def run(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return self.forward(model, self.inputs())


def _seeded(fn):
    def build(seed: int = 0):
        torch.manual_seed(seed)
        return fn().eval()
    return build


def _linear_model():
    return nn.Sequential(nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 20), nn.LayerNorm(20))


def _conv_model():
    return nn.Sequential(nn.Conv2d(6, 12, 3, padding=1), nn.GroupNorm(3, 12), nn.SiLU(),
                         nn.Conv2d(12, 8, 3, padding=1, stride=2))


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )


def _tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_hidden_layers=2, vocab_size=64, max_position_embeddings=16))


def _embedding_model():
    return nn.Sequential(nn.Embedding(30, 12), nn.Linear(12, 8))


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16,
                                attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


MODEL_CASES = [
    ModelCase("linear", _seeded(_linear_model), lambda: (torch.randn(5, 24, generator=_gen(1)),), None),
    ModelCase("conv2d", _seeded(_conv_model), lambda: (torch.randn(2, 6, 7, 7, generator=_gen(2)),), None),
    ModelCase(
        "unet", _seeded(_tiny_unet),
        lambda: (torch.randn(1, 4, 8, 8, generator=_gen(3)), torch.tensor([10]),
                 torch.randn(1, 5, 16, generator=_gen(4))),
        "unet",
        lambda m, x: m(x[0], x[1], encoder_hidden_states=x[2]).sample,
    ),
    ModelCase(
        "clip_text", _seeded(_tiny_clip), lambda: (torch.randint(0, 64, (2, 7), generator=_gen(5)),),
        "text-encoder", lambda m, x: m(input_ids=x[0]).last_hidden_state,
    ),
    # nn.Embedding as a target (the token table itself is decomposed)
    ModelCase("embedding", _seeded(_embedding_model), lambda: (torch.randint(0, 30, (3, 5), generator=_gen(6)),),
              ["0", "1"]),
    # transformers' GPT-2 Conv1D layers, which store their weight as (in, out)
    ModelCase("gpt2_conv1d", _seeded(_tiny_gpt2), lambda: (torch.randint(0, 40, (2, 6), generator=_gen(7)),),
              "all-linear", lambda m, x: m(input_ids=x[0]).last_hidden_state),
]


# ------------------------------------------------------------------------------------ methods
# The default storage keeps both factors on these small models (below SVDBasis.AUTO_MIN_NUMEL); the
# "one_sided" cases run one-sided bases (U or V derived from W) through the same checks.
METHOD_CASES = {
    "svdiff": dict(method="svdiff"),
    "svdiff_norms": dict(method="svdiff", train_norms=True, basis_storage="one_sided"),
    "svfit_r3": dict(method="svfit", rank=3, svd_driver="full"),
    "svfit_energy": dict(method="svfit", rank=0.6),
    "svft_plain": dict(method="svft", svft_pattern="plain"),
    "svft_banded": dict(method="svft", svft_pattern="banded", svft_offset=2, basis_storage="one_sided"),
    "svft_random": dict(method="svft", svft_pattern="random", svft_offset=1, svft_seed=7),
    "svft_top_k": dict(method="svft", svft_pattern="top_k", svft_offset=1, basis_storage="one_sided"),
    "svft_truncated": dict(method="svft", svft_pattern="banded", svft_offset=1, rank=4, svd_driver="full"),
    "vectorfit": dict(method="vectorfit", basis_storage="one_sided"),
}


@pytest.fixture(params=MODEL_CASES, ids=[c.name for c in MODEL_CASES])
def model_case(request) -> ModelCase:
    return request.param


@pytest.fixture(params=list(METHOD_CASES), ids=list(METHOD_CASES))
def method_kwargs(request) -> dict:
    return dict(METHOD_CASES[request.param])


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# Files only the full suite runs (`scripts/test.sh --fast` leaves them out: `-m "not full"`): whole trainer and
# pipeline runs, the toy world's pretraining chain and main job, the benchmarks' smoke runs, wheels built from the
# tree. What stays is the edit loop: every method through the shared suite, the core, the file format, PEFT.
FULL_ONLY = {
    "test_trainer.py", "test_trainer_runs.py", "test_trainer_reliability.py", "test_toyworld_pretrain.py",
    "test_quality_benchmark.py", "test_features_benchmark.py", "test_svdiff_features.py",
    "test_text_classification.py", "test_pipelines.py", "test_generate.py", "test_pipeline_runtime.py",
    "test_architecture.py", "test_benchmarks.py",
}


def pytest_collection_modifyitems(config, items):
    """Files in `FULL_ONLY` are marked ``full``; GPU-only tests (marked ``gpu``) are skipped where no CUDA device
    exists, e.g. in CI."""
    for item in items:
        if item.path.name in FULL_ONLY:
            item.add_marker(pytest.mark.full)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
