"""VectorFit's Adaptive Vector Freezing as a transformers `TrainerCallback`."""

from __future__ import annotations

import json
import os

import torch
from transformers import TrainerCallback

from ..avf import AdaptiveVectorFreezing

STATE_FILE = "svdiff_avf.json"


class AVFCallback(TrainerCallback):
    """``Trainer(..., callbacks=[AVFCallback()])``: attaches AVF to the trainer's optimizer when training begins
    (k, interval and metric from the adapter's config) and steps it after every optimizer step. Its state (step
    count, frozen vectors) goes into each checkpoint folder (``svdiff_avf.json``) and comes back on a resume;
    training strengths are measured from zero, where every VectorFit delta starts."""

    def __init__(self, adapter_name: str = "default"):
        self.adapter_name = adapter_name
        self.avf = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        config = model.peft_config[self.adapter_name]
        vectors = {n: p for n, p in model.named_parameters() if p.requires_grad and f".{self.adapter_name}." in n}
        self.avf = AdaptiveVectorFreezing(vectors, config.avf_k, config.avf_interval, config.avf_metric)
        self.avf.initial = {n: torch.zeros_like(p) for n, p in vectors.items()}
        saved = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if state.global_step and os.path.isfile(saved):
            with open(saved) as fh:
                self.avf.load_state_dict(json.load(fh))
        self.avf.attach(optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        if self.avf is not None:
            self.avf.step()

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.avf is not None and os.path.isdir(folder):
            with open(os.path.join(folder, STATE_FILE), "w") as fh:
                json.dump({"steps": self.avf.steps, "frozen": list(self.avf.frozen)}, fh)
