"""The local (cluster-conditional) likelihood: scores against a SciPy oracle, one cluster = the global fit bit
for bit, what it sees that the global Gaussian cannot, stats files with and without clusters."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import oracle
import pytest
from safetensors.numpy import save_file

from pipeline.whitening import StatsFile, StatsFileError, WhiteningStats
from pipeline.whitening.clusters import ClusterWhitening, spherical_kmeans
from pipeline.whitening.fileformat import content_digest
from pipeline.whitening.formulas import pvalue_from_sqnorm
from pipeline.whitening.stats import TENSORS


def mixture(rng, d=8, k=4, n=1500, spread=4.0, offset=5.0):
    """``k`` anisotropic Gaussian blobs far from the origin (like CLIP embeddings, all in one direction)."""
    centres = rng.normal(size=(k, d)) * spread + offset
    return np.concatenate([c + rng.normal(size=(n, d)) * rng.uniform(0.3, 1.5, size=d) for c in centres])


@pytest.mark.parametrize("components", [None, 5])
def test_local_loglik_matches_the_scipy_mixture(components):
    rng = np.random.default_rng(0)
    stats = WhiteningStats.fit(mixture(rng), components=components, holdout=0.2, clusters=4, seed=1)
    assert stats.clusters.k == 4 and stats.clusters.components == stats.components
    Y = mixture(np.random.default_rng(5), n=40)
    local = stats.local_scores(Y)
    np.testing.assert_allclose(local.loglik, oracle.local_loglik(stats, Y), rtol=1e-11, atol=1e-9)
    # the cluster is the most likely component, s_own its squared norm, the p-value its table's share
    cw = stats.clusters
    s_all = oracle.cluster_sqnorms(stats, Y)
    np.testing.assert_array_equal(local.cluster, oracle.most_likely_cluster(stats, Y)[0])
    np.testing.assert_allclose(local.sqnorm, s_all[np.arange(len(Y)), local.cluster], rtol=1e-9)
    tables = cw.tables()
    for i, (c, s) in enumerate(zip(local.cluster, local.sqnorm)):
        assert local.pvalue[i] == pytest.approx((1 + np.sum(tables[c] >= s)) / (tables[c].size + 1))


def test_float32_scores_follow_float64():
    rng = np.random.default_rng(1)
    stats = WhiteningStats.fit(mixture(rng, d=16, k=6), holdout=0.2, clusters=6)
    Y = mixture(np.random.default_rng(2), d=16, k=6, n=50)
    z = ((Y - stats.mean) @ stats.whitening).astype(np.float32)
    fast = stats.clusters.score(z, np.einsum("ij,ij->i", z, z))
    exact = stats.local_scores(Y)
    np.testing.assert_allclose(fast.loglik, exact.loglik, rtol=1e-5)
    assert np.mean(fast.cluster == exact.cluster) > 0.99


def test_one_cluster_is_the_global_score_bit_for_bit():
    rng = np.random.default_rng(3)
    X = mixture(rng)
    stats = WhiteningStats.fit(X, holdout=0.2, clusters=1)
    Y = mixture(np.random.default_rng(4), n=100)
    local = stats.local_scores(Y)
    assert np.array_equal(local.loglik, stats.loglik(Y))
    assert np.array_equal(local.pvalue, stats.pvalue(Y))
    assert np.array_equal(local.sqnorm, stats.sqnorm(Y)) and set(local.cluster) == {0}
    # and through float32 whitened rows, as the embeddings path scores them
    z = ((Y - stats.mean) @ stats.whitening).astype(np.float32)
    s = np.einsum("ij,ij->i", z, z)
    fast = stats.clusters.score(z, s)
    assert np.array_equal(fast.loglik, stats.loglik_from_sqnorm(s))
    assert np.array_equal(fast.pvalue, stats.pvalue_from_sqnorm(s))


def test_the_local_likelihood_sees_what_the_global_one_cannot():
    """Four modes at the corners of a square: the centre is the global Gaussian's most likely point, and no
    reference sample is near it."""
    rng = np.random.default_rng(6)
    d = 6
    corners = np.array([[a, b] for a in (-4, 4) for b in (-4, 4)], dtype=float)
    X = np.concatenate([np.hstack([c + rng.normal(size=(2000, 2)) * 0.5, rng.normal(size=(2000, d - 2))])
                        for c in corners]) + 10.0
    stats = WhiteningStats.fit(X, holdout=0.2, clusters=4)
    centre = np.full((20, d), 10.0) + np.hstack([np.zeros((20, 2)), rng.normal(size=(20, d - 2))])
    typical = X[rng.choice(len(X), 20, replace=False)]
    assert np.median(stats.pvalue(centre)) > 0.5  # the global Gaussian finds the centre typical
    local_centre, local_typical = stats.local_scores(centre), stats.local_scores(typical)
    assert np.max(local_centre.pvalue) < 0.01 and np.median(local_typical.pvalue) > 0.1
    assert np.max(local_centre.loglik) < np.min(local_typical.loglik)
    assert sorted(np.bincount(spherical_kmeans(X - X.mean(0), 4)) // 100) == [20, 20, 20, 20]


def test_shrinkage_is_chosen_on_the_heldout_rows():
    rng = np.random.default_rng(7)
    stats = WhiteningStats.fit(mixture(rng, n=3000), holdout=0.3, clusters=4)
    tried = stats.clusters.diagnostics["heldout_local_loglik"]
    assert str(stats.clusters.shrinkage) == max(tried, key=lambda a: tried[a])
    assert max(tried.values()) > stats.clusters.diagnostics["heldout_global_loglik"]  # the mixture fits better
    # few rows per cluster: the held-out rows ask for more shrinkage toward the global covariance
    few = WhiteningStats.fit(mixture(rng, d=12, n=30), holdout=0.3, clusters=4)
    assert few.clusters.shrinkage > stats.clusters.shrinkage


def test_stats_file_keeps_the_clusters(tmp_path):
    rng = np.random.default_rng(8)
    stats = WhiteningStats.fit(mixture(rng), holdout=0.2, clusters=3)
    plain = WhiteningStats.fit(mixture(rng), holdout=0.2)
    path = StatsFile(towers={"image": stats, "text": plain}, metadata={"model": "m"}).save(tmp_path / "s.st")
    back = StatsFile.load(path)
    assert back.clustered and back.towers["text"].clusters is None
    Y = mixture(rng, n=30)
    a, b = stats.local_scores(Y), back.towers["image"].local_scores(Y)
    for field in ("cluster", "loglik", "sqnorm", "pvalue"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert back.metadata["summary"]["image"]["clusters"]["k"] == 3
    with pytest.raises(ValueError, match="no clusters"):
        back.towers["text"].local_scores(Y)


def test_a_format_2_file_still_loads_and_scores_as_before(tmp_path):
    """A file written before clusters existed (format wclip-stats/2, no cluster tensors)."""
    rng = np.random.default_rng(9)
    stats = WhiteningStats.fit(mixture(rng), holdout=0.2)
    tensors = {f"image.{n}": np.ascontiguousarray(getattr(stats, n)) for n in TENSORS}
    header = json.dumps({"format": "wclip-stats/2", "towers": ["image"], "summary": {"image": stats.summary()}})
    save_file(tensors, str(tmp_path / "old.st"),
              metadata={"format": "wclip-stats/2", "wclip": header, "digest": content_digest(tensors, header)})
    old = StatsFile.load(tmp_path / "old.st")
    Y = mixture(rng, n=10)
    assert not old.clustered
    np.testing.assert_array_equal(old.towers["image"].loglik(Y), stats.loglik(Y))


def test_bad_cluster_requests_are_refused(tmp_path):
    X = mixture(np.random.default_rng(10), n=20)
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(ValueError, match="clusters must be an integer >= 1"):
            WhiteningStats.fit(X, holdout=0.2, clusters=bad)
    with pytest.raises(ValueError, match="cannot make 100 clusters of"):
        WhiteningStats.fit(X, holdout=0.2, clusters=100)
    with pytest.raises(ValueError, match="held-out rows"):
        WhiteningStats.fit(X, holdout=0.0, clusters=3)
    # a file whose cluster tensors were tampered with is refused as a whole
    stats = WhiteningStats.fit(X, holdout=0.2, clusters=2)
    path = StatsFile(towers={"image": stats}).save(tmp_path / "s.st")
    from safetensors import safe_open
    from safetensors.numpy import load_file
    arrays = load_file(str(path))
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    arrays["image.clusters.weights"] = arrays["image.clusters.weights"] * 2
    meta["digest"] = content_digest(arrays, meta["wclip"])
    save_file(arrays, str(tmp_path / "bad.st"), metadata=meta)
    with pytest.raises(StatsFileError, match="tower 'image'.*weights"):
        StatsFile.load(tmp_path / "bad.st")


def _torch_mixture_matches(device):
    import torch

    from pipeline.whitening.kernels import make_mixture, make_whitener

    rng = np.random.default_rng(11)
    stats = WhiteningStats.fit(mixture(rng, d=24, k=5), holdout=0.2, clusters=5, components=20)
    Y = mixture(np.random.default_rng(12), d=24, k=5, n=64)
    Y[3] = np.nan  # a row with no embedding
    x = torch.tensor(Y, dtype=torch.float32, device=device)
    sq, ll, w = make_whitener(stats, device).score_and_whiten(x)
    cluster, local, s_own = (t.cpu().numpy() for t in make_mixture(stats.clusters, device).mixture(w, sq, ll))
    fine = np.isfinite(Y).all(axis=1)
    exact = stats.local_scores(Y[fine])
    assert cluster[3] == -1 and np.isnan(local[3]) and np.isnan(s_own[3])
    np.testing.assert_allclose(local[fine], oracle.local_loglik(stats, Y[fine]), rtol=1e-5)
    np.testing.assert_allclose(s_own[fine], exact.sqnorm, rtol=1e-4)
    np.testing.assert_array_equal(cluster[fine], exact.cluster)
    one = WhiteningStats.fit(mixture(rng, d=24, k=5), holdout=0.2, clusters=1, components=20)
    sq, ll, w = make_whitener(one, device).score_and_whiten(x)
    _, local, _ = make_mixture(one.clusters, device).mixture(w, sq, ll)
    assert local is ll  # one cluster: the global log-likelihood itself


def test_the_device_mixture_matches_on_cpu():
    _torch_mixture_matches("cpu")


@pytest.mark.gpu
def test_the_device_mixture_matches_on_cuda():
    """The tar path's mixture on a GPU (fused whitener, float32 GEMM against every cluster)."""
    _torch_mixture_matches("cuda")


