"""diffusers integration on tiny pipelines of the real architectures: SD 1.x, SD 2.x (v-prediction), SDXL."""

import copy
import inspect

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import svdiff_tools as st
from svdiff_tools.diffusers.components import pipeline_components
from svdiff_trainer.tiny import tiny_pipeline

from reference import randomize_adapter

KINDS = ["sd15", "sd2", "sdxl", "sd3", "flux"]


@pytest.fixture(scope="module")
def pipes():
    built = {}
    for kind in KINDS:
        p = tiny_pipeline(kind)
        p.set_progress_bar_config(disable=True)
        built[kind] = p
    return built


def run(pipe, **kwargs):
    if "max_sequence_length" in inspect.signature(pipe.__call__).parameters:
        kwargs.setdefault("max_sequence_length", 16)
    return pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def scale_kwargs(pipe, scale):
    key = "joint_attention_kwargs" if hasattr(pipe, "transformer") else "cross_attention_kwargs"
    return {key: {"scale": scale}}


def adapt(pipe, name="default", seed=0, unet_kwargs=None, te_kwargs=None, components=None):
    """Inject into the denoiser and every text encoder, with random 'trained' values."""
    for comp, model in pipeline_components(pipe).items():
        if components is not None and comp not in components:
            continue
        denoiser = comp in ("unet", "transformer")
        kwargs = (unet_kwargs or dict(method="svft", svft_pattern="banded")) if denoiser else \
            (te_kwargs or dict(method="vectorfit"))
        st.inject_adapter(model, st.SVDAdapterConfig(target_modules=comp if denoiser else "text-encoder",
                                                     **kwargs), name)
        randomize_adapter(model, name, seed=seed, magnitude=0.3)
    return pipe


def snapshot(pipe):
    return {c: ([type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()})
            for c, model in pipeline_components(pipe).items()}


def unchanged(pipe, snap):
    for c, model in pipeline_components(pipe).items():
        types, state = snap[c]
        now = model.state_dict()
        if [type(m) for m in model.modules()] != types or now.keys() != state.keys():
            return False
        if not all(torch.equal(now[k], state[k]) for k in state):
            return False
    return "encode_prompt" not in pipe.__dict__


@pytest.fixture
def trained(pipes, tmp_path, request):
    kind = request.param
    base = copy.deepcopy(pipes[kind])
    adapted = adapt(copy.deepcopy(pipes[kind]))
    path = adapted.save_svd_adapter(tmp_path)
    return kind, base, adapted, path


@pytest.mark.parametrize("trained", KINDS, indirect=True)
def test_save_load_same_images_and_scales(trained):
    kind, base, adapted, path = trained
    assert path.name == "svd_adapter.safetensors"
    expected, base_images = run(adapted), run(base)
    assert np.abs(expected - base_images).max() > 1e-2
    pipe = copy.deepcopy(base)
    assert pipe.load_svd_adapter(path.parent) == "default"
    assert set(pipe.get_list_svd_adapters()) == set(pipeline_components(pipe))
    np.testing.assert_allclose(run(pipe), expected, atol=1e-6)
    # per-call strength: 0 is the base model exactly, 1 the adapter, 0.5 equals an adapter weight of 0.5
    np.testing.assert_array_equal(run(pipe, **scale_kwargs(pipe, 0.0)), base_images)
    np.testing.assert_allclose(run(pipe, **scale_kwargs(pipe, 1.0)), expected, atol=1e-6)
    half = run(pipe, **scale_kwargs(pipe, 0.5))
    assert np.abs(half - expected).max() > 1e-3 and np.abs(half - base_images).max() > 1e-3
    pipe.set_svd_adapters(["default"], [0.5])
    np.testing.assert_allclose(run(pipe), half, atol=1e-6)
    # the per-call scale is undone after the call
    pipe.set_svd_adapters(["default"], [1.0])
    np.testing.assert_allclose(run(pipe), expected, atol=1e-6)


@pytest.mark.parametrize("trained", KINDS, indirect=True)
def test_fuse_unfuse_unload_and_disable(trained):
    kind, base, adapted, path = trained
    expected, base_images = run(adapted), run(base)
    pipe = copy.deepcopy(base)
    pipe.load_svd_adapter(path)
    pipe.disable_svd_adapters()
    np.testing.assert_array_equal(run(pipe), base_images)
    pipe.enable_svd_adapters()
    pipe.fuse_svd_adapter()
    np.testing.assert_allclose(run(pipe), expected, atol=1e-5)
    pipe.unfuse_svd_adapter()
    np.testing.assert_allclose(run(pipe), expected, atol=1e-5)
    pipe.fuse_svd_adapter(scale=0.5)
    pipe.unfuse_svd_adapter()
    pipe.unload_svd_adapter()
    assert not any(isinstance(m, st.SVDLayer) for c in pipeline_components(pipe).values() for m in c.modules())
    assert "encode_prompt" not in pipe.__dict__
    np.testing.assert_allclose(run(pipe), base_images, atol=1e-5)


