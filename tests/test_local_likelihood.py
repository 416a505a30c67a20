"""The local likelihood end to end (``wclip fit --clusters K``): tar shards and precomputed embeddings, on both
executors, against a SciPy float64 oracle; one cluster reproduces the global scores bit for bit."""

from __future__ import annotations

import numpy as np
import oracle
import pyarrow.parquet as pq
import pytest
from shardkit import clean_shards, state, tiny_run
from test_embeddings import ROWS, _rows, _run, write_clip_retrieval

from pipeline.cli import main
from pipeline.config import EmbeddingFitConfig, EmbeddingScoreConfig, FitConfig, ScoreConfig
from pipeline.runs.fit import fit
from pipeline.runs.score import score
from pipeline.scores.table import LOCAL_COLUMNS, SCORE_COLUMNS
from pipeline.whitening import StatsFile

TOWERS = ("image", "text")


def column(table, name) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False).astype(np.float64)


def check_against_oracle(table, stats, embeddings: dict) -> None:
    """Every local column of ``table`` against the oracle on the rows' own embeddings (float64)."""
    for tower in TOWERS:
        ws, x = stats.towers[tower], embeddings[tower].astype(np.float64)
        fine = np.isfinite(x).all(axis=1)
        local = column(table, f"{tower}_local_loglik")
        assert np.isnan(local[~fine]).all() and np.isfinite(local[fine]).all()
        np.testing.assert_allclose(local[fine], oracle.local_loglik(ws, x[fine]), rtol=2e-6, atol=2e-4)
        want, margin = oracle.most_likely_cluster(ws, x[fine])
        got = table[f"{tower}_cluster"].to_numpy(zero_copy_only=False)[fine]
        clear = margin > 1e-3  # a near tie may go either way in float32
        assert np.sum(clear) >= 0.9 * len(clear) and np.array_equal(got[clear], want[clear])
        tables, pvalue = ws.clusters.tables(), column(table, f"{tower}_local_pvalue")[fine]
        s_all = oracle.cluster_sqnorms(ws, x[fine])  # with the clusters' own directions, when fitted
        pooled = ws.clusters.pooled_table()  # a cluster without held-out rows of its own takes every cluster's
        tables = [t if t.size else pooled for t in tables]
        for i, c in enumerate(got.astype(int)):
            s_own = s_all[i, c]
            size = tables[c].size + 1.0  # p = (1 + #{table >= s_own}) / size, s_own to float32 rounding
            low = (1 + np.sum(tables[c] >= s_own * (1 + 1e-5))) / size
            high = (1 + np.sum(tables[c] >= s_own * (1 - 1e-5))) / size
            assert low - 1e-6 <= pvalue[i] <= high + 1e-6


def assert_local_equals_global(table) -> None:
    """One cluster: the local columns are the global ones, bit for bit (nulls included)."""
    for tower in TOWERS:
        assert table[f"{tower}_local_loglik"].equals(table[f"{tower}_loglik"])
        assert table[f"{tower}_local_pvalue"].equals(table[f"{tower}_pvalue"])
        clusters = table[f"{tower}_cluster"].to_numpy(zero_copy_only=False)
        assert set(clusters[~np.isnan(column(table, f"{tower}_loglik"))]) == ({0} if table.num_rows else set())


# -- tar shards ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    folder = tmp_path_factory.mktemp("local-tars")
    (folder / "t").mkdir()
    return folder, clean_shards(folder, shards=3, per_shard=60), clean_shards(folder / "t", shards=2, per_shard=15,
                                                                              start=500)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_tar_scores_match_the_oracle(shards, tmp_path, executor):
    folder, refs, targets = shards
    stats_path = str(tmp_path / "stats.safetensors")
    fit(FitConfig(run=tiny_run(refs, executor=executor), output=stats_path, components=12, holdout=0.2, clusters=3))
    stats = StatsFile.load(stats_path)
    assert stats.clustered and all(ws.clusters.k == 3 for ws in stats.towers.values())
    assert stats.metadata["clusters"] == 3 and stats.metadata["summary"]["image"]["clusters"]["k"] == 3
    out = tmp_path / "scores"
    summary = score(ScoreConfig(run=tiny_run(targets, executor=executor), stats_path=stats_path, output=str(out),
                                save_embeddings=True), stats)
    assert summary["rows"] == 30 and not summary["failed"]
    for name in ("00000", "00001"):
        table = pq.read_table(out / f"{name}.parquet")
        assert table.schema.names[-6:] == list(LOCAL_COLUMNS)
        emb = state(out) / "embeddings"
        check_against_oracle(table, stats, {"image": np.load(emb / "img_emb" / f"img_emb_{name}.npy"),
                                            "text": np.load(emb / "text_emb" / f"text_emb_{name}.npy")})


