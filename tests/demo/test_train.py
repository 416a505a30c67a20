"""The shipped wclip-demo model: loads strictly, preprocesses as trained, separates pairs; retrainable."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import models
from pipeline.cli import main as cli_main
from pipeline.demo import MODEL, metrics, world
from pipeline.demo import train as demo_train

TRAIN_RECORD = demo_train.RECORD_PATH


@pytest.fixture(scope="module")
def shipped():
    """The shipped model, loaded the way pipeline.models.load_clip loads it."""
    import open_clip
    from safetensors.torch import load_file

    open_clip.add_model_config(str(demo_train.CONFIG_PATH))
    model, _, preprocess = open_clip.create_model_and_transforms("wclip-demo", pretrained=None)
    state = load_file(str(demo_train.WEIGHTS_PATH))
    missing = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    model.eval()
    return model, preprocess, open_clip.get_tokenizer("wclip-demo")


def test_weights_file_is_small_and_matches_its_record():
    size = demo_train.WEIGHTS_PATH.stat().st_size
    assert size <= 10 * 1024 * 1024
    record = json.loads(TRAIN_RECORD.read_text())
    assert record["weights_sha256"] == hashlib.sha256(demo_train.WEIGHTS_PATH.read_bytes()).hexdigest()
    assert record["weights_bytes"] == size
    assert record["config"] == json.loads(demo_train.CONFIG_PATH.read_text())
    assert record["final_loss"] < record["first_loss"] / 2


def test_the_demo_model_is_built_in_by_its_files():
    # a config in assets/ with weights beside it makes a built-in model; model_configs/ holds architectures only
    assert MODEL in models.builtin_models() and "wclip-tiny" not in models.builtin_models()
    assert set(models.builtin_configs()) >= {MODEL, "wclip-tiny"}
    assert "wclip-demo.train" not in models.builtin_configs()              # a record, not an architecture
    assert demo_train.CONFIG_PATH == models.builtin_configs()[MODEL] == models.ASSETS / "wclip-demo.json"
    assert demo_train.WEIGHTS_PATH == models.builtin_weights(MODEL) == models.ASSETS / "wclip-demo.safetensors"
    assert demo_train.RECORD_PATH == models.ASSETS / "wclip-demo.train.json"
    assert models.builtin_weights("wclip-tiny") is None and models.builtin_weights("ViT-B-32") is None
    models.ModelSpec(MODEL)                                                 # needs no weight source
    with pytest.raises(ValueError, match="'wclip-tiny' has no weights.*built-in offline models.*wclip-demo"):
        models.ModelSpec("wclip-tiny")
    # the identity that stats files recorded before models became data, unchanged
    sha = hashlib.sha256(demo_train.WEIGHTS_PATH.read_bytes()).hexdigest()
    assert models.model_identity(models.ModelSpec(MODEL)) == {"model": MODEL, "weights": f"builtin:sha256:{sha}"}


def test_recorded_evaluation_meets_targets():
    record = json.loads(TRAIN_RECORD.read_text())
    ev = record["eval"]
    assert ev["eval_seed"] == demo_train.EVAL_SEED != record["selection"]["validation_seed"]
    assert ev["n_reference"] == ev["n_target"] == 4000 and ev["anomaly_rate"] == 0.2
    # scored by the product: WhiteningStats fitted as `wclip demo` fits (recomputed without retraining)
    assert ev["scorer"] == "pipeline.whitening.WhiteningStats"
    assert {k: ev["fit"][k] for k in metrics.FIT} == metrics.FIT
    assert "2026-12-02" in record["eval_note"] and "WhiteningStats" in record["eval_note"]
    assert "without retraining" in record["eval_note"] and record["weights_sha256"] in record["eval_note"]
    assert record["eval_previous"]["auroc"].keys() == ev["auroc"].keys()
    # the targets, met by the shipped model on the held-out test world for every kind
    assert set(ev["auroc"]) == set(world.ANOMALY_KINDS)
    for kind, value in ev["auroc"].items():
        assert value >= 0.95, kind
    assert ev["auroc_image_all"] >= 0.95 and ev["auroc_caption"] >= 0.95 and ev["auroc_pair"] >= 0.95
    assert ev["noise_frac_p_below_0.01"] >= 0.95 and ev["gibberish_frac_p_below_0.01"] >= 0.95
    assert max(ev["clean_frac_p_below_0.01"].values()) <= 0.03        # calibrated on clean rows
    assert all(0.8 <= v <= 1.2 for v in ev["held_sqnorm_per_m"].values())  # "auto" components: sqnorm/m near 1
    assert all(700 <= n <= 900 for n in ev["held_out"].values())      # 0.2 of 4000, by key hash
    assert "damaged" in record["notes"] and "shape" in record["notes"]
    assert record["warm_start_steps"] == list(demo_train.WARM_START_STEPS) and record["concepts"] == ["shape", "colour"]
    assert record["train_seconds"] <= 15 * 60
    assert (record["splice_rate"], record["splice_keep"], record["norm_weight"]) == \
        (demo_train.SPLICE_RATE, demo_train.SPLICE_KEEP, demo_train.NORM_WEIGHT)
    assert max(ev["reference_norm_cv"].values()) <= 0.1
    assert record["world"] == "open" and record["hard_negatives"] is True


def test_tokenizer_and_preprocess_are_what_training_used(shipped):
    model, preprocess, tokenizer = shipped
    assert tokenizer(["a red circle"]).shape == (1, 32)
    assert model.token_embedding.num_embeddings == 49408
    image, _, _ = world.make_pair(np.random.default_rng(0))
    pil = Image.open(io.BytesIO(world.encode_jpeg(image))).convert("RGB")
    expected = (torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255
                - torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]) \
        / torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    assert torch.allclose(preprocess(pil), expected, atol=1e-5)


def test_matching_pairs_score_higher_than_mismatched(shipped):
    model, preprocess, tokenizer = shipped
    samples = [s for _, s in world.iter_world(seed=123, shard=0, n=48)]
    img, txt = metrics.embed(model, preprocess, tokenizer, samples)
    assert np.isfinite(img).all() and np.isfinite(txt).all() and img.shape == txt.shape == (48, 64)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    cos = img @ txt.T
    matching, other = np.diag(cos), cos[~np.eye(48, dtype=bool)]
    assert matching.mean() - other.mean() > 0.5
    assert (matching > np.percentile(other, 90)).mean() > 0.95
    assert (cos.argmax(axis=1) == np.arange(48)).mean() > 0.3         # chance: 1/48; captions are ambiguous


def test_raw_embedding_norms_barely_vary(shipped):
    # whitening reads raw embeddings; training keeps their norms alike (the model before had ~20% spread)
    img, txt = metrics.embed(*shipped, [s for _, s in world.iter_world(seed=31, shard=0, n=300)])
    for x in (img, txt):
        norms = np.linalg.norm(x, axis=1)
        assert norms.std() / norms.mean() < 0.08


def test_evaluate_only_rewrites_the_evaluation_of_the_same_weights(tmp_path, capsys):
    weights = tmp_path / "wclip-demo.safetensors"
    weights.write_bytes(demo_train.WEIGHTS_PATH.read_bytes())
    record = json.loads(TRAIN_RECORD.read_text())
    demo_train.write_record(demo_train.record_path(weights), record)
    assert cli_main(["train-demo", "--evaluate-only", "--eval-samples", "400", "--output", str(weights)]) == 0
    assert "rewrote the evaluation" in capsys.readouterr().out
    after = json.loads((tmp_path / "wclip-demo.train.json").read_text())
    assert weights.read_bytes() == demo_train.WEIGHTS_PATH.read_bytes()              # no training
    assert {k: v for k, v in after.items() if not k.startswith("eval")} == \
        {k: v for k, v in record.items() if not k.startswith("eval")}
    ev = after["eval"]
    assert after["eval_previous"]["auroc"] == record["eval"]["auroc"] and "without retraining" in after["eval_note"]
    assert ev["n_reference"] == ev["n_target"] == 400 and ev["eval_seed"] == demo_train.EVAL_SEED
    assert ev["auroc"]["noise"] >= 0.95 and ev["auroc"]["gibberish"] >= 0.95
    assert 0.5 < ev["held_sqnorm_per_m"]["image"] < 2.0
    # other weights than the record's: refused, nothing rewritten
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert cli_main(["train-demo", "--evaluate-only", "--eval-samples", "400", "--output", str(weights)]) == 2
    assert "describes weights with sha256" in capsys.readouterr().err
    assert json.loads((tmp_path / "wclip-demo.train.json").read_text()) == after
    assert cli_main(["train-demo", "--evaluate-only", "--output", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_demo_cli_writes_loadable_weights(tmp_path):
    out = tmp_path / "tiny.safetensors"
    rc = cli_main(["train-demo", "--steps", "2", "--batch-size", "8", "--eval-samples", "0",
                   "--warm-start", "1,1", "--output", str(out)])
    assert rc == 0
    record = json.loads((tmp_path / "tiny.train.json").read_text())
    assert record["steps"] == 2 and np.isfinite(record["final_loss"]) and "eval" not in record
    assert [w["steps"] for w in record["warm_start"]] == [1, 1] and record["concepts"] == ["shape", "colour"]
    assert "--warm-start 1,1 --concept-weight 0.3 --splice-rate 0.5 --splice-keep 16 --norm-weight 10" \
        in record["command"]
    assert (record["splice_rate"], record["splice_keep"], record["norm_weight"]) == (0.5, 16, 10.0)
    model, _, _ = demo_train.create_model()
    demo_train.load_weights(model, out)
    before = dict(model.state_dict())
    demo_train.load_weights(model, out)                               # idempotent, strict
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_demo_cli_refuses_bad_options(tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    assert cli_main(["train-demo", "--steps", "1", "--twins", "1.5", "--output", str(out)]) == 2
    assert "--twins must be between 0 and 1 (got 1.5)" in capsys.readouterr().err
    assert cli_main(["train-demo", "--steps", "1", "--output", str(tmp_path / "w.pt")]) == 2
    assert "--output must end with .safetensors" in capsys.readouterr().err
    for bad in ("300", "a,b", "1,-1", "1,2,3"):
        assert cli_main(["train-demo", "--warm-start", bad, "--output", str(out)]) == 2
        assert f"--warm-start takes two step counts >= 0, CONCEPTS,ALL such as 450,150 (got '{bad}')" \
            in capsys.readouterr().err
    assert cli_main(["train-demo", "--concept-weight", "-1", "--output", str(out)]) == 2
    assert "--concept-weight must be >= 0 (got -1.0)" in capsys.readouterr().err
    for bad in (["--splice-rate", "1.5"], ["--splice-keep", "-1"], ["--norm-weight", "-2"]):
        assert cli_main(["train-demo", *bad, "--output", str(out)]) == 2
        assert "need --splice-rate between 0 and 1, --splice-keep >= 0 and --norm-weight >= 0" \
            in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "w.pt").exists()


def test_pipeline_load_clip_gives_the_same_model(shipped):
    model, preprocess, tokenizer = models.load_clip("wclip-demo")
    sample = next(iter(world.iter_world(seed=9, shard=0, n=1)))[1]
    ours = metrics.embed(*shipped, [sample])
    theirs = metrics.embed(model, preprocess, tokenizer, [sample])
    assert np.allclose(ours[0], theirs[0]) and np.allclose(ours[1], theirs[1])


def test_hard_negatives_change_only_what_they_say():
    rng = np.random.default_rng(0)
    captions = [s.caption for _, s in world.iter_world(seed=4, shard=0, n=200, vocabulary="open")]
    order = demo_train.word_order_negatives(captions, rng)
    swapped = demo_train.shape_negatives(captions, rng)
    shape_words = set(demo_train._SHAPE_WORDS)
    for caption, o, s in zip(captions, order, swapped):
        words = caption.replace(",", "").split()
        assert sorted(o.split()) == sorted(words) and o != " ".join(words)     # same words, other order
        named = [w.rstrip(",") for w in caption.split() if w.rstrip(",") in shape_words]
        if not named:                                                      # an empty scene
            assert sorted(s.split()) == sorted(words) and s != " ".join(words)
            continue
        diff = [(a, b) for a, b in zip(caption.split(), s.split()) if a != b]
        assert len(s.split()) == len(caption.split()) and len(diff) == 1
        old, new = (w.rstrip(",") for w in diff[0])
        assert demo_train._SHAPE_WORDS[old][0] != demo_train._SHAPE_WORDS[new][0]
        assert demo_train._SHAPE_WORDS[old][1] == demo_train._SHAPE_WORDS[new][1]   # number kept
    assert any(c.split()[-1] == "crosses" or "crosses " in c for c in captions + swapped)


def test_contrastive_loss_matches_clip_loss_without_negatives():
    import open_clip

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    scale = torch.tensor(10.0)
    ours = demo_train.contrastive_loss(img, txt, None, scale)
    assert torch.allclose(ours, open_clip.ClipLoss()(img, txt, scale))
    neg = torch.nn.functional.normalize(torch.randn(16, 16, generator=g), dim=1)
    with_neg = demo_train.contrastive_loss(img, txt, neg, scale)
    per_image = torch.nn.functional.cross_entropy(scale * img @ torch.cat([txt, neg]).T, torch.arange(8))
    per_text = torch.nn.functional.cross_entropy(scale * txt @ img.T, torch.arange(8))
    assert torch.allclose(with_neg, (per_image + per_text) / 2) and with_neg > ours
