"""End to end on real Ray, real tar shards, real Parquet and a tiny random-init open_clip model."""


import numpy as np
import pyarrow.parquet as pq
import pytest
from shardkit import clean_shards, marker, tiny_run

from pipeline.config import FitConfig, RunConfig, ScoreConfig
from pipeline.errors import ConfigError
from pipeline.models import ModelSpec
from pipeline.runs.fit import fit
from pipeline.runs.score import score
from pipeline.whitening import StatsFile


def run_cfg(urls, **kw):
    return tiny_run(urls, chunk_size=16, **kw)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, ray_local):
    folder = tmp_path_factory.mktemp("ref")
    urls = clean_shards(folder, shards=3, per_shard=40)
    stats_path = str(folder / "stats.safetensors")
    summary = fit(FitConfig(run=run_cfg(urls), output=stats_path, components=16, holdout=0.2))
    return urls, stats_path, summary


def test_fit_records_provenance(fitted):
    urls, stats_path, summary = fitted
    stats = StatsFile.load(stats_path)
    meta = stats.metadata
    assert summary["reference_samples"] == 120
    assert meta["n_reference"] == 120
    assert meta["model_identity"] == {"model": "wclip-tiny", "weights": "random-init:seed=0"}
    assert meta["normalize"] is False
    assert meta["reference_shards"] == 3
    assert set(stats.towers) == {"image", "text"}
    for ws in stats.towers.values():
        assert ws.dim == 32
        assert ws.n_fit + ws.n_heldout == 120
        assert 10 <= ws.n_heldout <= 40  # ~20% by key hash


def test_score_rows_match_direct_encoding(fitted, tmp_path):
    import io
    import tarfile

    import torch
    from PIL import Image

    import pipeline

    urls, stats_path, _ = fitted
    stats = StatsFile.load(stats_path)
    out = tmp_path / "scores"
    summary = score(ScoreConfig(run=run_cfg(urls[:1]), stats_path=stats_path, output=str(out)), stats)
    assert summary["rows"] == 40 and not summary["failed"]
    table = pq.read_table(out / "00000.parquet")
    assert table.num_rows == 40
    rows = table.to_pylist()
    assert [r["index"] for r in rows] == list(range(40))
    assert all(r["status"] == "ok" and r["error"] is None for r in rows)
    assert rows[3]["uid"] == f"{3:032x}" and rows[3]["url"] == "http://example.com/3.jpg"
    record = marker(out, "00000")
    assert record["rows"] == 40 and record["status_counts"] == {"ok": 40}

    # Independent reference: open_clip's own preprocess on PIL images, encode_*, WhiteningStats in float64.
    model, preprocess, tokenizer = pipeline.load_clip("wclip-tiny", random_init=True)
    members = {}
    with tarfile.open(urls[0]) as tar:
        for m in tar.getmembers():
            members[m.name] = tar.extractfile(m).read()
    keys = [r["key"] for r in rows]
    with torch.no_grad():
        imgs = torch.stack([preprocess(Image.open(io.BytesIO(members[k + ".jpg"]))) for k in keys])
        img_emb = model.encode_image(imgs).double().numpy()
        txt_emb = model.encode_text(tokenizer([members[k + ".txt"].decode() for k in keys])).double().numpy()
    for tower, emb in (("image", img_emb), ("text", txt_emb)):
        ws = stats.towers[tower]
        np.testing.assert_allclose(table[f"{tower}_sqnorm"].to_numpy(), ws.sqnorm(emb), rtol=1e-5)
        np.testing.assert_allclose(table[f"{tower}_loglik"].to_numpy(), ws.loglik(emb), rtol=1e-5)
        # p-values are a step function of sqnorm: equal to the reference up to one calibration step
        # (a reference row scored against its own held-out value may land on either side of the tie).
        step = 1.0 / (ws.n_heldout + 1)
        assert np.abs(table[f"{tower}_pvalue"].to_numpy() - ws.pvalue(emb)).max() <= step + 1e-6
    cos = (img_emb * txt_emb).sum(1) / np.linalg.norm(img_emb, axis=1) / np.linalg.norm(txt_emb, axis=1)
    np.testing.assert_allclose(table["clip_score"].to_numpy(), cos, rtol=1e-4, atol=1e-6)


def test_score_refuses_a_different_model_before_any_work(fitted, tmp_path):
    urls, stats_path, _ = fitted
    stats = StatsFile.load(stats_path)
    other = RunConfig(shards=tuple(urls), model=ModelSpec("wclip-tiny", random_init=True, seed=1), progress=False)
    out = tmp_path / "scores"
    with pytest.raises(ConfigError, match="model mismatch.*random-init:seed=0.*random-init:seed=1"):
        score(ScoreConfig(run=other, stats_path=stats_path, output=str(out)), stats)
    assert not out.exists() or not any(out.iterdir())


