"""The toy world: deterministic scenes and captions, a real CLIPTokenizer with whole-word tokens, held-out
combinations kept out of pretraining, and the metric network's heads and identification."""

import random

import numpy as np
import torch

from svdiff_toyworld import metric, render, world
from svdiff_toyworld.tokenizer import load_tokenizer, write_tokenizer_files


def test_scenes_and_captions_are_deterministic():
    for seed in (0, 1, 12345):
        a, b = world.sample_scene(seed), world.sample_scene(seed)
        assert a == b
        assert np.array_equal(np.asarray(render.render(a)), np.asarray(render.render(b)))
        assert world.caption(a, random.Random(seed)) == world.caption(b, random.Random(seed))
    assert world.sample_scene(0) != world.sample_scene(1)


def test_the_world_has_the_promised_variety():
    assert len(world.SHAPES) >= 8 and len(world.COLOURS) >= 8 and len(world.PATTERNS) >= 3
    assert len(world.SIZES) >= 2 and len(world.POSITIONS) >= 5 and len(world.BACKGROUNDS) >= 6
    scenes = [world.sample_scene(i, two_object_rate=0.0) for i in range(3000)]
    objs = [s.objects[0] for s in scenes]
    for attr, values in (("shape", world.SHAPES), ("colour", world.COLOURS), ("pattern", world.PATTERNS),
                         ("cls", world.CLASSES), ("position", world.POSITIONS)):
        assert {getattr(o, attr) for o in objs} == set(values), attr
    assert {s.background for s in scenes} == set(world.BACKGROUNDS)
    assert len({o.identity for o in objs if o.cls == "toy"}) > 500  # instances vary beyond what captions say


def test_patterns_stay_apart_at_the_latent_resolution():
    """Striped and dotted renders of one object, box-filtered to the VAE's 16x16 grid, differ by >= 1.2 summed
    |difference| per channel-mean for every shape and size (the render-version-1 patterns, a period of about
    1.5 latent pixels, gave a mean of 3.4 and a minimum of 1.0: the UNet drew a blend of both)."""
    from dataclasses import replace

    scene = world.sample_scene(3, two_object_rate=0.0)
    obj = scene.objects[0]
    gaps = []
    for shape in world.SHAPES:
        for size in world.SIZES:
            pair = [replace(scene, objects=(replace(obj, shape=shape, size=size, pattern=p, position="center"),))
                    for p in ("striped", "dotted")]
            x = torch.nn.functional.avg_pool2d(render.render_tensor(pair), 4)
            gaps.append(float((x[0] - x[1]).abs().mean(0).sum()))
    assert min(gaps) >= 1.2 and sum(gaps) / len(gaps) >= 5.0, gaps


def test_held_out_combinations_never_occur_in_pretraining():
    held = set(world.HELD_OUT)
    for i in range(5000):
        for o in world.sample_scene(i, two_object_rate=0.3).objects:
            assert (o.cls, o.shape, o.colour) not in held
    for subject in world.SUBJECTS.values():
        o = subject.obj
        assert (o.cls, o.shape, o.colour) in held


def test_captions_name_what_the_scene_shows():
    for i in range(200):
        scene = world.sample_scene(i, two_object_rate=0.0)
        text, named = world.describe(scene, random.Random(i))
        (obj,) = scene.objects
        assert named["class"] == obj.cls and obj.cls in text.split()
        for attr, value in named.items():
            truth = scene.background if attr == "background" else getattr(obj, "cls" if attr == "class" else attr)
            assert value == truth


def test_identifiers_take_the_first_article_of_a_caption_at_the_given_rate():
    rng = random.Random(0)
    texts = [world.caption(world.sample_scene(i, two_object_rate=0.3), random.Random(i)) for i in range(2000)]
    out = [world.with_identifier(t, rng, 0.1) for t in texts]
    changed = [(t, o) for t, o in zip(texts, out) if t != o]
    assert 0.08 <= len(changed) / len(texts) <= 0.12
    used = set()
    for t, o in changed:
        words_t, words_o = t.split(), o.split()
        k = next(i for i, (a, b) in enumerate(zip(words_t, words_o)) if a != b)
        assert words_t[k] == "a" and words_o[k] in world.IDENTIFIERS and words_t[k + 1:] == words_o[k + 1:]
        assert k == (3 if t.startswith("a photo of ") else 0)
        used.add(words_o[k])
    assert used == set(world.IDENTIFIERS)
    assert [world.with_identifier(t, rng, 0.0) for t in texts[:50]] == texts[:50]
    assert world.with_identifier("", rng, 1.0) == ""


