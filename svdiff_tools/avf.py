"""VectorFit's Adaptive Vector Freezing (AVF) as a small training callback.

Every ``interval`` optimizer steps the callback measures each trainable vector's *training strength*,
its change since initialisation (``mean_abs``: mean |v - v0|; ``rms``; ``max_abs``), and freezes the
``k`` strongest vectors for the next interval (those frozen before are released). A frozen vector's
gradient is set to None right before every optimizer step, so PyTorch optimizers skip it entirely:
no gradient step, no momentum or state update, no weight decay. It stays bit-equal while frozen.

    avf = AdaptiveVectorFreezing.from_model(model)     # k, interval, metric from the adapter's config
    avf.attach(optimizer)                               # step pre-hook (works through Accelerate's wrapper)
    for batch in loader:
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        avf.step()                                      # once per real optimizer step
"""

from __future__ import annotations

from typing import Dict, List, Optional

from torch import nn

from .model import adapter_configs, adapter_parameters

METRICS = {
    "mean_abs": lambda d: float(d.abs().mean()) if d.numel() else 0.0,
    "rms": lambda d: float(d.pow(2).mean().sqrt()) if d.numel() else 0.0,
    "max_abs": lambda d: float(d.abs().max()) if d.numel() else 0.0,
}


class AdaptiveVectorFreezing:
    def __init__(self, vectors: Dict[str, nn.Parameter], k: int, interval: int, metric: str = "mean_abs"):
        if metric not in METRICS:
            raise ValueError(f"avf_metric={metric!r} is not supported; choose one of {', '.join(METRICS)}.")
        self.vectors = dict(vectors)
        self.k = int(k)
        self.interval = int(interval)
        self.metric = metric
        self.initial = {n: p.detach().clone() for n, p in self.vectors.items()}
        self.frozen: List[str] = []
        self.steps = 0
        self._hooks = []

    @classmethod
    def from_model(cls, model: nn.Module, adapter_name: str = "default", k: Optional[int] = None,
                   interval: Optional[int] = None, metric: Optional[str] = None) -> "AdaptiveVectorFreezing":
        config = adapter_configs(model)[adapter_name]
        return cls(adapter_parameters(model, adapter_name), config.avf_k if k is None else k,
                   config.avf_interval if interval is None else interval, metric or config.avf_metric)

    def strengths(self) -> Dict[str, float]:
        fn = METRICS[self.metric]
        return {n: fn(p.detach() - self.initial[n]) for n, p in self.vectors.items()}

    def mask_gradients(self) -> None:
        for n in self.frozen:
            self.vectors[n].grad = None

    def attach(self, optimizer) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        self._hooks.append(inner.register_step_pre_hook(lambda *_: self.mask_gradients()))

    def step(self) -> None:
        self.steps += 1
        if self.k > 0 and self.steps % self.interval == 0:
            self.refreeze()

    def refreeze(self) -> List[str]:
        s = self.strengths()
        ranked = sorted(s, key=lambda n: (-s[n], n))
        self.frozen = ranked[: self.k]
        return self.frozen

    def state_dict(self) -> dict:
        return {"steps": self.steps, "frozen": list(self.frozen),
                "initial": {n: t.cpu() for n, t in self.initial.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.frozen = [n for n in state["frozen"] if n in self.vectors]
        for n, t in state.get("initial", {}).items():
            if n in self.initial:
                self.initial[n] = t.to(self.initial[n].device)