def test_too_few_heldout_rows_per_cluster_are_named():
    rng = np.random.default_rng(13)
    few = WhiteningStats.fit(mixture(rng, n=200), holdout=0.2, clusters=4)
    (line,) = few.clusters.warnings("image")
    fewest = int(few.clusters.calibration_counts.min())
    assert line == (f"image: 4 of 4 clusters have fewer than 100 held-out rows (the fewest: {fewest}), so their "
                    f"local p-values cannot go below {1 / (fewest + 1):.3f}: use fewer --clusters, a larger "
                    "--holdout or more reference rows for finer ones")
    many = WhiteningStats.fit(mixture(rng, n=3000), holdout=0.2, clusters=4)
    assert many.clusters.calibration_counts.min() >= 100 and many.clusters.warnings("image") == []
    assert WhiteningStats.fit(mixture(rng, n=50), holdout=0.2, clusters=1).clusters.warnings("image") == []


def _twenty_rows_repeated(rng, copies=100, d=8):
    base = rng.normal(size=(20, d)) * 3 + 5
    return base, np.tile(base, (copies, 1))


def test_twenty_distinct_rows_make_twenty_clusters_not_64_and_no_nan_pvalue():
    """Issue #26 (5): 20 distinct reference rows and --clusters 64 left 44 clusters without a held-out row,
    so 98-99% of rows had a NaN local p-value beside status ok."""
    rng = np.random.default_rng(21)
    base, X = _twenty_rows_repeated(rng)
    stats = WhiteningStats.fit(X, holdout=0.2, clusters=64, shrinkage=0.1)
    cw = stats.clusters
    assert cw.k == 20 and cw.diagnostics["k_requested"] == 64 and cw.calibration_counts.min() > 0
    assert sorted(np.bincount(spherical_kmeans(X - X.mean(0), 64))) == [100] * 20  # one cluster per distinct row
    assert cw.warnings("image")[0] == ("image: asked for 64 clusters, fitted 20: the reference sample has only 20 "
                                       "distinct direction(s), and a cluster of copies of one row cannot be "
                                       "calibrated")
    near = base[rng.integers(20, size=2000)] + rng.normal(size=(2000, 8)) * 0.3
    for rows in (X, near):
        local = stats.local_scores(rows)
        assert np.isfinite(local.pvalue).all() and np.isfinite(local.loglik).all()


