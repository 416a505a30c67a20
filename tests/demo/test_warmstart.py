"""The supervised warm start of wclip-demo's image tower: labels, concept coordinates, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.demo import train as demo_train
from pipeline.demo import warmstart as demo_warmstart
from pipeline.demo import world


def open_samples(n, seed=5):
    return [s for _, s in world.iter_world(seed, 0, n, vocabulary="open")]


def test_targets_read_the_scene_labels():
    samples = open_samples(300)
    shape = demo_warmstart.targets(samples, "shape")
    colour = demo_warmstart.targets(samples, "colour")
    count = demo_warmstart.targets(samples, "count")
    background = demo_warmstart.targets(samples, "background")
    for s, i, j, n, b in zip(samples, shape, colour, count, background):
        objects = s.labels["objects"]
        assert n == len(objects) == s.labels["count"]
        assert demo_warmstart.ATTRIBUTES["background"][b] == s.labels["background"]
        if objects:
            assert demo_warmstart.ATTRIBUTES["shape"][i] == objects[0]["shape"] == s.labels["shapes"]
            assert demo_warmstart.ATTRIBUTES["colour"][j] == objects[0]["colour"] == s.labels["colours"]
        else:
            assert i == j == 0                                          # "" = no object
    # the open world holds the reference corpus's unseen shapes and colours too
    assert {"star", "cross"} <= {demo_warmstart.ATTRIBUTES["shape"][i] for i in shape}
    assert {"orange", "cyan"} <= {demo_warmstart.ATTRIBUTES["colour"][j] for j in colour}
    assert (shape == 0).any()                                            # and some empty scenes


def decoded(sample):
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB"))


def test_splice_joins_the_top_of_one_scene_to_the_bottom_of_another():
    samples = open_samples(64)
    spliced = demo_warmstart.splice(samples, 0.5, np.random.default_rng(3))
    again = demo_warmstart.splice(samples, 0.5, np.random.default_rng(3))
    assert len(spliced) == 64
    joined = [i for i, s in enumerate(spliced) if isinstance(s, demo_warmstart.Spliced)]
    assert 16 <= len(joined) <= 48
    assert joined == [i for i, s in enumerate(again) if isinstance(s, demo_warmstart.Spliced)]
    assert all(spliced[i] is samples[i] for i in range(64) if i not in joined)
    backgrounds = [s.labels["background"] for s in samples]
    for i in joined:
        image, top = np.asarray(spliced[i].image), decoded(samples[i])
        assert image.shape == top.shape == (world.SIZE, world.SIZE, 3)
        rows = [r for r in range(world.SIZE) if np.array_equal(image[:r + 1], top[:r + 1])]
        cut = len(rows)                     # the first row that is not the top scene's
        assert world.SIZE // 8 <= cut < world.SIZE * 7 // 8
        bottoms = [j for j in range(64) if np.array_equal(image[cut:], decoded(samples[j])[cut:])]
        assert bottoms and spliced[i].labels == {"spliced": True, "top": backgrounds[i],
                                                  "bottom": backgrounds[bottoms[0]]}
    # a spliced scene teaches its edges' backgrounds and nothing else; a clean scene's edges are its background
    top, bottom = demo_warmstart.targets(spliced, "top"), demo_warmstart.targets(spliced, "bottom")
    values = demo_warmstart.ATTRIBUTES["background"]
    for i, s in enumerate(spliced):
        if i in joined:
            assert (values[top[i]], values[bottom[i]]) == (s.labels["top"], s.labels["bottom"])
        else:
            assert values[top[i]] == values[bottom[i]] == s.labels["background"]
    for attribute in ("shape", "colour", "size", "background", "count", "style"):
        y = demo_warmstart.targets(spliced, attribute)
        assert [i for i in range(64) if y[i] == demo_warmstart.IGNORE] == joined
    assert demo_warmstart.splice(samples, 0.0, np.random.default_rng(3)) == samples


def test_spliced_scenes_add_no_concept_or_label_loss():
    heads = demo_warmstart.AttributeHeads(64)
    samples = open_samples(48)
    spliced = demo_warmstart.splice(samples, 0.5, np.random.default_rng(1))
    clean = [i for i, s in enumerate(spliced) if not isinstance(s, demo_warmstart.Spliced)]
    features = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for attributes in (["shape", "colour"], ["count", "style"]):
            assert torch.allclose(heads.loss(features, spliced, attributes),
                                  heads.loss(features[clean], [spliced[i] for i in clean], attributes))
        edges = heads.loss(features, spliced, ["top", "bottom"])
        expected = sum(torch.nn.functional.cross_entropy(heads.linear[e](features), demo_warmstart.targets(spliced, e))
                       for e in ("top", "bottom"))
    assert torch.allclose(edges, expected)
    only_spliced = [s for s in spliced if isinstance(s, demo_warmstart.Spliced)]
    assert heads.loss(features[:len(only_spliced)], only_spliced, ["shape"]).item() == 0.0


def test_each_colour_owns_one_embedding_coordinate():
    heads = demo_warmstart.AttributeHeads(64)
    n_shapes = len(world.OPEN_SHAPES)
    assert heads.concepts == ("shape", "colour") and heads.offsets == {"shape": 0, "colour": n_shapes}
    assert set(heads.linear) == {"size", "background", "count", "style", "top", "bottom"}
    features = torch.zeros(2, 64)
    features[0, n_shapes + 3], features[1, 40] = 1.0, 1.0                # unit vectors
    with torch.no_grad():
        colour = heads.concept_logits(features, "colour")
        shape = heads.concept_logits(features, "shape")
    assert colour.shape == (2, len(world.OPEN_COLOURS)) and shape.shape == (2, n_shapes)
    assert colour[0, 3] == pytest.approx(32.0) and colour[0].abs().sum() == pytest.approx(32.0)
    assert shape.abs().sum() == 0 and colour[1].abs().sum() == 0         # coordinate 40 is no concept's
    assert demo_warmstart.AttributeHeads(64, concepts=("colour",)).offsets == {"colour": 0}
    assert demo_warmstart.AttributeHeads(64, concepts=("colour", "background")).offsets == \
        {"colour": 0, "background": len(world.OPEN_COLOURS)}                   # no "" value: all coordinates
    with pytest.raises(ValueError, match=r"unknown concepts \['hue'\]"):
        demo_warmstart.AttributeHeads(64, concepts=("hue",))
    with pytest.raises(ValueError, match="do not fit a 8-dim embedding"):
        demo_warmstart.AttributeHeads(8, concepts=("shape", "colour"))


def test_concept_loss_is_one_vs_rest_binary_cross_entropy():
    heads = demo_warmstart.AttributeHeads(64, concepts=("colour",), concept_weight=10.0)
    assert "shape" in heads.linear
    samples = open_samples(40)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(40, 64, generator=g)
    y = demo_warmstart.targets(samples, "colour")
    z = torch.nn.functional.normalize(features, dim=1)[:, :len(world.OPEN_COLOURS)] * 32.0
    onehot = torch.zeros_like(z)
    for i, j in enumerate(y.tolist()):
        if j:
            onehot[i, j - 1] = 1.0
    expected = 10.0 * torch.nn.functional.binary_cross_entropy_with_logits(z, onehot)
    assert torch.allclose(heads.loss(features, samples, ["colour"]), expected)
    background = demo_warmstart.AttributeHeads(64, concepts=("background",))
    yb = demo_warmstart.targets(samples, "background")
    zb = torch.nn.functional.normalize(features, dim=1)[:, :len(world.BACKGROUNDS)] * 32.0
    expected_b = 10.0 * torch.nn.functional.binary_cross_entropy_with_logits(
        zb, torch.nn.functional.one_hot(yb, len(world.BACKGROUNDS)).float())
    assert torch.allclose(background.loss(features, samples, ["background"]), expected_b)
    both = heads.loss(features, samples, ["colour", "style"])
    style = torch.nn.functional.cross_entropy(heads.linear["style"](features), demo_warmstart.targets(samples, "style"))
    assert torch.allclose(both, expected + style)


def test_warm_start_trains_only_the_image_tower():
    torch.manual_seed(0)
    model, preprocess, _ = demo_train.create_model()
    heads = demo_warmstart.AttributeHeads(64)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    records = demo_warmstart.warm_start(model, preprocess, heads,
                                        [(2, ("shape",)), (0, ("colour",)), (1, tuple(demo_warmstart.ATTRIBUTES))],
                                        batch_size=8, splice_rate=0.5)
    assert [(r["steps"], r["attributes"]) for r in records] == [(2, ["shape"]), (1, list(demo_warmstart.ATTRIBUTES))]
    assert all(np.isfinite(r["first_loss"]) and np.isfinite(r["final_loss"]) for r in records)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    with pytest.raises(ValueError, match=r"unknown attributes \['hue'\]"):
        demo_warmstart.warm_start(model, preprocess, heads, [(1, ("hue",))], batch_size=2)