def test_tar_scores_with_one_cluster_are_the_global_ones(shards, tmp_path):
    folder, refs, targets = shards
    stats_path = str(tmp_path / "stats.safetensors")
    fit(FitConfig(run=tiny_run(refs), output=stats_path, components=12, holdout=0.2, clusters=1))
    out = tmp_path / "scores"
    score(ScoreConfig(run=tiny_run(targets), stats_path=stats_path, output=str(out)), StatsFile.load(stats_path))
    for name in ("00000", "00001"):
        assert_local_equals_global(pq.read_table(out / f"{name}.parquet"))


def test_stats_without_clusters_write_no_local_columns(shards, tmp_path):
    folder, refs, targets = shards
    stats_path = str(tmp_path / "stats.safetensors")
    fit(FitConfig(run=tiny_run(refs), output=stats_path, components=12, holdout=0.2))
    out = tmp_path / "scores"
    score(ScoreConfig(run=tiny_run(targets[:1]), stats_path=stats_path, output=str(out)), StatsFile.load(stats_path))
    names = pq.read_table(out / "00000.parquet").schema.names
    assert names[-len(SCORE_COLUMNS):] == list(SCORE_COLUMNS) and not set(LOCAL_COLUMNS) & set(names)


# -- precomputed embeddings -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def laion(tmp_path_factory, ray_local):
    return write_clip_retrieval(tmp_path_factory.mktemp("local-emb") / "laion")


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_embedding_scores_match_the_oracle(laion, tmp_path, executor):
    stats_path = str(tmp_path / "stats.safetensors")
    fit(EmbeddingFitConfig(run=_run([laion], executor=executor), output=stats_path, components=12,
                                      holdout=0.2, clusters=4))
    stats = StatsFile.load(stats_path)
    assert all(ws.clusters.k == 4 for ws in stats.towers.values())
    out = tmp_path / "scores"
    summary = score(EmbeddingScoreConfig(run=_run([laion], executor=executor), stats_path=stats_path,
                                                    output=str(out)), stats)
    assert summary["rows"] == sum(ROWS)
    imgs, txts = _rows(laion, "image"), _rows(laion, "text")
    for n, count in enumerate(ROWS):
        table = pq.read_table(out / f"metadata_{n}.parquet")
        assert table.num_rows == count and table.schema.names[-6:] == list(LOCAL_COLUMNS)
        check_against_oracle(table, stats, {"image": imgs[n], "text": txts[n]})


def test_embedding_fits_agree_across_executors_and_one_cluster_is_global(laion, tmp_path):
    fits = {}
    for executor in ("local", "ray"):
        fits[executor] = str(tmp_path / f"{executor}.safetensors")
        fit(EmbeddingFitConfig(run=_run([laion], executor=executor), output=fits[executor],
                                          components=12, holdout=0.2, clusters=4))
    a, b = (StatsFile.load(p).towers["image"].clusters for p in fits.values())
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.calibration, b.calibration)
    one = str(tmp_path / "one.safetensors")
    fit(EmbeddingFitConfig(run=_run([laion]), output=one, components=12, holdout=0.2, clusters=1))
    out = tmp_path / "scores"
    score(EmbeddingScoreConfig(run=_run([laion]), stats_path=one, output=str(out)), StatsFile.load(one))
    for n in range(len(ROWS)):
        assert_local_equals_global(pq.read_table(out / f"metadata_{n}.parquet"))


def test_the_clusters_flag_is_checked_before_any_work(laion, tmp_path, capsys):
    stats_path = tmp_path / "stats.safetensors"
    for bad in ("0", "-3"):
        assert main(["fit", "--embeddings", str(laion), "--output", str(stats_path), "--clusters", bad,
                     "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"wclip fit: error: clusters must be a positive integer, got {int(bad)}"]
    assert main(["fit", "--embeddings", str(laion), "--output", str(stats_path), "--clusters", "9999",
                 "--no-progress"]) == 2
    assert "cannot make 9999 clusters of" in capsys.readouterr().err
    assert main(["fit", "--embeddings", str(laion), "--output", str(stats_path), "--clusters", "64",
                 "--cluster-sample", "10", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == ("wclip fit: error: --clusters 64 needs at least as many sampled fit "
                                               "rows: raise --cluster-sample (now 10) or ask for fewer clusters")
    assert not stats_path.exists()
