"""Precomputed embeddings in (clip-retrieval / LAION folders, DataComp .npz shards) and clip-retrieval's layout
out (--save-embeddings), --dry-run; on real Ray, real .npy/.npz and real Parquet written the way those tools
write them."""

import io
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from shardkit import clean_shards, image_bytes, marker, state, tiny_run, write_shard

from pipeline.cli import main
from pipeline.config import (
    EmbeddingFitConfig,
    EmbeddingRunConfig,
    EmbeddingScoreConfig,
    FitConfig,
    ScoreConfig,
)
from pipeline.errors import ConfigError
from pipeline.runs.fit import fit
from pipeline.runs.score import score
from pipeline.whitening import StatsFile, WhiteningStats

D = 24
ROWS = (120, 90, 0)  # the last file is empty
NAN_ROW = (1, 7)  # file 1, row 7: NaN image embedding


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _vectors(rng, rows, d, shift):
    basis = np.random.default_rng(d).standard_normal((d, d)) * np.linspace(1.0, 0.2, d)
    return _unit(rng.standard_normal((rows, d)) @ basis + shift)


def write_clip_retrieval(folder, rows=ROWS, d=D, seed=0, nan_row=NAN_ROW):
    """A folder as `clip-retrieval inference` writes it: np.save'd float16 arrays, metadata by pandas."""
    rng = np.random.default_rng(seed)
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for n, count in enumerate(rows):
        img, txt = _vectors(rng, count, d, 2.0), _vectors(rng, count, d, -1.0)
        if nan_row and n == nan_row[0]:
            img[nan_row[1]] = np.nan
        for sub, arr in (("img_emb/img_emb", img), ("text_emb/text_emb", txt)):
            buf = io.BytesIO()
            np.save(buf, arr)
            (folder / f"{sub}_{n}.npy").write_bytes(buf.getbuffer())
        pd.DataFrame({"image_path": [f"{n:05d}{i:04d}" for i in range(count)],
                      "caption": [f"caption {n}-{i}" for i in range(count)],
                      "url": [f"http://example.com/{n}/{i}.jpg" for i in range(count)],
                      "width": np.full(count, 256)}).to_parquet(folder / "metadata" / f"metadata_{n}.parquet")
    return folder


