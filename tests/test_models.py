"""Model names people use, and models that are not there: hf-hub repositories from a local Hugging Face
cache the test builds, --cache-dir, and one-line refusals before Ray starts."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import pipeline
from pipeline.errors import ConfigError
from pipeline.models import MODEL_CONFIGS, ModelSpec, cached_weights, model_identity, preflight

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo="wclip-test/tiny"):
    """A Hugging Face cache holding an open_clip model repository, laid out as huggingface_hub lays it out:
    models--org--name/{refs/main, snapshots/<revision>/{open_clip_config.json, open_clip_model.safetensors}}."""
    from safetensors.torch import save_file

    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    model_cfg = json.loads((MODEL_CONFIGS / "wclip-tiny.json").read_text())
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    model, _, _ = pipeline.models.load_spec(ModelSpec("wclip-tiny", random_init=True, seed=3))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(snapshot / "open_clip_model.safetensors"))
    return root, state


def test_an_hf_hub_model_loads_offline_from_the_cache(tmp_path, monkeypatch):
    cache, state = hub_cache(tmp_path / "hf")
    spec = ModelSpec("hf-hub:wclip-test/tiny", cache_dir=str(cache))
    assert cached_weights(spec).name == "open_clip_model.safetensors"
    preflight(spec)  # cached: nothing to fetch
    model, preprocess, tokenizer = pipeline.models.load_spec(spec)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert tokenizer(["a red circle"]).shape[1] == 16
    import hashlib
    digest = hashlib.sha256(cached_weights(spec).read_bytes()).hexdigest()
    assert model_identity(spec) == {"model": "hf-hub:wclip-test/tiny", "weights": f"hf-hub:sha256:{digest}"}


def test_hf_hub_models_take_no_other_weight_source():
    with pytest.raises(ValueError, match="carries its weights in its repository; drop --pretrained"):
        ModelSpec("hf-hub:org/x", pretrained="laion2b_s34b_b79k")


def test_weights_that_are_not_cached_offline_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"the weights of ViT-B-32 \(laion2b_s34b_b79k\) are not in .*empty.* "
                                          r"cannot be reached: .*--cache-dir.*--checkpoint"):
        preflight(ModelSpec("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"the weights of hf-hub:nobody/nothing are not in"):
        preflight(ModelSpec("hf-hub:nobody/nothing", cache_dir=str(tmp_path / "empty")))


def test_unknown_models_and_tags_are_named():
    with pytest.raises(ConfigError, match=r"unknown model 'ViT-B-33' \(did you mean ViT-B-32"):
        preflight(ModelSpec("ViT-B-33", random_init=True))
    with pytest.raises(ConfigError, match=r"model ViT-B-32 has no pretrained tag 'laion9'; its tags: openai, "):
        preflight(ModelSpec("ViT-B-32", pretrained="laion9"))


def _wclip(*args, env=None):
    full = dict(os.environ, **(env or {}))
    full.pop("RAY_ADDRESS", None)
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=full,
                         timeout=300)
    return out, time.time() - started


def test_the_command_line_refuses_before_ray_starts(tmp_path):
    from shardkit import clean_shards

    urls = clean_shards(tmp_path, shards=1, per_shard=2)
    cases = [
        (["--model", "ViT-B-33", "--random-init"], "unknown model 'ViT-B-33'"),
        (["--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k", "--cache-dir", str(tmp_path / "c")],
         "the weights of ViT-B-32 (laion2b_s34b_b79k) are not in"),
        (["--model", "wclip-tiny", "--random-init", "--device", "cuda"], "no usable CUDA GPU"),
    ]
    if torch.cuda.is_available():
        cases.pop()
    for flags, message in cases:
        out, seconds = _wclip("fit", "--input", *urls, "--output", str(tmp_path / "s.safetensors"), *flags,
                              env={"HF_HUB_OFFLINE": "1"})
        assert out.returncode == 2, out.stderr
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith("wclip fit: error: "), out.stderr
        assert seconds < 30 and not (tmp_path / "s.safetensors").exists()


def test_help_is_quiet_and_complete():
    from pipeline.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in COMMANDS:
        command = sub.choices[name]
        text = command.format_help()
        assert "(default: None)" not in text and "default: default" not in text, name
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"wclip {name} {action.option_strings[0]} has no help"
                assert command._get_formatter()._get_help_string(action).lower().count("default") <= 1, name


def test_a_hub_model_scores_end_to_end_offline(tmp_path, ray_local):
    from shardkit import clean_shards, tiny_run

    from pipeline.config import FitConfig
    from pipeline.runs.fit import fit
    from pipeline.whitening import StatsFile

    cache, _ = hub_cache(tmp_path / "hf")
    spec = ModelSpec("hf-hub:wclip-test/tiny", cache_dir=str(cache))
    urls = clean_shards(tmp_path, shards=1, per_shard=24)
    fit(FitConfig(run=tiny_run(urls, model=spec), output=str(tmp_path / "s.safetensors"), components=4))
    meta = StatsFile.load(tmp_path / "s.safetensors").metadata
    assert meta["model_identity"] == model_identity(spec) and meta["model"] == "hf-hub:wclip-test/tiny"
    assert np.isfinite(meta["summary"]["image"]["log_det"])


def test_an_unknown_model_without_a_weight_source_is_named_with_suggestions():
    with pytest.raises(ValueError, match=r"^unknown model 'wclip-dem' \(did you mean wclip-demo"):
        ModelSpec("wclip-dem")
    with pytest.raises(ValueError, match=r"^unknown model 'vit-b-32' \(did you mean ViT-B-32"):
        ModelSpec("vit-b-32")  # case is ignored when suggesting
    with pytest.raises(ConfigError, match=r"^unknown model 'qqqqqqqq' \(did you mean \w"):
        preflight(ModelSpec("qqqqqqqq", random_init=True))  # nothing close: still the nearest names
    with pytest.raises(ValueError, match=r"'wclip-tiny' has no weights"):
        ModelSpec("wclip-tiny")  # a known architecture without weights keeps its message