def test_a_cluster_without_heldout_rows_takes_the_pooled_table():
    """K large against the held-out rows: some clusters get none; their rows' p-values come from every
    cluster's held-out s_own (never NaN), the others' from their own table as before."""
    rng = np.random.default_rng(22)
    base, _ = _twenty_rows_repeated(rng)
    X = np.concatenate([c + rng.normal(size=(100, 8)) * 0.5 for c in base])
    stats = WhiteningStats.fit(X, holdout=0.1, clusters=64)
    cw = stats.clusters
    empty = np.flatnonzero(cw.calibration_counts == 0)
    assert cw.k >= 60 and empty.size > 0   # the situation of the issue (EM may empty a few of the 64)
    if cw.k < 64:
        assert f"image: {64 - cw.k} of 64 clusters were left with (almost) no sample rows by EM and dropped: the " \
               "reference has fewer modes than clusters; --clusters auto chooses K by the held-out rows" \
               in cw.warnings("image")
    assert f"image: {empty.size} of {cw.k} clusters have no held-out row: their rows' local p-values are taken " \
           "against all clusters' held-out rows (pooled); use fewer --clusters, a larger --holdout or more " \
           "reference rows" in cw.warnings("image")
    Y = np.concatenate([X, base[rng.integers(20, size=2000)] + rng.normal(size=(2000, 8)) * 0.5])
    local = stats.local_scores(Y)
    assert np.isfinite(local.pvalue).all()
    pooled = np.sort(cw.calibration)
    tables = cw.tables()
    in_empty = np.isin(local.cluster, empty)
    assert in_empty.any()
    for i in np.flatnonzero(in_empty)[:50]:
        assert local.pvalue[i] == (1 + np.sum(pooled >= local.sqnorm[i])) / (pooled.size + 1)
    for i in np.flatnonzero(~in_empty)[:50]:
        table = tables[local.cluster[i]]
        assert local.pvalue[i] == (1 + np.sum(table >= local.sqnorm[i])) / (table.size + 1)