def test_every_word_is_one_token_of_a_real_clip_tokenizer(tmp_path):
    tok = load_tokenizer(write_tokenizer_files(tmp_path))
    assert type(tok).__name__ == "CLIPTokenizer"
    for word in world.vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok("a photo of sks toy").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 7
    assert len(tok("an unknown zebra!", add_special_tokens=False).input_ids) > 3  # other text still tokenizes


def test_generator_speed_is_enough_to_stream():
    import time

    start = time.perf_counter()
    for i in range(300):
        render.render(world.sample_scene(i))
    assert 300 / (time.perf_counter() - start) > 300  # >= 2,000/s on a quiet core; a loose bound for busy CI


def test_subject_views_vary_placement_not_identity():
    subject = world.SUBJECTS["example_toy"]
    views = subject.views(6)
    assert len({v.background for v in views}) >= 3
    assert len({v.objects[0].identity for v in views}) == 1


def test_metric_labels_and_supcon():
    scene = world.sample_scene(3, two_object_rate=0.0)
    labels = metric.labels(scene)
    assert labels["class"] == world.CLASSES.index(scene.objects[0].cls)
    e = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    aligned = torch.nn.functional.normalize(torch.eye(8)[[0, 0, 1, 1, 2, 2]], dim=-1)
    assert metric.supcon(aligned, ids) < metric.supcon(e, ids)


def test_the_shipped_metric_network_reads_fresh_scenes():
    """>= 98% per caption attribute on scenes it never saw (the issue's bar; measured on 2,000: >= 99.2%)."""
    net = metric.load()
    scenes = [world.sample_scene(7 * 10**9 + i, two_object_rate=0.0, hold_out=False) for i in range(300)]
    acc = metric.accuracy(net, scenes)
    for attr in ("class", "shape", "colour", "pattern", "background", "position", "size"):
        assert acc[attr] >= 0.98, (attr, acc[attr])


def test_the_shipped_metric_network_identifies_the_subject_and_nothing_else():
    from svdiff_toyworld.render import render_tensor

    net = metric.load()
    subject = world.SUBJECTS["example_toy"]
    identifier = metric.Identifier(net, subject)
    rng = random.Random(11)
    own = [subject.view(rng.choice(world.BACKGROUNDS), rng.choice(world.POSITIONS), rng.choice(world.SIZES))
           for _ in range(24)]
    others = [metric._view(rng, world.random_object(rng, cls="toy", hold_out=False)) for _ in range(48)]
    assert identifier.identify(render_tensor(own)).float().mean() >= 0.95
    assert identifier.identify(render_tensor(others)).float().mean() <= 0.05
    noise = torch.rand(16, 3, 64, 64) * 2 - 1  # what a random-weight pipeline draws
    assert identifier.identify(noise).float().mean() <= 0.1


def test_the_pretraining_loss_weighs_x0_errors_by_the_clamped_snr():
    """epsilon-MSE times the weight equals x0-MSE times clamp(SNR, floor, gamma), x0 recovered from the noisy
    latent in float64; floor 0 is Min-SNR-gamma."""
    from svdiff_toyworld.pretrain import epsilon_loss_weight

    g = torch.Generator().manual_seed(0)
    alpha_bar = torch.tensor([0.0047, 0.0142, 0.16, 0.42, 0.89, 0.999], dtype=torch.float64)
    x0, eps, err = (torch.randn(6, 4, 16, 16, generator=g, dtype=torch.float64) for _ in range(3))
    a = alpha_bar.view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
    x0_hat = (noisy - (1 - a).sqrt() * (eps + err)) / a.sqrt()
    snr = alpha_bar / (1 - alpha_bar)
    for floor, gamma in ((0.0, 5.0), (0.2, 5.0)):
        weighted_eps = epsilon_loss_weight(alpha_bar, floor, gamma) * err.pow(2).mean((1, 2, 3))
        weighted_x0 = snr.clamp(min=floor, max=gamma) * (x0_hat - x0).pow(2).mean((1, 2, 3))
        torch.testing.assert_close(weighted_eps, weighted_x0, rtol=1e-9, atol=0)
    lifted = epsilon_loss_weight(alpha_bar, 0.2, 5.0) / epsilon_loss_weight(alpha_bar, 0.0, 5.0)
    assert lifted[0] > 40 and lifted[2] > 1 and torch.equal(lifted[3:], torch.ones(3, dtype=torch.float64))


