"""Tests of the shapes world: renderer, world on disk, simulated describer, shipped model."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from latteclip_nb import data, shapes
from latteclip_nb.shapes import (SHAPES, SOURCE, TARGET, SimulatedDescriber, World, make_world, render, render_image,
                                 sample_scene, world_scenes)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_renderer_is_deterministic():
    for shift in (SOURCE, TARGET):
        s = sample_scene(np.random.default_rng([1, 2]), shift)
        assert s == sample_scene(np.random.default_rng([1, 2]), shift)
        assert np.array_equal(np.asarray(render(s)), np.asarray(render(json.loads(json.dumps(s)))))
    a, b = world_scenes(World(n_train=30, n_test=10), "test"), world_scenes(World(n_train=30, n_test=10), "test")
    assert a == b and a != world_scenes(World(seed=1, n_train=30, n_test=10), "test")
    assert Counter(s["shape"] for s in a) == {c: 1 for c in SHAPES}


def test_target_differs_from_source_only_in_rendering():
    s = sample_scene(np.random.default_rng(4), SOURCE)
    t = sample_scene(np.random.default_rng(4), TARGET)
    same = {k for k in s if k not in ("rotation", "shift")}
    assert all(s[k] == t[k] for k in same)
    assert not np.array_equal(np.asarray(render(s)), np.asarray(render(t)))


def test_scene_round_trip_through_png(tmp_path):
    w = World(seed=5, n_train=20, n_test=10)
    d = make_world(w, tmp_path, progress=False)
    sj = json.loads((d / "split_shapes.json").read_text())
    assert [len(sj["train"]), len(sj["test"])] == [20, 10]
    for rel, label, name in sj["train"] + sj["test"]:
        im = Image.open(d / rel)
        rec = json.loads(im.info["scene"])
        assert rec["shape"] == name == SHAPES[label]
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(render(rec)))
    assert make_world(w, tmp_path) == d  # cached
    sp = shapes.load_shapes(tmp_path, w, progress=False)
    assert sp["test"].labels == [r[1] for r in sj["test"]]
    assert json.loads(data.load_image(sp["train"].paths[3]).info["scene"]) == json.loads(Image.open(d / sj["train"][3][0]).info["scene"])


def _shape_in(text):
    words = text.lower().replace(".", " ").replace(",", " ").split()
    named = [s for s in SHAPES if s in words or shapes.plural(s) in words]
    return named[0] if named else None


@pytest.mark.parametrize("rates", [dict(q_shape=0.4, p_drop=0.2, p_colour=0.15, p_size=0.25),
                                   dict(q_shape=0.0, p_drop=0.5, p_colour=0.0, p_size=1.0)])
def test_describer_error_rates(rates):
    d = SimulatedDescriber(**rates, seed=3)
    scenes = [sample_scene(np.random.default_rng([8, i]), TARGET) for i in range(4000)]
    texts = [d.describe_scene(s) for s in scenes]
    named = [(_shape_in(t), s["shape"]) for t, s in zip(texts, scenes)]
    present = [(a, b) for a, b in named if a is not None]
    assert abs(1 - len(present) / len(named) - rates["p_drop"]) < 0.03
    assert abs(np.mean([a != b for a, b in present]) - rates["q_shape"]) < 0.03
    sizes = [(next((z for z in shapes.SIZES if z in t.split()), None), s["size"]) for t, s in zip(texts, scenes)]
    sizes = [(a, b) for a, b in sizes if a is not None]
    assert abs(np.mean([a != b for a, b in sizes]) - rates["p_size"]) < 0.03


def test_describer_is_deterministic_and_labelled():
    imgs = [render_image(sample_scene(np.random.default_rng(i), TARGET)) for i in range(5)]
    d = SimulatedDescriber()
    assert d.describe(imgs, ["x"] * 5) == SimulatedDescriber().describe(imgs, ["y"] * 5)
    assert "simulated" in d.model_id and "simulated" in SimulatedDescriber.__doc__.lower()
    with pytest.raises(ValueError, match="scene"):
        d.describe([Image.new("RGB", (4, 4))], ["x"])


def test_group_description_majority_rule():
    from latteclip_nb.collage import make_collage
    perfect = SimulatedDescriber(q_shape=0, p_drop=0, p_colour=0, p_size=0)
    base = sample_scene(np.random.default_rng(2), shape="heart")
    group = lambda **kw: [{**base, **{k: v[i] for k, v in kw.items()}} for i in range(4)]
    g = group(colour=["blue", "blue", "blue", "red"], size=["small", "large", "small", "large"])
    assert perfect.group_attributes(g)["colour"] == "blue" and perfect.group_attributes(g)["size"] is None
    text = perfect.describe_group(g)
    words = set(text.lower().replace(".", " ").split())
    assert "blue hearts" in text.lower() and not {"red", "small", "large"} & words
    collage = make_collage([render_image(s) for s in g], size=96, gap=4)
    assert perfect.describe([collage], ["group prompt"]) == [text]
    assert _shape_in(perfect.describe_group(group(shape=["heart", "ring", "ring", "star"]))) is None


def test_shipped_checkpoint_zero_shot_in_band(tmp_path):
    from latteclip_nb.clip import zero_shot_eval
    assert shapes.SHAPES_CHECKPOINT.exists() and shapes.SHAPES_CHECKPOINT.stat().st_size <= 20e6
    model, _, eval_tf, tok = shapes.load_shapes_clip("cpu")
    sp = shapes.load_shapes(tmp_path, World(), progress=False)
    test = sp["test"].subset(range(300))
    top1 = zero_shot_eval(model, eval_tf, tok, test, ["a photo of a {}."], device="cpu")["top1"]
    assert 0.35 <= top1 <= 0.75, top1
    src = [sample_scene(np.random.default_rng([77, i])) for i in range(300)]
    assert shapes.zero_shot_top1(model, tok, src) > top1 + 0.1  # the target is shifted away from the source