def write_datacomp(folder, shards=2, rows=60, seed=1):
    """DataComp-style shards: {shard}.npz (l14_img, l14_txt, b32_img, b32_txt) beside {shard}.parquet."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        name = f"{s:08d}"
        np.savez(folder / f"{name}.npz", l14_img=_vectors(rng, rows, D, 1.0), l14_txt=_vectors(rng, rows, D, -1.0),
                 b32_img=_vectors(rng, rows, 16, 1.0), b32_txt=_vectors(rng, rows, 16, 0.5))
        pd.DataFrame({"uid": [f"{s:016x}{i:016x}" for i in range(rows)],
                      "url": [f"http://x/{s}/{i}" for i in range(rows)],
                      "text": [f"text {s} {i}" for i in range(rows)], "original_width": np.full(rows, 512)}
                     ).to_parquet(folder / f"{name}.parquet")
    return folder


def _run(paths, key=None, **kw):
    return EmbeddingRunConfig(paths=tuple(str(p) for p in paths), key=key, **{"progress": False, **kw})


def _rows(folder, tower):
    sub = {"image": "img_emb/img_emb", "text": "text_emb/text_emb"}[tower]
    return [np.load(folder / f"{sub}_{n}.npy") for n in range(len(ROWS))]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("emb")
    folder = write_clip_retrieval(root / "laion")
    stats = str(root / "stats.safetensors")
    summary = fit(EmbeddingFitConfig(run=_run([folder]), output=stats, components=12, holdout=0.2))
    return folder, stats, summary


def _reference_stats(folder, tower):
    """The fit computed here, independently: WhiteningStats.fit on every finite row, held out by key hash."""
    keys, rows = [], []
    for n, arr in enumerate(_rows(folder, "image")):
        other = _rows(folder, "text")[n]
        meta = pd.read_parquet(folder / "metadata" / f"metadata_{n}.parquet")
        ok = np.isfinite(arr.astype(np.float64)).all(1) & np.isfinite(other.astype(np.float64)).all(1)
        keys += [f"metadata_{n}/{k}" for k in meta["image_path"][ok]]
        rows.append((arr if tower == "image" else other)[ok])
    return WhiteningStats.fit(np.concatenate(rows).astype(np.float64), components=12, holdout=0.2, seed=0, keys=keys)


def test_fit_matches_an_independent_fit_and_records_the_kind(clip_folder):
    folder, stats_path, summary = clip_folder
    stats = StatsFile.load(stats_path)
    meta = stats.metadata
    assert meta["model_identity"] == {"model": "embeddings:clip-retrieval", "weights": "precomputed"}
    assert meta["normalize"] is True and meta["embeddings"]["kind"] == "clip-retrieval"
    assert meta["n_reference"] == summary["reference_samples"] == sum(ROWS) - 1 and meta["reference_shards"] == 3
    for tower in ("image", "text"):
        ref, got = _reference_stats(folder, tower), stats.towers[tower]
        assert got.n_fit == ref.n_fit and got.n_heldout == ref.n_heldout
        np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got.eigenvalues, ref.eigenvalues, rtol=1e-8, atol=1e-14)
        np.testing.assert_allclose(np.abs(got.whitening), np.abs(ref.whitening), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(got.calibration, ref.calibration, rtol=1e-8)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_scores_are_row_aligned_and_match_numpy(clip_folder, tmp_path, executor):
    folder, stats_path, _ = clip_folder
    stats = StatsFile.load(stats_path)
    out = tmp_path / "scores"
    summary = score(EmbeddingScoreConfig(run=_run([folder], executor=executor), stats_path=stats_path,
                                                    output=str(out)), stats)
    assert summary["rows"] == sum(ROWS) and summary["status_counts"] == {"encode": 1, "ok": sum(ROWS) - 1}
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "metadata_0.parquet", "metadata_1.parquet", "metadata_2.parquet"]
    imgs, txts = _rows(folder, "image"), _rows(folder, "text")
    for n, count in enumerate(ROWS):
        table = pq.read_table(out / f"metadata_{n}.parquet")
        assert table.num_rows == count and table.schema.names[:3] == ["key", "shard", "index"]
        rows = table.to_pylist()
        assert [r["key"] for r in rows] == [f"{n:05d}{i:04d}" for i in range(count)]
        assert [r["index"] for r in rows] == list(range(count))
        assert all(r["caption"] == f"caption {n}-{i}" and r["url"].endswith(f"/{n}/{i}.jpg") and r["uid"] is None
                   for i, r in enumerate(rows))
        assert {r["shard"] for r in rows} <= {str(folder / "metadata" / f"metadata_{n}.parquet")}
        img, txt = imgs[n].astype(np.float64), txts[n].astype(np.float64)
        ok = np.isfinite(img).all(1)
        for tower, x in (("image", img), ("text", txt)):
            ws = stats.towers[tower]
            sq = table[f"{tower}_sqnorm"].to_numpy(zero_copy_only=False)
            fine = np.isfinite(x).all(1)
            assert np.isnan(sq[~fine]).all()
            np.testing.assert_allclose(sq[fine], ws.sqnorm(x[fine]), rtol=2e-4)
            np.testing.assert_allclose(table[f"{tower}_loglik"].to_numpy(zero_copy_only=False)[fine],
                                       ws.loglik_from_sqnorm(sq[fine]), rtol=1e-6)
            np.testing.assert_allclose(table[f"{tower}_pvalue"].to_numpy(zero_copy_only=False)[fine],
                                       ws.pvalue_from_sqnorm(sq[fine].astype(np.float32).astype(np.float64)),
                                       atol=1.0 / (ws.n_heldout + 1) + 1e-6)
        cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
        clip = table["clip_score"].to_numpy(zero_copy_only=False)
        np.testing.assert_allclose(clip[ok], cos[ok], rtol=1e-5, atol=1e-6)
        if n == NAN_ROW[0]:
            bad = rows[NAN_ROW[1]]
            assert bad["status"] == "encode" and bad["error"] == "image embedding is not finite (NaN/inf)"
            assert bad["image_sqnorm"] is None and bad["clip_score"] is None and bad["text_sqnorm"] is not None
            assert sum(r["status"] != "ok" for r in rows) == 1
        else:
            assert all(r["status"] == "ok" and r["error"] is None for r in rows)


def test_provenance_resume_and_refusing_another_fit(clip_folder, tmp_path):
    folder, stats_path, _ = clip_folder
    stats = StatsFile.load(stats_path)
    out = tmp_path / "scores"
    cfg = EmbeddingScoreConfig(run=_run([folder]), stats_path=stats_path, output=str(out))
    score(cfg, stats)
    made = json.loads(pq.read_schema(out / "metadata_0.parquet").metadata[b"wclip"])
    assert made == marker(out, "metadata_0")["provenance"]
    assert made["model"] == {"model": "embeddings:clip-retrieval", "weights": "precomputed"}
    assert made["input"]["url"] == str(folder / "metadata" / "metadata_0.parquet") and made["input"]["size"] > 0
    assert marker(out, "metadata_0")["parquet"]["rows"] == ROWS[0]
    # resume: nothing to do; a deleted output is redone, the others are kept byte for byte
    kept = (out / "metadata_1.parquet").read_bytes()
    assert score(cfg, stats)["shards_skipped"] == 3
    (out / "metadata_0.parquet").unlink()
    summary = score(cfg, stats)
    assert summary["shards_done"] == 1 and summary["shards_skipped"] == 2
    assert (out / "metadata_1.parquet").read_bytes() == kept
    # another fit never shares the folder
    other = str(tmp_path / "other.safetensors")
    fit(EmbeddingFitConfig(run=_run([folder]), output=other, components=12, holdout=0.2, seed=5))
    with pytest.raises(ConfigError, match="holds scores made with stats .* embeddings:clip-retrieval"):
        score(EmbeddingScoreConfig(run=_run([folder]), stats_path=other, output=str(out)),
                         StatsFile.load(other))


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_damaged_file_is_recorded_and_the_others_scored(clip_folder, tmp_path, executor, capsys):
    folder, stats_path, _ = clip_folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    npy = broken / "text_emb" / "text_emb_1.npy"
    npy.write_bytes(npy.read_bytes()[:-200])  # truncated
    meta = broken / "metadata" / "metadata_0.parquet"
    pd.read_parquet(meta).iloc[:-1].to_parquet(meta)  # one row fewer than the embeddings
    out = tmp_path / "scores"
    run = _run([broken], retries=0, executor=executor, progress=True)
    summary = score(EmbeddingScoreConfig(run=run, stats_path=stats_path, output=str(out)),
                               StatsFile.load(stats_path))
    # the bar counts the rows of the file that was scored, and names each failure on its own line
    err = capsys.readouterr().err
    assert "3/3 [" in err and f"samples={ROWS[2]:,}" in err, err
    assert err.count("failed after 0 retries: ") == 2, err
    failed = {f["shard"]: f["error"] for f in summary["failed"]}
    assert sorted(failed) == [str(meta), str(broken / "metadata" / "metadata_1.parquet")]
    assert "img_emb_0.npy has 120 rows but metadata_0.parquet has 119: the files are not row-aligned" in \
        failed[str(meta)]
    assert "text_emb_1.npy: the file ends after" in failed[str(broken / "metadata" / "metadata_1.parquet")]
    assert summary["shards_done"] == 1 and (out / "metadata_2.parquet").exists()
    records = [json.loads(line) for line in (state(out) / "failures.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in records) == ["metadata_0", "metadata_1"]
    assert not (out / "metadata_1.parquet").exists() and not (out / "metadata_0.parquet").exists()


def test_datacomp_shards_fit_score_and_refuse_the_other_model(tmp_path, ray_local):
    shards = write_datacomp(tmp_path / "datacomp")
    pattern = str(shards / "{00000000..00000001}.npz")
    with pytest.raises(ConfigError, match="--embedding-key l14 or --embedding-key b32"):
        fit(EmbeddingFitConfig(run=_run([pattern]), output=str(tmp_path / "x.safetensors")))
    stats_path = str(tmp_path / "l14.safetensors")
    fit(EmbeddingFitConfig(run=_run([pattern], key="l14"), output=stats_path, components=8))
    stats = StatsFile.load(stats_path)
    assert stats.metadata["model_identity"]["model"] == "embeddings:datacomp-l14"
    out = tmp_path / "scores"
    summary = score(EmbeddingScoreConfig(run=_run([shards]), stats_path=stats_path, output=str(out)),
                               stats)  # the key defaults to the fit's
    assert summary["rows"] == 120 and summary["status_counts"] == {"ok": 120}
    table = pq.read_table(out / "00000001.parquet")
    assert table["key"].to_pylist() == table["uid"].to_pylist() == [f"{1:016x}{i:016x}" for i in range(60)]
    assert table["caption"][5].as_py() == "text 1 5" and table["shard"][0].as_py() == str(shards / "00000001.npz")
    arrays = np.load(shards / "00000001.npz")
    np.testing.assert_allclose(table["image_sqnorm"].to_numpy(),
                               stats.towers["image"].sqnorm(arrays["l14_img"].astype(np.float64)), rtol=2e-4)
    with pytest.raises(ConfigError, match="embedding kind mismatch: .* embeddings:datacomp-l14 vectors, but these "
                                          "inputs are embeddings:datacomp-b32"):
        score(EmbeddingScoreConfig(run=_run([pattern], key="b32"), stats_path=stats_path,
                                              output=str(tmp_path / "b32")), stats)
    clip_stats = str(tmp_path / "clip.safetensors")
    fit(EmbeddingFitConfig(run=_run([write_clip_retrieval(tmp_path / "laion")]), output=clip_stats,
                                      components=8))
    with pytest.raises(ConfigError, match="embeddings:clip-retrieval vectors, but these inputs are "
                                          "embeddings:datacomp-l14"):
        score(EmbeddingScoreConfig(run=_run([pattern], key="l14"), stats_path=clip_stats,
                                              output=str(tmp_path / "y")), StatsFile.load(clip_stats))
    assert not (tmp_path / "b32").exists() and not (tmp_path / "y").exists()


def test_tar_stats_and_embedding_stats_do_not_mix(clip_folder, tmp_path):
    folder, stats_path, _ = clip_folder
    ws = StatsFile.load(stats_path).towers
    tar_stats = str(tmp_path / "tar.safetensors")
    StatsFile(towers=ws, metadata={"model_identity": {"model": "wclip-tiny", "weights": "random-init:seed=0"},
                                   "normalize": True}).save(tar_stats)
    with pytest.raises(ConfigError, match=r"fitted on tar shards with model wclip-tiny \(random-init:seed=0\)"):
        score(EmbeddingScoreConfig(run=_run([folder]), stats_path=tar_stats, output=str(tmp_path / "a")),
                         StatsFile.load(tar_stats))
    url = clean_shards(tmp_path, shards=1, per_shard=2)[0]
    with pytest.raises(ConfigError, match="fitted on precomputed embeddings .*embeddings:clip-retrieval"):
        score(ScoreConfig(run=tiny_run([url]), stats_path=stats_path, output=str(tmp_path / "b")),
              StatsFile.load(stats_path))
    assert main(["score", "--input", url, "--stats", stats_path, "--output", str(tmp_path / "c")]) == 2


def test_fit_memory_stays_bounded_max_samples_and_heldout(clip_folder, tmp_path):
    folder, stats_path, _ = clip_folder
    path = str(tmp_path / "s.safetensors")
    summary = fit(EmbeddingFitConfig(run=_run([folder]), output=path, components=6, holdout=0.3,
                                                max_samples=150, max_heldout=10))
    meta = StatsFile.load(path).metadata
    assert summary["rows"] == 150 and meta["n_reference"] == 149 and meta["reference_shards"] == 2
    assert meta["n_heldout"] == {"image": 10, "text": 10}
    # on Ray, in batches of one file per slot, the same stats as on threads
    on_ray = str(tmp_path / "ray.safetensors")
    fit(EmbeddingFitConfig(run=_run([folder], executor="ray", max_in_flight=1), output=on_ray,
                                      components=12, holdout=0.2))
    for tower, ws in StatsFile.load(stats_path).towers.items():
        other = StatsFile.load(on_ray).towers[tower]
        np.testing.assert_array_equal(other.mean, ws.mean)
        np.testing.assert_array_equal(other.calibration, ws.calibration)


def test_urls_in_and_out(clip_folder, tmp_path):
    folder, stats_path, _ = clip_folder
    out = f"file://{tmp_path}/scores"
    cfg = EmbeddingScoreConfig(run=_run([f"file://{folder}"]), stats_path=stats_path, output=out)
    assert score(cfg, StatsFile.load(stats_path))["rows"] == sum(ROWS)
    assert pq.read_table(tmp_path / "scores" / "metadata_0.parquet")["shard"][0].as_py() == \
        f"file://{folder}/metadata/metadata_0.parquet"


def test_a_memory_folder_in_and_out(clip_folder):
    import fsspec

    from pipeline.sources.vectors import discover, read_blocks, read_metadata

    _, stats_path, _ = clip_folder
    fs = fsspec.filesystem("memory")
    rng = np.random.default_rng(3)
    img, txt = _vectors(rng, 50, D, 2.0), _vectors(rng, 50, D, -1.0)
    for path, arr in (("/cr/img_emb/img_emb_7.npy", img), ("/cr/text_emb/text_emb_7.npy", txt)):
        with fs.open(path, "wb") as fh:
            np.save(fh, arr)
    with fs.open("/cr/metadata/metadata_7.parquet", "wb") as fh:
        pd.DataFrame({"key": [str(i) for i in range(50)], "caption": ["c"] * 50}).to_parquet(fh)
    source = discover(["memory://cr"])
    (file,) = source.files
    assert source.kind == "clip-retrieval" and file.name == "metadata_7"
    assert read_metadata(file, source.kind)["key"].to_pylist() == [str(i) for i in range(50)]
    blocks = list(read_blocks(file, 50, 16))
    assert [s for s, _ in blocks] == [0, 16, 32, 48]
    np.testing.assert_array_equal(np.concatenate([b["image"] for _, b in blocks]), img)
    np.testing.assert_array_equal(np.concatenate([b["text"] for _, b in blocks]), txt)
    # the whole job, on threads (a memory filesystem lives in this process only)
    stats = StatsFile.load(stats_path)
    cfg = EmbeddingScoreConfig(run=_run(["memory://cr"], executor="local"), stats_path=stats_path,
                               output="memory://scores")
    assert score(cfg, stats)["rows"] == 50
    with fs.open("/scores/metadata_7.parquet", "rb") as fh:
        table = pq.read_table(fh)
    np.testing.assert_allclose(table["image_sqnorm"].to_numpy(), stats.towers["image"].sqnorm(img.astype(float)),
                               rtol=2e-4)
    assert fs.exists("/scores.wclip/shards/metadata_7.json")  # the bookkeeping beside the folder
    assert score(cfg, stats)["shards_skipped"] == 1


# -- --save-embeddings: clip-retrieval's layout ----------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, ray_local):
    folder = tmp_path_factory.mktemp("tars")
    urls = clean_shards(folder, shards=2, per_shard=12, start=300)
    broken = [(f"{i:09d}", {"jpg": image_bytes(i)[:100]}) for i in range(5)]  # no caption, undecodable image
    urls.append(write_shard(folder / "00002.tar", broken))
    urls.append(write_shard(folder / "part-a.tar", [(f"{i:09d}", {"jpg": image_bytes(i), "txt": b"x"})
                                                     for i in range(3)]))
    stats_path = str(folder / "stats.safetensors")
    fit(FitConfig(run=tiny_run(urls[:2]), output=stats_path, components=8, holdout=0.2))
    out = folder / "scores"
    score(ScoreConfig(run=tiny_run(urls), stats_path=stats_path, output=str(out), save_embeddings=True),
          StatsFile.load(stats_path))
    return out, stats_path


def test_saved_embeddings_are_clip_retrieval_folders(saved):
    from pipeline.scores.layout import embedding_number

    out, stats_path = saved
    emb = state(out) / "embeddings"
    stats = StatsFile.load(stats_path)
    assert embedding_number("00002") == "00002" and len(embedding_number("part-a")) == 20
    for name, rows in (("00000", 12), ("00001", 12), ("00002", 5), ("part-a", 3)):
        n = embedding_number(name)
        scores = pq.read_table(out / f"{name}.parquet")
        meta = pq.read_table(emb / "metadata" / f"metadata_{n}.parquet")
        assert meta["image_path"].to_pylist() == meta["key"].to_pylist() == scores["key"].to_pylist()
        assert meta["caption"].to_pylist() == scores["caption"].to_pylist() and meta.num_rows == rows
        for tower, sub in (("image", "img_emb/img_emb"), ("text", "text_emb/text_emb")):
            arr = np.load(emb / f"{sub}_{n}.npy")
            assert arr.shape == (rows, 32) and arr.dtype == np.float32
            sq = scores[f"{tower}_sqnorm"].to_numpy(zero_copy_only=False)
            scored = ~np.isnan(sq)
            assert np.isnan(arr[~scored]).all() and np.isfinite(arr[scored]).all()
            if scored.any():
                np.testing.assert_allclose(stats.towers[tower].sqnorm(arr[scored].astype(np.float64)), sq[scored],
                                           rtol=1e-5)
        assert marker(out, name)["embeddings"]["number"] == n
    assert np.isnan(np.load(emb / "text_emb" / "text_emb_00002.npy")).all()  # every row failed: NaN rows


def test_saved_embeddings_fit_and_score_as_embeddings(saved, tmp_path):
    out, _ = saved
    folder = state(out) / "embeddings"
    stats_path = str(tmp_path / "s.safetensors")
    assert main(["fit", "--embeddings", str(folder), "--output", stats_path, "--components", "4",
                 "--no-progress"]) == 0
    meta = StatsFile.load(stats_path).metadata
    assert meta["normalize"] is False and meta["n_reference"] == 12 + 12 + 3  # the broken shard's rows are NaN
    scores = tmp_path / "scores"
    argv = ["score", "--embeddings", str(folder), "--stats", stats_path, "--output", str(scores), "--no-progress"]
    assert main(argv + ["--dry-run"]) == 0 and not scores.exists()
    assert main(argv) == 0
    # named like the shards they were saved from (part-a's number is a hash of its name), rows naming those shards
    assert sorted(p.name for p in scores.iterdir()) == ["00000.parquet", "00001.parquet", "00002.parquet",
                                                        "part-a.parquet"]
    assert pq.read_table(scores / "00002.parquet")["status"].to_pylist() == ["encode"] * 5
    for name in ("00002", "part-a"):
        assert pq.read_table(scores / f"{name}.parquet")["shard"].to_pylist() == \
            pq.read_table(out / f"{name}.parquet")["shard"].to_pylist()
    assert meta["model_identity"] == {"model": "wclip-tiny", "weights": "random-init:seed=0"}  # as saved


def test_dry_run_reads_writes_and_starts_nothing(saved, tmp_path, monkeypatch, capsys):
    from pipeline.executors import ray as runtime

    out, stats_path = saved
    monkeypatch.setattr(runtime, "ray_session", None)  # any use of Ray fails the test
    shards = sorted(str(p) for p in out.parent.glob("*.tar"))
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["score", "--input", *shards, "--stats", stats_path, "--output", str(out), "--dry-run",
                 "--save-embeddings"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["inputs"] == 4 and plan["to_do"] == 0 and plan["skipped"] == 4
    assert main(["score", "--input", *shards, "--stats", stats_path, "--output", str(tmp_path / "new"),
                 "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["to_do"] == 4 and plan["skipped"] == 0 and not (tmp_path / "new").exists()
    assert main(["fit", "--input", *shards, "--output", str(tmp_path / "f.safetensors"), "--model", "wclip-tiny",
                 "--random-init", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["inputs"] == 4
    assert sorted(p.name for p in out.rglob("*")) == before and not (tmp_path / "f.safetensors").exists()