def test_the_token_identity_loss_reads_words_back_up_to_the_first_end_of_text():
    from svdiff_toyworld.pretrain import token_identity_loss

    g = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    eos = 49
    ids = torch.tensor([[48, 3, 7, 9, eos, eos, eos], [48, 5, eos, eos, eos, eos, eos]])
    readable = 30 * embeddings[ids]                       # each output points at its own word
    assert token_identity_loss(readable, ids, embeddings, eos) < 1e-3
    collapsed = readable.clone()
    collapsed[0, 2] = collapsed[0, 3]                     # two words mapped to one output
    expected = torch.nn.functional.cross_entropy(collapsed[0, 2:3] @ embeddings.T, ids[0, 2:3]) / 8  # 8 kept tokens
    torch.testing.assert_close(token_identity_loss(collapsed, ids, embeddings, eos), expected, rtol=1e-3, atol=1e-4)
    padding_changed = readable.clone()
    padding_changed[:, 5:] = 0                            # after the first end-of-text nothing counts
    torch.testing.assert_close(token_identity_loss(padding_changed, ids, embeddings, eos),
                               token_identity_loss(readable, ids, embeddings, eos))


def test_identification_rates_are_reported_with_their_count_and_wilson_interval():
    """The trainer's report gives each rate's 95% interval: checked against the float64 roots of
    (k/n - p)^2 = z^2 p (1 - p) / n, the definition of the Wilson score interval."""
    import pytest

    from svdiff_toyworld.evaluate import report_lines, wilson_interval

    z = 1.96
    for hits, n in ((11, 16), (0, 16), (16, 16), (1, 8), (25, 32), (3, 7)):
        rate = np.float64(hits) / n
        a, b, c = 1 + z * z / n, -(2 * rate + z * z / n), rate * rate  # a p^2 + b p + c = 0
        roots = np.sort(np.roots([a, b, c]).real)
        lo, hi = wilson_interval(hits, n)
        assert lo == pytest.approx(max(0.0, roots[0]), abs=1e-12) and hi == pytest.approx(min(1.0, roots[1]), abs=1e-12)
        assert lo <= rate <= hi
    assert wilson_interval(0, 16)[0] == 0.0 and wilson_interval(16, 16)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one image"):
        wilson_interval(0, 0)

    report = {"adapted": {"instance": {"prompt": "a photo of sks toy", "images": 16, "identified": 0.6875,
                                       "similarity": 0.84}},
              "base": {"instance": {"prompt": "a photo of sks toy", "identified": 0.0, "similarity": 0.27}}}
    adapted, base = report_lines(report)[2:]
    assert "| 69% (11 of 16; 95%: 44-86%) |" in adapted
    assert "| 0% |" in base  # a score without its count (an older cache) keeps the rate alone


def test_the_metric_network_saves_whole_in_float16_and_loads_back(tmp_path, monkeypatch):
    """`metric.save` then `metric.load`: the float16 of every weight, read back in float32; a save killed midway
    leaves the previous file and no temporary one."""
    import pytest

    from svdiff_tools import atomic

    torch.manual_seed(0)
    net = metric.MetricNet()
    metric.save(net, tmp_path)
    back = metric.load(tmp_path)
    for name, value in net.state_dict().items():
        assert back.state_dict()[name].dtype == value.dtype
        assert torch.equal(back.state_dict()[name], value.half().float() if value.is_floating_point() else value)
    before = (tmp_path / "model.safetensors").read_bytes()

    def killed(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        metric.save(metric.MetricNet(), tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