def test_a_file_written_before_with_empty_calibration_tables_loads_and_scores_without_nan(tmp_path):
    """Stats an older wclip wrote (clusters with no held-out row, no ``k_requested``): same format, they load,
    and their empty clusters now use the pooled table."""
    rng = np.random.default_rng(23)
    X = mixture(rng)
    stats = WhiteningStats.fit(X, holdout=0.2, clusters=3)
    cw = stats.clusters
    tables = cw.tables()
    old = ClusterWhitening(means=cw.means, variances=cw.variances, weights=cw.weights,
                           calibration=np.concatenate([tables[0], tables[1]]),
                           calibration_counts=np.array([tables[0].size, tables[1].size, 0]), shrinkage=cw.shrinkage,
                           diagnostics={"sizes": cw.diagnostics["sizes"]})
    path = StatsFile(towers={"image": replace(stats, clusters=old)}).save(tmp_path / "old.st")
    back = StatsFile.load(path).towers["image"].clusters
    assert list(back.calibration_counts) == [tables[0].size, tables[1].size, 0]
    assert "k_requested" not in back.diagnostics
    local = StatsFile.load(path).towers["image"].local_scores(X)
    third = local.cluster == 2
    assert third.any() and np.isfinite(local.pvalue).all()
    pooled = pvalue_from_sqnorm(local.sqnorm[third], np.sort(old.calibration))
    np.testing.assert_array_equal(local.pvalue[third], pooled)