def _direct_embeddings(urls):
    """Keys ('<shard>/<key>') and raw embeddings of every sample, by open_clip directly."""
    import io
    import tarfile

    import torch
    from PIL import Image

    import pipeline

    model, preprocess, tokenizer = pipeline.load_clip("wclip-tiny", random_init=True)
    keys, imgs, caps = [], [], []
    for url in urls:
        name = url.rsplit("/", 1)[1][:-4]
        with tarfile.open(url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for k in sorted({n.split(".")[0] for n in members}):
            keys.append(f"{name}/{k}")
            imgs.append(preprocess(Image.open(io.BytesIO(members[k + ".jpg"]))))
            caps.append(members[k + ".txt"].decode())
    with torch.no_grad():
        return keys, {"image": model.encode_image(torch.stack(imgs)).double().numpy(),
                      "text": model.encode_text(tokenizer(caps)).double().numpy()}


def test_distributed_fit_equals_a_single_pass_fit(fitted):
    from pipeline.whitening import WhiteningStats

    urls, stats_path, _ = fitted
    stats = StatsFile.load(stats_path)
    keys, emb = _direct_embeddings(urls)
    for tower in ("image", "text"):
        ref = WhiteningStats.fit(emb[tower], components=16, holdout=0.2, seed=0, keys=keys)
        got = stats.towers[tower]
        assert got.n_fit == ref.n_fit and got.n_heldout == ref.n_heldout
        np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.eigenvalues, ref.eigenvalues, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(got.calibration, ref.calibration, rtol=1e-4)


def test_max_samples_caps_the_reference_set_deterministically(fitted, tmp_path):
    urls, _, _ = fitted
    sizes = []
    for attempt in range(2):
        path = str(tmp_path / f"capped{attempt}.safetensors")
        fit(FitConfig(run=run_cfg(urls), output=path, components=8, holdout=0.2, max_samples=70))
        sizes.append(StatsFile.load(path))
    a, b = sizes
    assert a.metadata["n_reference"] == 70 and a.metadata["reference_shards"] == 2
    for tower in ("image", "text"):
        assert a.towers[tower].n_fit + a.towers[tower].n_heldout == 70
        np.testing.assert_array_equal(a.towers[tower].mean, b.towers[tower].mean)
        np.testing.assert_array_equal(a.towers[tower].calibration, b.towers[tower].calibration)


def test_max_heldout_keeps_the_heldout_rows_with_the_smallest_key_hashes(fitted, tmp_path):
    from pipeline.whitening.moments import held_out, key_hashes

    urls, full_path, _ = fitted
    full = StatsFile.load(full_path)
    path = str(tmp_path / "bounded.safetensors")
    fit(FitConfig(run=run_cfg(urls), output=path, components=16, holdout=0.2, max_heldout=5))
    bounded = StatsFile.load(path)
    assert bounded.metadata["max_heldout"] == 5 and bounded.metadata["n_heldout"] == {"image": 5, "text": 5}
    keys, emb = _direct_embeddings(urls)
    hashes = key_hashes(keys, 0)
    held = np.flatnonzero(held_out(hashes, 0.2))
    smallest = held[np.argsort(hashes[held])[:5]]
    for tower in ("image", "text"):
        got, whole = bounded.towers[tower], full.towers[tower]
        assert got.n_fit == whole.n_fit and whole.n_heldout > 5  # the fit rows are the same; 5 held-out kept
        np.testing.assert_array_equal(got.mean, whole.mean)
        np.testing.assert_allclose(got.calibration, np.sort(got.sqnorm(emb[tower][smallest])), rtol=1e-4)


def test_a_tar_fit_with_a_failed_shard_writes_no_stats_and_exits_1(fitted, tmp_path, capsys):
    import json

    from pipeline.cli import main

    urls, _, _ = fitted
    junk = tmp_path / "00009.tar"
    junk.write_bytes(b"garbage" * 100)
    stats = tmp_path / "part.safetensors"
    code = main(["fit", "--input", urls[0], str(junk), "--model", "wclip-tiny", "--random-init", "--output",
                 str(stats), "--components", "8", "--executor", "local", "--no-progress", "--retries", "0"])
    out, err = capsys.readouterr()
    assert code == 1 and not stats.exists()
    assert f"fit -> {stats} NOT WRITTEN (1 of 2 shards failed: mend or remove them and rerun)" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stats"] is None and summary["not_written"] == "1 of 2 shards failed"
    assert [f["shard"] for f in summary["failed"]] == [str(junk)]
    assert "not a readable tar" in summary["failed"][0]["error"]