@pytest.mark.parametrize("trained", ["sd15", "sdxl", "sd3", "flux"], indirect=True)
def test_attention_processors(trained):
    kind, base, source, path = trained
    expected = run(source)
    adapted = copy.deepcopy(base)
    adapted.load_svd_adapter(path)
    denoiser = adapted.unet if hasattr(adapted, "unet") else adapted.transformer
    if hasattr(adapted, "unet"):
        denoiser.set_attn_processor(AttnProcessor())
        np.testing.assert_allclose(run(adapted), expected, atol=1e-5)
        denoiser.set_attn_processor(AttnProcessor2_0())
        np.testing.assert_allclose(run(adapted), expected, atol=1e-5)
    fuser = adapted if hasattr(adapted, "fuse_qkv_projections") else denoiser  # SD3/Flux: on the transformer
    fuser.fuse_qkv_projections()
    assert any(type(m).__name__ == "FusedSVDProjection" for m in denoiser.modules())
    np.testing.assert_allclose(run(adapted), expected, atol=1e-5)
    np.testing.assert_array_equal(run(adapted, **scale_kwargs(adapted, 0.0)), run(base))
    fuser.unfuse_qkv_projections()
    np.testing.assert_allclose(run(adapted), expected, atol=1e-5)


def test_two_adapters_with_weights(pipes, tmp_path):
    base = pipes["sd15"]
    a = adapt(copy.deepcopy(base), "a", seed=1).save_svd_adapter(tmp_path / "a.safetensors", "a")
    b = adapt(copy.deepcopy(base), "b", seed=2, unet_kwargs=dict(method="svdiff")).save_svd_adapter(
        tmp_path / "b.safetensors", "b")
    pipe = copy.deepcopy(base)
    pipe.load_svd_adapter(a)
    pipe.load_svd_adapter(b)
    assert pipe.get_active_svd_adapters() == ["a", "b"]
    pipe.set_svd_adapters(["a", "b"], [0.7, {"unet": 0.4, "text_encoder": 0.0}])
    mixed = run(pipe)
    # the same mixture, merged into the weights
    pipe.fuse_svd_adapter()
    np.testing.assert_allclose(run(pipe), mixed, atol=1e-5)
    pipe.unfuse_svd_adapter()
    # "b" with text-encoder weight 0 equals "b" without its text-encoder part
    ref = copy.deepcopy(base)
    ref.load_svd_adapter(a)
    ref.load_svd_adapter(b)
    st.remove_adapter(ref.text_encoder, "b")
    ref.set_svd_adapters(["a", "b"], [0.7, 0.4])
    ref.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj").scales["a"] = 0.7
    np.testing.assert_allclose(run(ref), mixed, atol=1e-6)
    pipe.delete_svd_adapters("a")
    assert pipe.get_active_svd_adapters() == ["b"]


def test_a_model_file_loads_into_its_component(pipes, tmp_path):
    base = pipes["sd15"]
    model = copy.deepcopy(base)
    st.inject_adapter(model.unet, st.SVDAdapterConfig(method="svdiff", target_modules="unet-attention"))
    randomize_adapter(model.unet)
    path = st.save_adapter(model.unet, tmp_path / "unet_only.safetensors")
    pipe = copy.deepcopy(base)
    pipe.load_svd_adapter(path)
    assert pipe.get_list_svd_adapters() == {"unet": ["default"]}
    np.testing.assert_allclose(run(pipe), run(model), atol=1e-6)


def test_lora_coexistence(pipes, tmp_path):
    base = pipes["sd15"]
    lora_source = adapt(copy.deepcopy(base), "l", seed=3, unet_kwargs=dict(method="svfit", rank=2),
                        te_kwargs=dict(method="svdiff"))
    lora_path = tmp_path / "lora.safetensors"
    st.export_lora(lora_source, lora_path)
    svd_path = adapt(copy.deepcopy(base), "s", seed=4).save_svd_adapter(tmp_path / "s.safetensors", "s")
    # reference: both as SVD adapters
    ref = copy.deepcopy(base)
    ref.load_svd_adapter(lora_source.save_svd_adapter(tmp_path / "l.safetensors", "l"))
    ref.load_svd_adapter(svd_path)
    both = run(ref)
    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(str(lora_path), adapter_name="lora")
    pipe.load_svd_adapter(svd_path)
    np.testing.assert_allclose(run(pipe), both, atol=2e-5)
    pipe.fuse_svd_adapter()  # fusing one leaves the other live
    np.testing.assert_allclose(run(pipe), both, atol=2e-5)
    pipe.unfuse_svd_adapter()
    pipe.fuse_lora()
    np.testing.assert_allclose(run(pipe), both, atol=2e-5)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()  # the LoRA goes, the SVD adapter stays
    svd_only = copy.deepcopy(base)
    svd_only.load_svd_adapter(svd_path)
    np.testing.assert_allclose(run(pipe), run(svd_only), atol=2e-5)


