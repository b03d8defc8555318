"""The layout the architecture promises: the core never imports diffusers or the integration packages,
`import svdiff_tools` works without diffusers and patches nothing, and `import svdiff_tools.diffusers` (the explicit
opt-in) gives pipelines the loader methods."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "svdiff_tools"
CORE = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
FORBIDDEN = ("diffusers", "svdiff_tools.diffusers", "svdiff_trainer", "svdiff_toyworld",
             "train_dreambooth", "pipelines")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against svdiff_tools
                yield "svdiff_tools" + ("." + node.module if node.module else "")
                yield from (f"svdiff_tools.{a.name}" for a in node.names if not node.module)
            else:
                yield node.module


@pytest.mark.parametrize("path", CORE, ids=[p.name for p in CORE])
def test_core_modules_import_no_integration(path):
    bad = [m for m in _imports(path) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"{path.name} imports {bad}"


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_works_without_diffusers(tmp_path):
    """A transformers-only environment: diffusers cannot be imported, the whole core API works."""
    out = _run(f"""
        import sys
        sys.modules["diffusers"] = None  # import diffusers now raises ImportError
        import torch, svdiff_tools as st
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 12))
        st.inject_adapter(model, st.SVDAdapterConfig(method="svfit", rank=2, target_modules=["0"]))
        path = st.save_adapter(model, r"{tmp_path}/a.safetensors")
        torch.manual_seed(0)
        fresh = nn.Sequential(nn.Linear(16, 12))
        st.load_adapter(fresh, path)
        st.export_lora(model, r"{tmp_path}/lora.safetensors")
        print("ok", [m for m in sys.modules if m.startswith("diffusers")])
    """)
    assert out.strip() == "ok ['diffusers']"  # only the None placeholder


def test_import_svdiff_tools_patches_nothing():
    """Issue 32, item 4: importing the core leaves `sys.meta_path` and diffusers' pipelines as they were."""
    out = _run("""
        import sys
        import svdiff_tools
        ours = [f for f in sys.meta_path if type(f).__module__.startswith("svdiff_tools")]
        from diffusers import DiffusionPipeline, StableDiffusionPipeline
        print(not ours, hasattr(DiffusionPipeline, "load_svd_adapter"),
              hasattr(StableDiffusionPipeline, "fuse_svd_adapter"))
    """)
    assert out.strip() == "True False False"


@pytest.mark.parametrize("order", ["svdiff_tools_first", "diffusers_first"])
def test_import_svdiff_tools_diffusers_adds_the_loader_methods_in_either_order(order):
    first, second = ("svdiff_tools.diffusers", "diffusers") if order == "svdiff_tools_first" else (
        "diffusers", "svdiff_tools.diffusers")
    out = _run(f"""
        import sys
        import {first}
        import {second}
        from diffusers import StableDiffusionPipeline, DiffusionPipeline
        print(hasattr(StableDiffusionPipeline, "load_svd_adapter"), hasattr(DiffusionPipeline, "fuse_svd_adapter"),
              not [f for f in sys.meta_path if type(f).__module__.startswith("svdiff_tools")])
    """)
    assert out.strip() == "True True True"


def test_import_svdiff_tools_does_not_import_diffusers():
    out = _run("""
        import sys, svdiff_tools
        print(any(m == "diffusers" or m.startswith("diffusers.") for m in sys.modules))
    """)
    assert out.strip() == "False"
