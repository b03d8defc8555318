"""The benchmark scripts run and print their tables (numbers are never asserted: they are measurements)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts' own helpers (common, basis_memory)


@pytest.mark.parametrize("script,args,last", [
    ("train_step.py", ["--config", "tiny", "--warmup", "0", "--repeats", "1"], r"worst adapter ratio to floor: \d+\.\d\d"),
    ("svd_init.py", ["--config", "tiny"], r"\| randomised top-16"),
    ("inference.py", ["--steps", "2", "--repeats", "1"], r"\| exported LoRA, fused"),
    ("layer_step.py", ["--repeats", "2"], r"\| Conv2d 3x3 .*W' rebuilt in backward"),
    ("basis_memory.py", ["--config", "tiny"], r"\| one_sided "),
])
def test_benchmark_script_prints_its_table(script, args, last):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)] + args, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert re.match(last, lines[-1]), lines[-3:]
    assert any("ratio" in line or "cold s" in line for line in lines)


def test_train_step_plot_has_one_bar_per_row(tmp_path):
    from PIL import Image

    png = tmp_path / "steps.png"
    args = ["--config", "tiny", "--warmup", "0", "--repeats", "1", "--plot", str(png),
            "--skip", "full fine-tuning,naive svdiff,svdiff (U and V kept),svdiff (all one-sided),vectorfit,"
                      "svft plain,svft banded d=2,svfit r=16,svft banded r=4"]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py")] + args,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "ms" not in line
            and not line.startswith("| -")]
    img = Image.open(png).convert("RGB")
    column = [img.getpixel((175, y)) for y in range(img.height)]  # a column through the bars' left ends
    bars, inside = 0, False
    for pixel in column:
        colored = pixel != (255, 255, 255) and len(set(pixel)) > 1 or pixel == (90, 90, 90)
        bars += colored and not inside
        inside = colored
    assert bars == len(rows) == 4  # floor, PEFT LoRA, svdiff, svfit r=4


@pytest.mark.parametrize("storage", ["both", "one_sided"])
def test_basis_memory_counts_what_injection_stores(storage):
    """basis_memory.py's count (tail taken as empty) against the buffers an injected svdiff adapter holds: equal
    with both factors, a lower bound within the tail's share one-sided."""
    import torch

    import svdiff_tools as st
    from svdiff_tools.layer import SVDLayer

    from basis_memory import stored_elements
    from common import build_unet

    unet, _ = build_unet("tiny", "cpu", torch.float32)
    counted = sum(stored_elements(unet, storage).values())
    st.inject_adapter(unet, st.SVDAdapterConfig(method="svdiff", target_modules="unet", basis_storage=storage))
    bases = [b for m in unet.modules() if isinstance(m, SVDLayer) for b in m.bases.values()]
    stored = sum(t.numel() for b in bases for t in b.buffers())
    if storage == "both":
        assert stored == counted
    else:
        assert all(b.head > 0 for b in bases) and counted <= stored < 1.15 * counted


def test_cpu_peak_counts_new_storages_only():
    """PeakBytes (the CPU memory column) counts what a step allocates: a frozen stack's backward keeps
    activations only (views of the weights, such as ``W.t()``, are not new memory); with weight gradients the
    step allocates one weight-sized gradient per layer."""
    import torch

    from common import PeakBytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256, bias=False) for _ in range(4)]).requires_grad_(False)
    x = torch.randn(8, 256, requires_grad=True)
    weights = 4 * 256 * 256 * 4
    with PeakBytes() as frozen:
        model(x).sum().backward()
    assert frozen.peak < 0.05 * weights
    model.requires_grad_(True)
    with PeakBytes() as full:
        model(x).sum().backward()
    assert weights <= full.peak < 1.1 * weights