@pytest.mark.parametrize("kind,key_format", [("sd15", "diffusers"), ("sd15", "kohya"), ("sdxl", "diffusers"),
                                              ("sdxl", "kohya"), ("sd3", "diffusers"), ("flux", "diffusers")])
def test_exported_lora_reproduces_images_through_load_lora_weights(pipes, tmp_path, kind, key_format):
    # diffusers' Flux loader reads LoRA for the transformer and the CLIP text encoder, not for T5
    components = ("transformer", "text_encoder") if kind == "flux" else None
    adapted = adapt(copy.deepcopy(pipes[kind]), unet_kwargs=dict(method="svfit", rank=3),
                    te_kwargs=dict(method="svdiff"), components=components)
    path = tmp_path / "adapter.safetensors"
    adapted.save_svd_adapter(path)
    pipe = copy.deepcopy(pipes[kind])
    out = tmp_path / f"{key_format}.safetensors"
    report = st.export_lora(path, out, base=pipe, key_format=key_format)  # from the file, base left clean
    assert not any(isinstance(m, st.SVDLayer) for c in pipeline_components(pipe).values() for m in c.modules())
    assert report.overall_error < 1e-5 and report.dropped == []
    pipe.load_lora_weights(str(out))
    np.testing.assert_allclose(run(pipe), run(adapted), atol=2e-5)


def test_directly_injected_denoiser_follows_the_per_call_scale(pipes):
    base = pipes["sd15"]
    pipe = copy.deepcopy(base)
    st.inject_adapter(pipe.unet, st.SVDAdapterConfig(method="svdiff", target_modules="unet"))
    randomize_adapter(pipe.unet)
    np.testing.assert_array_equal(run(pipe, cross_attention_kwargs={"scale": 0.0}), run(base))
    st.remove_adapter(pipe.unet)
    assert not pipe.unet._forward_pre_hooks  # the hooks go with the last adapter


@pytest.mark.parametrize("case", ["sdxl_into_sd15", "other_base", "lora_file", "missing", "empty_folder",
                                  "not_safetensors", "name_taken"])
def test_bad_inputs_leave_the_pipeline_untouched(pipes, tmp_path, case):
    pipe = copy.deepcopy(pipes["sd15"])
    if case == "name_taken":
        pipe.load_svd_adapter(adapt(copy.deepcopy(pipes["sd15"])).save_svd_adapter(tmp_path / "first"))
    snap = snapshot(pipe)
    if case == "sdxl_into_sd15":
        src, match = adapt(copy.deepcopy(pipes["sdxl"])).save_svd_adapter(tmp_path), "text_encoder_2"
    elif case == "other_base":
        src, match = adapt(tiny_pipeline("sd15", seed=1)).save_svd_adapter(tmp_path), "another base model"
    elif case == "lora_file":
        src = tmp_path / "lora.safetensors"
        st.export_lora(adapt(copy.deepcopy(pipes["sd15"])), src)
        match = "is a LoRA file"
    elif case == "missing":
        src, match = tmp_path / "nope.safetensors", "does not exist"
    elif case == "empty_folder":
        (tmp_path / "run").mkdir()
        src, match = tmp_path / "run", "has no svd_adapter.safetensors"
    elif case == "not_safetensors":
        src = tmp_path / "adapter.bin"
        torch.save({"w": torch.zeros(3)}, src)
        match = "not a readable safetensors file"
    else:
        src, match = tmp_path / "first" / "svd_adapter.safetensors", "already has an SVD adapter named 'default'"
    with pytest.raises(st.SVDAdapterError, match=match) as info:
        pipe.load_svd_adapter(src)
    assert "\n" not in str(info.value)
    if case == "name_taken":
        pipe.__dict__.pop("encode_prompt")  # installed by the first, successful load
    assert unchanged(pipe, snap)


@pytest.mark.parametrize("variant", ["StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"])
def test_img2img_and_inpaint_variants(pipes, tmp_path, variant):
    import diffusers
    from PIL import Image

    base = pipes["sd15"]
    path = adapt(copy.deepcopy(base)).save_svd_adapter(tmp_path)
    cls = getattr(diffusers, variant)
    plain, pipe = cls(**copy.deepcopy(base).components), cls(**copy.deepcopy(base).components)
    for p in (plain, pipe):
        p.set_progress_bar_config(disable=True)
    pipe.load_svd_adapter(path)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    extra = {"mask_image": Image.new("L", (32, 32), 255)} if "Inpaint" in variant else {}

    def call(p, **kw):
        return p("a sks dog", image=image, num_inference_steps=4, strength=0.9, height=32, width=32,
                 output_type="np", generator=torch.Generator().manual_seed(0), **extra, **kw).images

    assert np.abs(call(pipe) - call(plain)).max() > 1e-3
    np.testing.assert_array_equal(call(pipe, cross_attention_kwargs={"scale": 0.0}), call(plain))
