"""Shared pieces of the benchmarks: UNet configs of the real architectures, timing and memory."""

from __future__ import annotations

import statistics
import time
import weakref
from typing import Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are the SD-1.5 layout
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)


def build_unet(config: str, device: str, dtype: torch.dtype, seed: int = 0):
    """(unet, make_inputs(batch, resolution)) with random weights of the real architecture."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if config == "tiny":
        from svdiff_trainer.tiny import tiny_pipeline

        unet = tiny_pipeline("sd15").unet
    else:
        unet = UNet2DConditionModel(**(SD15_UNET if config == "sd15" else SDXL_UNET))
    unet = unet.to(device=device).eval()
    if dtype != torch.float32:
        unet = unet.to(dtype=dtype)
    cfg = unet.config
    sdxl = cfg.addition_embed_type == "text_time"

    def make_inputs(batch: int, resolution: int):
        g = torch.Generator().manual_seed(1)
        latents = torch.randn(batch, cfg.in_channels, resolution // 8, resolution // 8, generator=g)
        text = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
        extra = {}
        if sdxl:
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, 1280, generator=g).to(device, dtype),
                "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                         device=device, dtype=dtype)}
        return (latents.to(device, dtype), torch.full((batch,), 500, device=device),
                text.to(device, dtype), extra)

    return unet, make_inputs


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(step: Callable[[], None], device: str, warmup: int, repeats: int) -> tuple[float, Optional[float]]:
    """(median ms, peak GiB or None on the CPU) of ``step``."""
    for _ in range(warmup):
        step()
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return statistics.median(times), peak


def table(rows: list, columns: list) -> str:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "| " + " | ".join("-" * w for w in widths) + " |"] + [line(r) for r in rows])


class PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the context (every op's outputs, by storage, freed when the
    storage dies: saved activations, rebuilt weights, gradients, temporaries). An output that shares its
    storage with one of the op's inputs (a view such as ``W.t()``, an in-place op) allocates nothing and is not
    counted. A CPU stand-in for ``torch.cuda.max_memory_allocated``; it slows the ops down, so it runs on its
    own step, untimed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes = {}

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._sizes:
            return
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._track(t)
        return out


def resident_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (weights, buffers, optimizer state)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def cpu_peak_gib(step: Callable[[], None], resident: Callable[[], Iterable[torch.Tensor]]) -> float:
    """Resident model + optimizer bytes, plus the peak of one step's own allocations, in GiB."""
    base = resident_bytes(resident())
    with PeakBytes() as tracker:
        step()
    return (base + tracker.peak) / 2**30
