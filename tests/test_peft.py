"""Issue 16: the PEFT route. svdiff/svfit/svft/vectorfit registered with PEFT: get_peft_model, save_pretrained /
PeftModel.from_pretrained, merge_and_unload, disable_adapter, several adapters, LoRA conversion, the transformers
Trainer with checkpoints and resume (AVF as a callback), and the conversion to `save_adapter` files."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import svdiff_tools as st
import svdiff_tools.peft as sp
from svdiff_tools.peft.layer import SVDTunerLayer

CASES = {
    "svdiff": dict(),
    "svfit": dict(rank=3),
    "svft": dict(svft_pattern="banded", svft_offset=1),
    "vectorfit": dict(),
}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(12, 12)
        self.value = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x, labels=None):
        logits = self.head(torch.tanh(self.query(x)) + self.value(x))
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _base(seed=0):
    torch.manual_seed(seed)
    return Tiny().eval()


def _config(method, **extra):
    return sp.CONFIGS[method](target_modules=["query", "value"], **CASES[method], **extra)


def _randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


X = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", list(CASES))
def test_the_peft_route_round_trips(method, tmp_path):
    base = _base()
    model = get_peft_model(copy.deepcopy(base), _config(method))
    with torch.no_grad():
        assert torch.equal(model(X), base(X))  # identity at init
    core = copy.deepcopy(base)
    st.inject_adapter(core, _config(method).core())
    assert model.get_nb_trainable_parameters()[0] == st.count_parameters(core)[0]
    _randomize(model)
    with torch.no_grad():
        out = model(X)
        assert (out - base(X)).abs().max() > 1e-3
        with model.disable_adapter():
            assert torch.allclose(model(X), base(X), atol=1e-6)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(X), out, atol=1e-6)
    plain = sp.save_as_svd_adapter(model, tmp_path / "svd_adapter.safetensors")
    other = copy.deepcopy(base)
    st.load_adapter(other, plain)
    with torch.no_grad():
        assert torch.allclose(other(X), out, atol=1e-6)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SVDTunerLayer) for m in merged.modules())
    with torch.no_grad():
        assert torch.allclose(merged(X), out, atol=1e-5)


def test_several_adapters_and_set_adapter():
    base = _base()
    model = get_peft_model(copy.deepcopy(base), _config("svdiff"))
    _randomize(model, 1)
    model.add_adapter("b", _config("svdiff"))
    model.set_adapter("b")
    assert all(".b." in n for n, p in model.named_parameters() if p.requires_grad)
    _randomize(model, 2)
    with torch.no_grad():
        out_b = model(X)
        model.set_adapter("default")
        out_a = model(X)
    assert (out_a - out_b).abs().max() > 1e-3
    single = copy.deepcopy(base)
    st.inject_adapter(single, _config("svdiff").core())
    layer_a = model.base_model.model.query
    assert set(layer_a.core.svd_adapters) == {"default", "b"}


def test_a_foreign_base_model_is_refused(tmp_path):
    model = get_peft_model(_base(0), _config("svft"))
    model.save_pretrained(tmp_path)
    with pytest.raises(st.SVDAdapterFileError, match="trained on another base model"):
        PeftModel.from_pretrained(_base(1), tmp_path)


def test_lora_conversion_through_peft(tmp_path):
    from peft.tuners.lora.conversion import convert_to_lora

    base = _base()
    model = get_peft_model(copy.deepcopy(base), _config("svfit"))
    _randomize(model)
    config, state = convert_to_lora(model, rank=12)
    lora = get_peft_model(copy.deepcopy(base), config)
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(lora, state)
    with torch.no_grad():
        assert torch.allclose(lora(X), model(X), atol=1e-5)


def test_the_verbs_diffusers_calls_on_tuner_layers():
    base = _base()
    model = get_peft_model(copy.deepcopy(base), _config("svdiff"))
    _randomize(model)
    layer = model.base_model.model.query
    with torch.no_grad():
        full = layer(X)
        base_out = base.query(X)
        layer.scale_layer(0.5)
        half = layer(X)
        layer.unscale_layer()
        assert torch.allclose(layer(X), full)
        layer.set_scale("default", 0.5)
        assert torch.allclose(layer(X), half, atol=1e-6)
        assert torch.allclose(half - base_out, 0.5 * (full - base_out), atol=1e-5)
        layer.merge(safe_merge=True, adapter_names=["default"])
        assert layer.merged and torch.allclose(layer(X), half, atol=1e-5)
        layer.unmerge()
        assert not layer.merged and torch.allclose(layer(X), half, atol=1e-5)


def test_modules_to_save_train_in_full_and_round_trip(tmp_path):
    """A classifier head named in ``modules_to_save`` (what a SEQ_CLS task adds) trains beside the adapter, is
    saved with it, and comes back; the standalone file format, which has no place for it, refuses it."""
    model = get_peft_model(_base(), _config("svft", modules_to_save=["head"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("head.modules_to_save.default.weight" in n for n in trainable)
    assert sum("svft_adapters" in n for n in trainable) == 2
    _randomize(model)
    with torch.no_grad():
        out = model(X)
        assert (out - _base()(X)).abs().max() > 1e-2
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(_base(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), out, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="modules_to_save"):
        sp.save_as_svd_adapter(model, tmp_path / "b.safetensors")


def test_trainer_trains_checkpoints_and_resumes(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = [{"x": X[i % 5], "labels": torch.tensor(i % 3)} for i in range(24)]

    def collate(items):
        return {"x": torch.stack([it["x"] for it in items]), "labels": torch.stack([it["labels"] for it in items])}

    class StopAt(TrainerCallback):  # an interruption after the checkpoint of step 3
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    def run(out, resume=None, stop=False):
        model = get_peft_model(_base(), _config("vectorfit", avf_k=2, avf_interval=2))
        args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
                                 learning_rate=5e-2, save_steps=3, logging_steps=100, report_to=[], seed=7,
                                 use_cpu=True, remove_unused_columns=False)
        callback = sp.AVFCallback()
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                          callbacks=[callback] + ([StopAt()] if stop else []))
        trainer.train(resume_from_checkpoint=resume)
        return model, callback

    straight, cb = run(tmp_path / "a")
    assert cb.avf.steps == 6 and len(cb.avf.frozen) == 2
    run(tmp_path / "b", stop=True)
    resumed, cb2 = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-3"))
    assert cb2.avf.steps == 6 and cb2.avf.frozen == cb.avf.frozen
    a = {n: p for n, p in straight.named_parameters() if p.requires_grad or "vectorfit_" in n}
    b = dict(resumed.named_parameters())
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    with torch.no_grad():
        assert (straight(X) - _base()(X)).abs().max() > 1e-3


def test_registration_is_idempotent_and_a_fresh_process_without_it_gets_one_sentence(tmp_path):
    sp.register()
    sp.register()
    model = get_peft_model(_base(), _config("svft"))
    model.save_pretrained(tmp_path)
    code = textwrap.dedent(f"""
        import torch
        from torch import nn
        from peft import PeftModel
        base = nn.Module()
        try:
            PeftModel.from_pretrained(base, r"{tmp_path}")
        except Exception as exc:
            print(type(exc).__name__, exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "import svdiff_tools.peft before loading it" in result.stdout, result.stdout + result.stderr[-2000:]
