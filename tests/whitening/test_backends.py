"""The scoring backends (pipeline.whitening.kernels): the embeddings path's per-block call through NumPy bit for bit
as today, through torch on any device to float32 rounding of the float64 oracles, one cluster = the global score."""

from __future__ import annotations

import numpy as np
import oracle
import pytest

from pipeline.whitening import WhiteningStats
from pipeline.whitening.formulas import loglik_from_sqnorm
from pipeline.whitening.kernels import BACKENDS, make_mixture, make_whitener, reference_scores, resolve_backend
from pipeline.whitening.kernels.blocks import BlockScorer
from pipeline.whitening.kernels.numpy_backend import NumpyMixture, NumpyWhitener


def mixture(rng, d=24, k=5, n=600, spread=4.0, offset=5.0):
    centres = rng.normal(size=(k, d)) * spread + offset
    return np.concatenate([c + rng.normal(size=(n, d)) * rng.uniform(0.3, 1.5, size=d) for c in centres])


@pytest.fixture(scope="module")
def fitted():
    """``(stats with 5 clusters over 20 kept components, stats with one cluster)`` of one reference."""
    X = mixture(np.random.default_rng(0))
    return (WhiteningStats.fit(X, holdout=0.2, clusters=5, components=20, seed=1),
            WhiteningStats.fit(X, holdout=0.2, clusters=1, components=20, seed=1))


