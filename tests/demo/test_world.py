"""The synthetic world and its shards on disk: determinism, img2dataset layout, labelled anomalies, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.demo import shards, world


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Two shards of 64 pairs, half of them anomalies of every kind."""
    out = tmp_path_factory.mktemp("world")
    return out, shards.generate_world(out, shards=2, samples_per_shard=64, seed=7, anomaly_rate=0.5)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = shards.generate_world(tmp_path / "a", 2, 20, seed=1, anomaly_rate=0.3)
    b = shards.generate_world(tmp_path / "b", 2, 20, seed=1, anomaly_rate=0.3)
    c = shards.generate_world(tmp_path / "c", 2, 20, seed=2, anomaly_rate=0.3)
    for pa, pb, pc in zip(a, b, c):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.with_suffix(".parquet").read_bytes() == pb.with_suffix(".parquet").read_bytes()
        assert pa.read_bytes() != pc.read_bytes()
    for info, _ in _members(a[0]):
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == \
               (shards.TAR_MTIME, 0, 0, "", "", 0o644)


def test_layout_keys_and_json_fields(labelled):
    out, paths = labelled
    assert [p.name for p in paths] == ["00000.tar", "00001.tar"]
    uids = set()
    for shard, path in enumerate(paths):
        assert path.with_suffix(".parquet").exists()
        stats = json.loads((out / f"{path.stem}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == 64 and stats["status_dict"] == {"success": 64}
        members = _members(path)
        names = [m.name for m, _ in members]
        keys = sorted({n.split(".")[0] for n in names})
        assert keys == [f"{shard:05d}{i:04d}" for i in range(64)]
        assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json")]
        data = {m.name: d for m, d in members}
        for key in keys:
            meta = json.loads(data[f"{key}.json"])
            assert meta["key"] == key and meta["caption"] == data[f"{key}.txt"].decode()
            assert re.fullmatch(r"[0-9a-f]{32}", meta["uid"]) and meta["url"].endswith(f"{key}.jpg")
            assert (meta["width"], meta["height"]) == (64, 64) == Image.open(io.BytesIO(data[f"{key}.jpg"])).size
            assert meta["anomaly"] in (None, *world.ANOMALY_KINDS)
            assert meta["anomaly_modality"] == world.anomaly_modality(meta["anomaly"])
            assert meta["background"] in world.BACKGROUNDS and meta["count"] == len(meta["objects"]) >= 1
            uids.add(meta["uid"])
    assert len(uids) == 128


def test_labels_match_rate_and_read_back(labelled):
    out, paths = labelled
    rows = shards.read_labels(out)
    assert len(rows) == 128 and [r["key"] for r in rows] == sorted(r["key"] for r in rows)
    counts = Counter(r["anomaly"] for r in rows)
    assert counts[None] == 64                                   # exactly round(0.5 * 64) per shard
    assert set(counts) - {None} == set(world.ANOMALY_KINDS)
    assert all(c == 8 for k, c in counts.items() if k)          # kinds spread evenly
    tar_rows = [json.loads(d) for m, d in _members(paths[0]) if m.name.endswith(".json")]
    parquet_rows = shards.read_labels(paths[0].with_suffix(".parquet"))
    assert len(parquet_rows) == 64
    assert [r["anomaly"] for r in tar_rows] == [r["anomaly"] for r in parquet_rows]
    assert [r["objects"] for r in tar_rows] == [r["objects"] for r in parquet_rows]


def test_small_rate_is_exact_per_shard(tmp_path):
    shards.generate_world(tmp_path, 3, 100, seed=0, anomaly_rate=0.15, anomaly_kinds=["noise", "gibberish"])
    counts = Counter(r["anomaly"] for r in shards.read_labels(tmp_path))
    assert counts == {None: 255, "noise": counts["noise"], "gibberish": counts["gibberish"]}
    assert counts["noise"] + counts["gibberish"] == 45 and abs(counts["noise"] - counts["gibberish"]) <= 3


def _clean_twin(seed, key):
    """The same sample generated without its anomaly (the anomaly is applied last)."""
    shard, index = int(key[:5]), int(key[5:])
    image, caption, _ = world.make_pair(np.random.default_rng([seed, shard, 0, index]), None)
    return _decode(world.encode_jpeg(image)), caption


def test_each_anomaly_kind_is_what_its_label_says(labelled):
    out, paths = labelled
    seen = set()
    for path in paths:
        data = {m.name: d for m, d in _members(path)}
        for row in shards.read_labels(path):
            kind, key = row["anomaly"], row["key"]
            img, caption = _decode(data[f"{key}.jpg"]), row["caption"]
            twin_img, twin_caption = _clean_twin(7, key)
            seen.add(kind)
            if kind is None or kind in ("noise", "blank", "damaged"):
                assert caption == twin_caption
            if kind is None:
                assert np.abs(img - twin_img).max() == 0
                assert set(row["shapes"].split(",")) <= set(world.SHAPES)
            elif kind == "noise":
                assert img.std() > 40 and np.abs(np.diff(img, axis=1)).mean() > 25
            elif kind == "blank":
                assert img.std(axis=(0, 1)).max() < 2
            elif kind == "damaged":
                assert np.abs(img - twin_img).mean() > 10
            elif kind == "unseen_shape":
                assert set(row["shapes"].split(",")) <= set(world.UNSEEN_SHAPES)
                assert any(s in caption for s in world.UNSEEN_SHAPES)
            elif kind == "unseen_colour":
                assert set(row["colours"].split(",")) <= set(world.UNSEEN_COLOURS)
                assert any(c in caption for c in world.UNSEEN_COLOURS)
            elif kind == "gibberish":
                assert not set(caption.split()) & set(twin_caption.split())
            elif kind == "ungrammatical":
                assert caption != twin_caption.replace(",", "")
                assert sorted(caption.split()) == sorted(twin_caption.replace(",", "").split())
            elif kind == "mismatch":
                described = {(s, c) for s in world.SHAPES for c in world.COLOURS if f"{c} {s}" in caption}
                actual = set(zip(row["shapes"].split(","), row["colours"].split(",")))
                assert described and not described & actual
            if kind in ("gibberish", "ungrammatical", "mismatch"):
                assert np.abs(img - twin_img).max() == 0
    assert seen == {None, *world.ANOMALY_KINDS}


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown anomaly kind"):
        shards.generate_world(tmp_path, 1, 4, 0, 0.5, ["sparkles"])
    with pytest.raises(ValueError, match="anomaly_rate"):
        shards.generate_world(tmp_path, 1, 4, 0, 1.5)
    with pytest.raises(ValueError, match="shards"):
        shards.generate_world(tmp_path, 0, 4, 0)


def test_cli_writes_shards(tmp_path, capsys):
    rc = cli_main(["world", "--output", str(tmp_path), "--shards", "2", "--samples-per-shard", "10",
                   "--seed", "3", "--anomaly-rate", "0.2", "--anomalies", "noise,mismatch"])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    assert Counter(r["anomaly"] for r in shards.read_labels(tmp_path)) == {None: 16, "noise": 2, "mismatch": 2}
    assert cli_main(["world", "--output", str(tmp_path), "--anomalies", "noise,sparkles"]) == 2
    assert "sparkles" in capsys.readouterr().err


def test_styles_and_captions_agree():
    grain = {"photo": [], "drawing": []}
    for _, sample in world.iter_world(seed=5, shard=0, n=60):
        style, caption = sample.labels["style"], sample.caption
        img = _decode(sample.image)
        grain[style].append(np.median(np.abs(np.diff(img, axis=1))))
        other = "drawing" if style == "photo" else "photo"
        assert other not in caption and "illustration" not in caption or style == "drawing"
    assert min(len(v) for v in grain.values()) >= 15
    assert np.mean(grain["photo"]) >= 1.5 and np.mean(grain["drawing"]) <= 0.3


def test_open_world_is_the_reference_world_and_more():
    """The pre-training world holds every shape and colour and some empty scenes; no anomalies."""
    rows = [s.labels for _, s in world.iter_world(seed=11, shard=0, n=400, vocabulary="open")]
    shapes = {sh for r in rows for sh in r["shapes"].split(",") if sh}
    colours = {c for r in rows for c in r["colours"].split(",") if c}
    assert shapes == set(world.SHAPES + world.UNSEEN_SHAPES)
    assert colours == set(world.COLOURS) | set(world.UNSEEN_COLOURS)
    empty = [r for r in rows if r["count"] == 0]
    assert 5 <= len(empty) <= 40                                     # OPEN_EMPTY_RATE = 0.05 of 400
    assert all(r["background"] in r["caption"] and r["shapes"] == "" for r in empty)
    assert all(r["anomaly"] is None for r in rows)
    assert all("/open/" in r["url"] for r in rows)
    reference = [s.labels for _, s in world.iter_world(seed=11, shard=0, n=400)]
    assert {r["uid"] for r in rows}.isdisjoint(r["uid"] for r in reference)
    assert min(r["count"] for r in reference) >= 1
    # an empty scene is the background alone: flat apart from the photo style's gradient and noise
    sample = next(s for _, s in world.iter_world(seed=11, shard=0, n=400, vocabulary="open")
                  if s.labels["count"] == 0 and s.labels["style"] == "drawing")
    assert np.ptp(_decode(sample.image), axis=(0, 1)).max() <= 8


def test_open_world_refuses_anomalies(tmp_path):
    with pytest.raises(ValueError, match="open world holds no anomalies"):
        shards.generate_world(tmp_path, 1, 4, 0, 0.5, vocabulary="open")
    with pytest.raises(ValueError, match="unknown vocabulary 'closed'"):
        shards.generate_world(tmp_path, 1, 4, 0, vocabulary="closed")
    assert cli_main(["world", "--output", str(tmp_path / "o"), "--samples-per-shard", "30", "--seed", "2",
                     "--vocabulary", "open"]) == 0
    assert len(shards.read_labels(tmp_path / "o")) == 30
    assert cli_main(["world", "--output", str(tmp_path / "p"), "--vocabulary", "open", "--anomaly-rate", "0.2"]) == 2
    assert not (tmp_path / "p").exists()                             # refused before anything is written


def test_twins_differ_only_in_shape():
    rng = np.random.default_rng(3)
    for _ in range(20):
        (a, caption_a, scene_a), (b, caption_b, scene_b) = world.make_twins(rng)
        shape_a, shape_b = scene_a.objects[0][0], scene_b.objects[0][0]
        assert shape_a != shape_b and {shape_a, shape_b} <= set(world.SHAPES + world.UNSEEN_SHAPES)
        assert [o[1:] for o in scene_a.objects] == [o[1:] for o in scene_b.objects]
        assert (scene_a.background, scene_a.style, scene_a.position) == \
               (scene_b.background, scene_b.style, scene_b.position)
        n = len(scene_a.objects)
        assert caption_a.replace(world._plural(shape_a, n), world._plural(shape_b, n)) == caption_b
        changed = (a != b).any(axis=2)                      # only pixels around the objects change
        assert 0 < changed.mean() < 0.3
        ys, xs = np.nonzero(changed)
        assert all(any(np.hypot(x + 0.5 - cx, y + 0.5 - cy) <= 1.25 * r + 1 for *_, cx, cy, r in scene_a.objects)
                   for y, x in zip(ys, xs))                 # a square's corners reach 1.2 r


def _pinned_digest(seed, shard, n, anomaly_rate=0.0, vocabulary="reference"):
    """Every sample's pixels (before JPEG, which depends on the codec) and labels but the JPEG digest."""
    h = hashlib.sha256()
    plan = world._plan(np.random.default_rng([seed, shard, 1]), n, anomaly_rate, world.ANOMALY_KINDS)
    for i, ((_, sample), kind) in enumerate(zip(world.iter_world(seed, shard, n, anomaly_rate, vocabulary=vocabulary),
                                                plan)):
        image, _, _ = world.make_pair(np.random.default_rng([seed, shard, 0, i]), kind, vocabulary)
        h.update(image.tobytes())
        h.update(json.dumps({k: v for k, v in sample.labels.items() if k != "sha256"}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def test_worlds_without_unseen_pairs_are_pinned():
    # computed at 75e978b, before worlds could withhold pairs: the reference, target and open worlds the
    # shipped model was trained, selected and evaluated on are unchanged by it
    assert _pinned_digest(7, 0, 40) == "55cf1b8d0c279e57"
    assert _pinned_digest(8, 1, 40, anomaly_rate=0.5) == "f5b2d2fe52cdbf4d"
    assert _pinned_digest(3, 0, 40, vocabulary="open") == "39ff38168d150253"


def _pairing(labels):
    return labels["shapes"], labels["colours"]


def test_unseen_pairs_world_withholds_them_though_each_shape_and_colour_is_common():
    plain = {k: s for k, s in world.iter_world(seed=5, shard=0, n=1200)}
    held = {k: s for k, s in world.iter_world(seed=5, shard=0, n=1200, unseen_pairs=True)}
    assert set(world.UNSEEN_PAIRS) <= {(s, c) for s in world.SHAPES for c in world.COLOURS}
    assert all(_pairing(s.labels) not in world.UNSEEN_PAIRS for s in held.values())
    shapes = Counter(s.labels["shapes"] for s in held.values())
    colours = Counter(s.labels["colours"] for s in held.values())
    for shape, colour in world.UNSEEN_PAIRS:                   # common: near 1/4 and 1/6 of the world
        assert shapes[shape] >= 0.15 * 1200 and colours[colour] >= 0.1 * 1200, (shapes, colours)
    assert set(shapes) == set(world.SHAPES) and set(colours) == set(world.COLOURS)
    # only the scenes that would show a withheld pair are drawn again; every other sample is the plain one
    redrawn = {k for k, s in plain.items() if _pairing(s.labels) in world.UNSEEN_PAIRS}
    assert 0.08 * 1200 < len(redrawn) < 0.25 * 1200
    for key in plain:
        same = plain[key].image == held[key].image and plain[key].labels == held[key].labels
        assert same == (key not in redrawn)


def test_unseen_pairing_anomalies_are_the_withheld_pairs_drawn_and_described(tmp_path):
    paths = shards.generate_world(tmp_path, 2, 180, seed=9, anomaly_rate=0.5, unseen_pairs=True)
    rows = shards.read_labels(tmp_path)
    counts = Counter(r["anomaly"] for r in rows)
    assert set(counts) - {None} == set(world.ALL_ANOMALY_KINDS) and counts["unseen_pairing"] == 20
    data = {m.name: d for p in paths for m, d in _members(p)}
    for row in rows:
        kind, pairing = row["anomaly"], _pairing(row)
        if kind != "unseen_pairing":                           # nothing else shows a withheld pair
            assert pairing not in world.UNSEEN_PAIRS
            if kind == "mismatch":
                assert not any(f"{c} {s}" in row["caption"] for s, c in world.UNSEEN_PAIRS)
            continue
        assert row["anomaly_modality"] == "scene" and pairing in world.UNSEEN_PAIRS
        shape, colour = pairing
        assert f"{colour} {world._plural(shape, row['count'])}" in row["caption"]   # the caption agrees
        # and so does the image: the object's colour, as drawn, is the named one
        img = _decode(data[f"{row['key']}.jpg"]).astype(float)
        o = row["objects"][0]
        centre = img[int(o["y"]) - 1:int(o["y"]) + 2, int(o["x"]) - 1:int(o["x"]) + 2].reshape(-1, 3).mean(0)
        nearest = min(world.OPEN_COLOURS, key=lambda c: np.abs(centre - world.OPEN_COLOURS[c]).sum())
        assert nearest == colour, (row["key"], centre, colour)


def test_unseen_pairing_needs_a_world_that_withholds_the_pairs(tmp_path):
    assert world.validate(0.3, None) == world.ANOMALY_KINDS                 # the default kinds are unchanged
    assert world.validate(0.3, None, unseen_pairs=True) == world.ALL_ANOMALY_KINDS
    with pytest.raises(ValueError, match="unseen_pairs=True"):
        shards.generate_world(tmp_path, 1, 4, 0, 0.5, ["unseen_pairing"])
    with pytest.raises(ValueError, match="unseen_pairs=True"):
        world.make_pair(np.random.default_rng(0), "unseen_pairing")
    with pytest.raises(ValueError, match="open world has all"):
        shards.generate_world(tmp_path, 1, 4, 0, vocabulary="open", unseen_pairs=True)
    assert world.anomaly_modality("unseen_pairing") == "scene"


SCENE_FIELDS = ("background", "count", "position", "style", "shapes", "colours", "sizes", "objects")


def test_duplicates_redraw_a_normal_scene_under_a_miscounting_caption(tmp_path):
    paths = shards.generate_world(tmp_path, 2, 100, seed=4, anomaly_rate=0.3, unseen_pairs=True,
                                  duplicate_rate=0.1)
    rows = {r["key"]: r for r in shards.read_labels(tmp_path)}
    data = {m.name: d for p in paths for m, d in _members(p)}
    copies = {k: r["duplicate_of"] for k, r in rows.items() if r["duplicate_of"] is not None}
    assert len(copies) == 20 and len(set(copies.values())) == 20            # 10 a shard, each of its own source
    assert Counter(r["anomaly"] for r in rows.values())[None] == 140         # the anomalies are as many as before
    for copy, source in copies.items():
        c, s = rows[copy], rows[source]
        assert copy[:5] == source[:5] and source not in copies               # same shard; a source is no copy
        assert c["anomaly"] is None and s["anomaly"] is None and s["duplicate_of"] is None
        assert {f: c[f] for f in SCENE_FIELDS} == {f: s[f] for f in SCENE_FIELDS}   # the image's truth
        assert c["sha256"] != s["sha256"]                                    # near, not byte-identical
        diff = np.abs(_decode(data[f"{copy}.jpg"]) - _decode(data[f"{source}.jpg"]))
        assert 0 < diff.mean() < 2.0 and diff.max() < 40, (copy, diff.mean(), diff.max())
        words = c["caption"].split()
        if s["count"] == 1:                                                  # one object told as two or three
            assert {"two", "three"} & set(words) and world._plural(s["shapes"], 2) in c["caption"]
        else:                                                                # several told as one
            assert not {"two", "three"} & set(words) and world._plural(s["shapes"], 2) not in words
            assert s["shapes"] in words
    # every other row is the one of the world without duplicates (which has no duplicate_of label)
    plain = {k: s for k, s in world.iter_world(4, 0, 100, 0.3, unseen_pairs=True)}
    for key, sample in plain.items():
        assert "duplicate_of" not in sample.labels
        same = sample.labels == {k: v for k, v in rows[key].items() if k != "duplicate_of"} and \
            sample.image == data[f"{key}.jpg"]
        assert same == (key not in copies), key


def test_duplicate_rate_is_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"duplicate_rate must be in \[0, 0.5\], got 0.6"):
        shards.generate_world(tmp_path / "a", 1, 10, 0, duplicate_rate=0.6)
    with pytest.raises(ValueError, match="anomaly_rate \\+ 2 \\* duplicate_rate must be <= 1, got 0.5 \\+ 2 \\* 0.3"):
        shards.generate_world(tmp_path / "b", 1, 10, 0, anomaly_rate=0.5, duplicate_rate=0.3)
    with pytest.raises(ValueError, match="the open world holds none"):
        shards.generate_world(tmp_path / "c", 1, 10, 0, vocabulary="open", duplicate_rate=0.1)
    assert not any(tmp_path.iterdir())
    # at the limit every normal row is a copy or its source
    rows = [s.labels for _, s in world.iter_world(1, 0, 10, anomaly_rate=0.2, duplicate_rate=0.4)]
    assert sum(r["duplicate_of"] is not None for r in rows) == 4 and sum(r["anomaly"] is None for r in rows) == 8
