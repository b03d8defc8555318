"""The benchmark scripts run and print their tables (numbers are never asserted: they are measurements)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,args,last", [
    ("train_step.py", ["--config", "tiny", "--warmup", "0", "--repeats", "1"], r"worst adapter ratio to floor: \d+\.\d\d"),
    ("svd_init.py", ["--config", "tiny"], r"\| randomised top-16"),
    ("inference.py", ["--steps", "2", "--repeats", "1"], r"\| exported LoRA, fused"),
])
def test_benchmark_script_prints_its_table(script, args, last):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)] + args, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert re.match(last, lines[-1]), lines[-3:]
    assert any("ratio" in line or "cold s" in line for line in lines)