def block(dtype, rows=257, seed=3):
    """Rows as the embeddings path reads them (float16 or float32), with a NaN row and an inf row, and the
    float32 copy it scores (``as_float32`` gives exactly ``astype(np.float32)``)."""
    x = mixture(np.random.default_rng(seed), n=rows // 5 + 1)[:rows].astype(dtype)
    x[7] = np.nan
    x[100, 3] = np.inf
    return x, x.astype(np.float32)


def whitened_sqnorm(x, mu, w, out=None):
    """The embeddings path's whitening before BlockScorer (pipeline/sources/vector_tasks.py then): ``x`` (a
    float32 copy) centred in place, ``(x - mu) @ w`` into ``out``, its float32 row-wise squared norm."""
    x -= mu
    y = np.matmul(x, w, out=out)
    return np.vecdot(y, y)


def todays_embeddings_scores(stats, x32, work=True):
    """The embeddings path's arithmetic as flow/precomputed.py does it: float32 parameters, ``whitened_sqnorm``
    centring a scratch copy in place, the NumPy mixture in ``work`` arrays."""
    mu, w = stats.mean.astype(np.float32), np.ascontiguousarray(stats.whitening, dtype=np.float32)
    y = np.empty((len(x32), w.shape[1]), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        sq = whitened_sqnorm(x32.copy(), mu, w, y)
        mix = stats.clusters
        buffers = [np.empty(shape, np.float32) for shape in mix.work_shapes(len(x32))] if work else None
        return sq, y, mix.mixture(y, sq, buffers)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("which", [0, 1])
def test_numpy_block_scorer_is_todays_embeddings_path_bit_for_bit(fitted, dtype, which):
    stats = fitted[which]
    _, x32 = block(dtype)
    sq, y, (cluster, local, s_own) = todays_embeddings_scores(stats, x32)
    scorer = BlockScorer(stats)
    assert scorer.backend == "numpy" and (scorer.d, scorer.m) == (24, 20)
    scratch = x32.copy()
    out = np.empty((len(x32), 20), np.float32)
    work = [np.empty(shape, np.float32) for shape in scorer.work_shapes(len(x32))]
    with np.errstate(invalid="ignore", over="ignore"):
        got = scorer.score(scratch, overwrite_x=True, out=out, work=work, whitened=True)
        fresh = scorer.score(x32, whitened=True)  # no buffers: new arrays, x32 untouched
    for res in (got, fresh):
        assert res.sqnorm.dtype == np.float32 and res.local_loglik.dtype == np.float64
        assert np.array_equal(res.sqnorm, sq, equal_nan=True)
        assert np.array_equal(res.whitened, y, equal_nan=True)
        assert np.array_equal(res.cluster, cluster)
        assert np.array_equal(res.local_loglik, local, equal_nan=True)
        assert np.array_equal(res.s_own, s_own, equal_nan=True)
    assert got.whitened is out and not np.array_equal(scratch, x32, equal_nan=True)  # centred in place
    assert np.array_equal(x32, block(dtype)[1], equal_nan=True)
    assert list(cluster[[7, 100]]) == [-1, -1] and not np.isfinite(local[[7, 100]]).any()  # null in the table
    assert np.isfinite(np.delete(local, [7, 100])).all()
    assert BlockScorer(stats).score(x32).whitened is None


def test_one_cluster_is_the_global_columns_bit_for_bit(fitted):
    one = fitted[1]
    _, x32 = block(np.float16)
    with np.errstate(invalid="ignore", over="ignore"):
        res = BlockScorer(one).score(x32)
    ok = np.isfinite(res.sqnorm)
    assert ok.sum() == len(x32) - 2
    assert np.array_equal(res.local_loglik[ok], loglik_from_sqnorm(res.sqnorm[ok], 20))
    assert np.array_equal(res.s_own[ok], res.sqnorm[ok].astype(np.float64))
    assert set(res.cluster[ok]) == {0} and set(res.cluster[~ok]) == {-1}


def test_a_tower_without_clusters_gets_only_the_global_scores():
    plain = WhiteningStats.fit(mixture(np.random.default_rng(4)), holdout=0.2, components=20)
    _, x32 = block(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        res = BlockScorer(plain).score(x32)
        sq = whitened_sqnorm(x32.copy(), plain.mean.astype(np.float32), plain.whitening.astype(np.float32))
    assert np.array_equal(res.sqnorm, sq, equal_nan=True)
    assert res.cluster is res.local_loglik is res.s_own is None and BlockScorer(plain).work_shapes(9) == ()
    assert res.sqnorm.shape == (257,) and np.isnan(res.sqnorm[7])


@pytest.mark.parametrize("backend", ["torch", "gemm"])
def test_torch_block_scorer_on_cpu_follows_the_float64_oracles(fitted, backend):
    stats = fitted[0]
    x, x32 = block(np.float16)
    res = BlockScorer(stats, "cpu", backend).score(x32, whitened=True)
    assert res.sqnorm.dtype == np.float32 and res.cluster.dtype == np.int64 and res.local_loglik.dtype == np.float64
    fine = np.isfinite(x32).all(axis=1)
    ref_sq, _ = reference_scores(x32[fine], stats.mean, stats.whitening)
    tol = {"torch": 2e-7, "gemm": 2e-5}[backend]
    np.testing.assert_allclose(res.sqnorm[fine], ref_sq, rtol=tol)
    np.testing.assert_allclose(res.local_loglik[fine], oracle.local_loglik(stats, x32[fine].astype(np.float64)),
                               rtol=1e-5)
    exact = stats.local_scores(x32[fine].astype(np.float64))
    np.testing.assert_array_equal(res.cluster[fine], exact.cluster)
    np.testing.assert_allclose(res.s_own[fine], exact.sqnorm, rtol=1e-4)
    assert list(res.cluster[~fine]) == [-1, -1] and np.isnan(res.local_loglik[~fine]).all()
    assert res.whitened.shape == (257, 20) and res.whitened.dtype == np.float32


def test_numpy_and_torch_backends_agree_to_float32_rounding(fitted):
    stats = fitted[0]
    _, x32 = block(np.float32, rows=400, seed=9)
    with np.errstate(invalid="ignore", over="ignore"):
        a = BlockScorer(stats, "cpu", "numpy").score(x32)
    b = BlockScorer(stats, "cpu", "torch").score(x32)
    fine = np.isfinite(a.sqnorm)
    np.testing.assert_allclose(a.sqnorm[fine], b.sqnorm[fine], rtol=1e-5)
    # float32 GEMMs against float64 ones: the mixture's terms cancel (|z B| and |B^T c| much larger than the
    # difference), so its log-likelihood keeps about 5 digits, as the fp32 whitening's sqnorm keeps 6
    assert stats.clusters.rank > 0
    np.testing.assert_allclose(a.local_loglik[fine], b.local_loglik[fine], rtol=1e-4)
    assert np.mean(a.cluster == b.cluster) > 0.99


def test_backend_choice_and_refusals(fitted):
    stats = fitted[0]
    assert BACKENDS == ("auto", "fused", "gemm", "torch", "numpy")
    assert resolve_backend("cpu") == "torch" and resolve_backend("cpu", "numpy") == "numpy"
    assert isinstance(make_whitener(stats, "cpu", "numpy"), NumpyWhitener)
    assert isinstance(make_mixture(stats.clusters, "cpu", "numpy"), NumpyMixture)
    assert type(make_mixture(stats.clusters, "cpu")).__name__ == "TorchMixture"
    with pytest.raises(ValueError, match="the numpy backend runs on the CPU; got device=cuda"):
        BlockScorer(stats, "cuda", "numpy")
    with pytest.raises(ValueError, match="backend must be one of"):
        BlockScorer(stats, "cpu", "cupy")
    with pytest.raises(TypeError, match="float32 numpy array; got float16"):
        BlockScorer(stats).score(block(np.float16)[0])
    with pytest.raises(ValueError, match=r"shape \(B, 24\)"):
        BlockScorer(stats).score(np.zeros((3, 23), np.float32))


@pytest.mark.gpu
def test_block_scorer_on_cuda_follows_the_float64_oracles(fitted):
    """The embeddings path on a GPU: the block to the device, the tar path's whitener (fused kernel when CuPy is
    there) and float32 mixture, scores back as NumPy."""
    stats = fitted[0]
    _, x32 = block(np.float16)
    fine = np.isfinite(x32).all(axis=1)
    for backend in ("auto", "gemm", "torch"):
        res = BlockScorer(stats, "cuda", backend).score(x32)
        ref_sq, _ = reference_scores(x32[fine], stats.mean, stats.whitening)
        np.testing.assert_allclose(res.sqnorm[fine], ref_sq, rtol=1e-5)
        np.testing.assert_allclose(res.local_loglik[fine],
                                   oracle.local_loglik(stats, x32[fine].astype(np.float64)), rtol=1e-5)
        assert np.mean(res.cluster[fine] == stats.local_scores(x32[fine].astype(np.float64)).cluster) > 0.99
        assert list(res.cluster[~fine]) == [-1, -1] and np.isnan(res.local_loglik[~fine]).all()
