"""Numerics of the Whitened CLIP likelihood and the stats file (pipeline.whitening)."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy import stats

import pipeline
from pipeline.whitening import FORMAT, Moments, StatsFile, StatsFileError, WhiteningStats, holdout_mask
from pipeline.whitening.fileformat import content_digest
from pipeline.whitening.stats import TENSORS, _auto_components


def gaussian(n, d, seed=0, spectrum=None):
    """Rows of N(mu, Q diag(spectrum) Q^T) with a random rotation Q; returns (X, mu, cov, draw)."""
    rng = np.random.default_rng(seed)
    lam = np.linspace(3.0, 0.2, d) if spectrum is None else np.asarray(spectrum, float)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    mu = rng.standard_normal(d) * 2.0

    def draw(k):
        return mu + (rng.standard_normal((k, d)) * np.sqrt(lam)) @ Q.T
    return draw(n), mu, (Q * lam) @ Q.T, draw


# ---- the method ---------------------------------------------------------------------------

def test_full_rank_fit_is_the_multivariate_normal_density():
    X, _, _, draw = gaussian(400, 6)
    ws = WhiteningStats.fit(X, components=None, shrinkage=0.0, holdout=0.0)
    Y = draw(50)
    expected = stats.multivariate_normal(X.mean(axis=0), np.cov(X, rowvar=False)).logpdf(Y)
    np.testing.assert_allclose(ws.loglik(Y) + ws.log_det, expected, rtol=1e-10)
    assert ws.n_fit == 400 and ws.n_heldout == 0 and ws.components == ws.dim == 6


def test_reproduces_the_paper_formula_with_an_independent_whitening():
    X, _, _, draw = gaussian(300, 8, seed=1)
    ws = WhiteningStats.fit(X, holdout=0.0)
    lam, V = np.linalg.eigh(np.cov(X.T))            # computed here, independently
    W = V / np.sqrt(lam)
    Y = draw(40)
    w = (Y - X.mean(axis=0)) @ W
    paper = -0.5 * (8 * np.log(2 * np.pi) + np.sum(w**2, axis=1))
    np.testing.assert_allclose(ws.loglik(Y), paper, rtol=1e-10)
    np.testing.assert_allclose(ws.log_det, -0.5 * np.sum(np.log(lam)), rtol=1e-12)
    # sqnorm is the Mahalanobis distance under the unbiased covariance
    diff = Y - X.mean(axis=0)
    maha = np.einsum("ij,ij->i", diff, np.linalg.solve(np.cov(X.T), diff.T).T)
    np.testing.assert_allclose(ws.sqnorm(Y), maha, rtol=1e-10)
    np.testing.assert_allclose(ws.loglik_from_sqnorm(maha), paper, rtol=1e-10)


def test_whitened_fit_split_has_identity_covariance():
    X, _, _, _ = gaussian(1000, 10, seed=2)
    keys = [f"k{i}" for i in range(len(X))]
    ws = WhiteningStats.fit(X, holdout=0.2, keys=keys, seed=3)
    fit_rows = X[~holdout_mask(keys, 0.2, seed=3)]
    assert ws.n_fit == len(fit_rows) and ws.n_heldout == len(X) - len(fit_rows)
    Z = (fit_rows - ws.mean) @ ws.whitening
    np.testing.assert_allclose(np.cov(Z, rowvar=False), np.eye(10), atol=1e-10)
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-10)
    # in-sample sqnorm/m of an unbiased-covariance fit is exactly (n - 1) / n
    assert ws.summary()["fit_sqnorm_over_m"] == pytest.approx((ws.n_fit - 1) / ws.n_fit, rel=1e-12)


def test_truncated_fit_keeps_top_components():
    X, _, cov, _ = gaussian(2000, 12, seed=4)
    ws = WhiteningStats.fit(X, components=5, holdout=0.0)
    lam_all = np.linalg.eigvalsh(np.cov(X.T))[::-1]
    np.testing.assert_allclose(ws.eigenvalues, lam_all, rtol=1e-10)
    assert ws.whitening.shape == (12, 5)
    np.testing.assert_allclose(ws.log_det, -0.5 * np.sum(np.log(lam_all[:5])), rtol=1e-12)
    np.testing.assert_allclose(ws.loglik_from_sqnorm(0.0), -2.5 * math.log(2 * math.pi))


def test_shrinkage_adds_a_multiple_of_the_mean_eigenvalue():
    X, _, _, _ = gaussian(500, 6, seed=5)
    S = np.cov(X.T)
    ws = WhiteningStats.fit(X, shrinkage=0.3, holdout=0.0)
    expected = np.linalg.eigvalsh(S)[::-1] + 0.3 * np.trace(S) / 6
    np.testing.assert_allclose(ws.eigenvalues, expected, rtol=1e-10)
    assert ws.shrinkage == 0.3


# ---- moments ------------------------------------------------------------------------------

def test_merging_four_chunks_equals_one_pass():
    X, _, _, _ = gaussian(1003, 16, seed=6)
    X = X + 50.0                                  # far from the origin: a cancellation trap
    one = Moments.empty(16).update(X)
    parts = [Moments.empty(16).update(c) for c in np.split(X, [10, 400, 400, 900])]
    merged = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3]).merge(parts[4]))
    assert merged.count == one.count == 1003 and merged.dim == 16
    np.testing.assert_allclose(merged.mean, one.mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(merged.covariance(), one.covariance(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(one.covariance(), np.cov(X.T), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(one.covariance(ddof=0), np.cov(X.T, ddof=0), rtol=1e-11, atol=1e-12)
    assert parts[0].count == 10                   # merge did not modify its inputs
    a = WhiteningStats.from_moments(merged, heldout=X[:5])
    b = WhiteningStats.from_moments(one, heldout=X[:5])
    np.testing.assert_allclose(a.sqnorm(X[:20]), b.sqnorm(X[:20]), rtol=1e-9)


def test_moments_reject_bad_rows():
    m = Moments.empty(3)
    with pytest.raises(ValueError, match="row 2"):
        m.update(np.array([[0, 0, 0], [1, 1, 1], [np.nan, 0, 0], [np.inf, 0, 0]]))
    with pytest.raises(ValueError, match="4 columns"):
        m.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="2-D"):
        m.update(np.zeros(3))
    with pytest.raises(ValueError, match="same dimension"):
        m.merge(Moments.empty(4))
    with pytest.raises(ValueError, match="more than 1"):
        Moments.empty(3).update(np.zeros((1, 3))).covariance()
    assert m.count == 0 and m.update(np.ones((2, 3))) is m and m.count == 2


# ---- calibration --------------------------------------------------------------------------

def test_heldout_pvalues_of_fresh_samples_are_uniform():
    X, _, _, draw = gaussian(10000, 5, seed=7)
    ws = WhiteningStats.fit(X, holdout=0.3, seed=1)
    assert ws.n_heldout == 3000 and np.all(np.diff(ws.calibration) >= 0)
    p = ws.pvalue(draw(2000))
    assert stats.kstest(p, "uniform").pvalue > 0.01
    shifted = ws.pvalue(draw(200) + 3.0)          # far from the reference: small p-values
    assert np.median(shifted) < 0.01
    chi2 = ws.chi2_pvalue(draw(2000))
    assert stats.kstest(chi2, "uniform").pvalue > 0.01


def test_pvalue_counts_reference_rows_at_least_as_unlikely():
    ws = WhiteningStats(mean=np.zeros(2), whitening=np.eye(2), eigenvalues=np.ones(2),
                        calibration=np.array([1.0, 2.0, 2.0, 3.0]), n_fit=10)
    p = ws.pvalue_from_sqnorm(np.array([0.0, 2.0, 2.5, 10.0, np.nan]))
    np.testing.assert_array_equal(p[:4], [1.0, 4 / 5, 2 / 5, 1 / 5])
    assert np.isnan(p[4])
    np.testing.assert_allclose(ws.pvalue(np.array([[1.0, 1.0]])), [4 / 5])
    np.testing.assert_allclose(ws.chi2_pvalue_from_sqnorm([2.0]), stats.chi2(2).sf([2.0]))


def test_pvalue_without_calibration_is_refused():
    X, _, _, _ = gaussian(100, 3)
    ws = WhiteningStats.fit(X, holdout=0.0)
    with pytest.raises(ValueError, match="holdout"):
        ws.pvalue(X)
    assert ws.summary()["heldout_sqnorm_over_m"] is None


# ---- choosing components / shrinkage -------------------------------------------------------

def test_auto_rule_takes_the_largest_m_under_the_tolerance():
    assert _auto_components(np.array([1.0, 1.0, 1.0, 1.5, 5.0]), tol=0.1) == 3
    # r = [2, 1.25, 1.0, 0.875, 1.3]: the largest m with r <= 1.1 is 4
    assert _auto_components(np.array([2.0, 0.5, 0.5, 0.5, 3.0]), tol=0.1) == 4
    # r = [3, 1.75]: none passes, so the m nearest 1
    assert _auto_components(np.array([3.0, 0.5]), tol=0.1) == 2


def test_auto_components_fixes_overfitting_in_512_dims():
    d = 512
    X, _, _, draw = gaussian(3000, d, seed=0, spectrum=1.0 / np.arange(1, d + 1))
    full = WhiteningStats.fit(X, components=None, holdout=0.1, seed=0)
    auto = WhiteningStats.fit(X, components="auto", holdout=0.1, seed=0)
    full_r = full.summary()["heldout_sqnorm_over_m"]
    auto_r = auto.summary()["heldout_sqnorm_over_m"]
    assert full_r > 1.2                            # measured 1.2425: the full fit over-fits
    assert abs(auto_r - 1.0) <= 0.1 and auto.components < d   # measured 1.0986 with m = 429
    fresh = draw(2000)
    assert abs(auto.sqnorm(fresh).mean() / auto.components - 1.0) <= 0.1
    assert full.sqnorm(fresh).mean() / d > 1.2


def test_auto_shrinkage_meets_the_tolerance():
    d = 64
    X, _, _, _ = gaussian(400, d, seed=8, spectrum=1.0 / np.arange(1, d + 1))
    ws = WhiteningStats.fit(X, shrinkage="auto", holdout=0.25, seed=0, tol=0.05)
    assert 0 < ws.shrinkage < 1 and ws.components == d
    assert ws.summary()["heldout_sqnorm_over_m"] == pytest.approx(1.05, abs=1e-6)
    big, _, _, _ = gaussian(50000, 4, seed=9)
    assert WhiteningStats.fit(big, shrinkage="auto", holdout=0.1).shrinkage == 0.0


def test_auto_needs_a_holdout():
    X, _, _, _ = gaussian(100, 3)
    for kw in ({"components": "auto"}, {"shrinkage": "auto"}):
        with pytest.raises(ValueError, match="holdout > 0"):
            WhiteningStats.fit(X, holdout=0.0, **kw)


# ---- refusals -----------------------------------------------------------------------------

def test_too_few_samples_or_singular_covariance_is_refused():
    X, _, _, _ = gaussian(10, 20)
    with pytest.raises(ValueError, match="components <= 9.*shrinkage"):
        WhiteningStats.fit(X, holdout=0.0)
    assert WhiteningStats.fit(X, components=9, holdout=0.0).components == 9
    assert WhiteningStats.fit(X, shrinkage=0.1, holdout=0.0).components == 20
    Y, _, _, _ = gaussian(200, 4)
    Y = np.hstack([Y, Y[:, :1]])                  # a duplicated column: rank 4 of 5
    with pytest.raises(ValueError, match="only 4 usable"):
        WhiteningStats.fit(Y, holdout=0.0)
    assert WhiteningStats.fit(Y, components=4, holdout=0.0).components == 4
    with pytest.raises(ValueError, match="at least 2"):
        WhiteningStats.fit(Y[:1], holdout=0.0)


def test_bad_inputs_are_refused_with_the_row():
    X, _, _, _ = gaussian(100, 3)
    bad = X.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="first is row 7"):
        WhiteningStats.fit(bad)
    ws = WhiteningStats.fit(X)
    with pytest.raises(ValueError, match="first is row 0"):
        ws.sqnorm(np.array([[np.inf, 0, 0]]))
    with pytest.raises(ValueError, match="2-D"):
        ws.sqnorm(X[0])
    with pytest.raises(ValueError, match="3-dimensional"):
        ws.loglik(np.zeros((2, 4)))
    for kw in ({"components": 0}, {"components": 4}, {"components": True},
               {"components": "all"}, {"shrinkage": 1.0}, {"shrinkage": -0.1},
               {"holdout": 1.0}, {"keys": ["a"]}):
        with pytest.raises(ValueError):
            WhiteningStats.fit(X, **kw)


# ---- holdout ------------------------------------------------------------------------------

def test_key_holdout_is_a_stable_hash():
    keys = [f"{i:09d}" for i in range(16)]
    expected = [0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]   # blake2b of "0:<key>"
    assert holdout_mask(keys, 0.3, seed=0).astype(int).tolist() == expected
    assert holdout_mask(keys, 0.3, seed=1).astype(int).tolist() == \
        [1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 0, 0, 0]
    assert holdout_mask(["a", "b", "sample/ü"], 0.5, seed=7).tolist() == [True, False, False]
    assert not holdout_mask(keys, 0.0).any()
    many = holdout_mask([str(i) for i in range(20000)], 0.1)
    assert abs(many.mean() - 0.1) < 0.01
    # each key decides alone: a subset keeps its members' decisions
    np.testing.assert_array_equal(holdout_mask(keys[5:9], 0.3), np.array(expected[5:9], bool))
    with pytest.raises(ValueError, match="strings"):
        holdout_mask([1, 2], 0.1)


def test_seeded_holdout_is_deterministic_and_exact_in_size():
    X, _, _, _ = gaussian(1000, 3)
    a, b = WhiteningStats.fit(X, holdout=0.15, seed=4), WhiteningStats.fit(X, holdout=0.15, seed=4)
    assert a.n_heldout == 150 and a.n_fit == 850
    np.testing.assert_array_equal(a.calibration, b.calibration)
    assert not np.array_equal(a.calibration, WhiteningStats.fit(X, holdout=0.15, seed=5).calibration)


# ---- stats files --------------------------------------------------------------------------

def _assert_same(a: WhiteningStats, b: WhiteningStats):
    for name in ("mean", "whitening", "eigenvalues", "calibration"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.tobytes() == y.tobytes(), name
    assert a.summary() == b.summary()


def test_save_load_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(10)
    V, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    lam = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    W = V[:, ::-1][:, 2:][:, ::-1][:, :4] / np.sqrt(lam[:4])   # strided view
    ws = WhiteningStats(mean=rng.standard_normal(6), whitening=np.asfortranarray(W),
                        eigenvalues=lam, calibration=np.sort(rng.random(7) * 8), n_fit=30)
    np.testing.assert_array_equal(ws.whitening, W)
    ws.save(tmp_path / "one.safetensors", metadata={"model": "m"})
    back = WhiteningStats.load(tmp_path / "one.safetensors")
    _assert_same(ws, back)
    assert back.whitening.tobytes() == np.ascontiguousarray(W).tobytes()

    X, _, _, draw = gaussian(600, 5, seed=11)
    fitted = WhiteningStats.fit(X, components=4, shrinkage=0.05, holdout=0.2)
    fitted.save(tmp_path / "fit.safetensors")
    again = WhiteningStats.load(tmp_path / "fit.safetensors", dim=5)
    _assert_same(fitted, again)
    Y = draw(30)
    assert fitted.loglik(Y).tobytes() == again.loglik(Y).tobytes()
    assert again.summary()["normality_fit"]["n_samples"] == 480


def test_stats_file_towers_and_metadata(tmp_path):
    img = WhiteningStats.fit(gaussian(300, 4, seed=12)[0])
    txt = WhiteningStats.fit(gaussian(300, 3, seed=13)[0], components=2)
    user = {"model": "ViT-B-32", "pretrained": "openai", "normalize": False,
            "reference_digest": "abc", "created": "2025-01-01T00:00:00+00:00"}
    path = StatsFile(towers={"image": img, "text": txt}, metadata=user).save(tmp_path / "s.st")
    sf = StatsFile.load(path)
    assert sorted(sf.towers) == ["image", "text"]
    _assert_same(sf.towers["image"], img)
    _assert_same(sf.towers["text"], txt)
    md = sf.metadata
    assert {k: md[k] for k in user} == user                       # caller's values kept
    assert md["format"] == FORMAT and md["towers"] == ["image", "text"]
    assert md["wclip_version"] == pipeline.__version__
    assert md["summary"]["text"]["components"] == 2
    with pytest.raises(StatsFileError, match="pass tower"):
        WhiteningStats.load(path)
    assert WhiteningStats.load(path, tower="text").dim == 3
    sf.save(tmp_path / "again.st")                                 # a loaded file saves again
    assert StatsFile.load(tmp_path / "again.st").metadata == md
    with pytest.raises(ValueError, match="JSON"):
        StatsFile(towers={"image": img}, metadata={"x": object()})
    with pytest.raises(ValueError, match="tower names"):
        StatsFile(towers={"a.b": img})


class _Boom:
    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(_Boom.marker),))


def _valid_tensors(d=4, m=3):
    V = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))[0]
    return {"x.mean": np.zeros(d), "x.whitening": np.ascontiguousarray(V[:, :m]),
            "x.eigenvalues": np.linspace(2.0, 1.0, d), "x.calibration": np.array([0.5, 1.0])}


def _write(path, tensors, summary=None):
    summ = {"dim": 4, "components": 3, "n_heldout": 2, "n_fit": 10, "shrinkage": 0.0}
    header = json.dumps({"format": FORMAT, "towers": ["x"], "summary": {"x": summary or summ}})
    digest = content_digest(tensors, header) if set(tensors) == {f"x.{n}" for n in TENSORS} else ""
    save_file(tensors, str(path), metadata={"format": FORMAT, "wclip": header, "digest": digest})
    return path


def test_loading_invalid_files_is_refused(tmp_path):
    assert WhiteningStats.load(_write(tmp_path / "ok.st", _valid_tensors())).components == 3

    _Boom.marker = str(tmp_path / "unpickled")
    (tmp_path / "p.st").write_bytes(pickle.dumps({"x.mean": _Boom()}))
    good = WhiteningStats.fit(gaussian(100, 4)[0]).save(tmp_path / "good.st")
    blob = good.read_bytes()
    (tmp_path / "trunc.st").write_bytes(blob[: len(blob) - 20])       # inside the data
    (tmp_path / "trunc2.st").write_bytes(blob[: len(blob) // 2])      # inside the header
    (tmp_path / "empty.st").write_bytes(b"")
    (tmp_path / "random.st").write_bytes(np.random.default_rng(0).bytes(4096))
    missing = _valid_tensors()
    del missing["x.calibration"]
    wrong_dim = dict(_valid_tensors(), **{"x.mean": np.zeros(5)})
    nan = _valid_tensors()
    nan["x.whitening"][1, 1] = np.nan
    cases = {
        "p.st": "safetensors header", "trunc.st": "not fully covered",
        "trunc2.st": "safetensors header", "empty.st": "safetensors header",
        "random.st": "safetensors header", "absent.st": "does not exist",
        "missing.st": "missing tensors", "dim.st": "inconsistent shapes", "nan.st": "NaN",
        "f32.st": "float64", "count.st": "do not match", "nosumm.st": "summary",
    }
    _write(tmp_path / "missing.st", missing)
    _write(tmp_path / "dim.st", wrong_dim)
    _write(tmp_path / "nan.st", nan)
    _write(tmp_path / "f32.st", {k: v.astype(np.float32) for k, v in _valid_tensors().items()})
    _write(tmp_path / "count.st", _valid_tensors(),
           {"dim": 4, "components": 3, "n_heldout": 5, "n_fit": 10, "shrinkage": 0.0})
    header = json.dumps({"towers": ["x"]})
    save_file(_valid_tensors(), str(tmp_path / "nosumm.st"),
              metadata={"format": FORMAT, "wclip": header, "digest": content_digest(_valid_tensors(), header)})
    for name, what in cases.items():
        with pytest.raises(StatsFileError, match=what) as info:
            StatsFile.load(tmp_path / name)
        assert "wclip fit" in str(info.value), name
        assert isinstance(info.value, ValueError)
    assert not (tmp_path / "unpickled").exists()
    save_file(_valid_tensors(), str(tmp_path / "fmt.st"), metadata={"format": "other/9"})
    with pytest.raises(StatsFileError, match="format"):
        StatsFile.load(tmp_path / "fmt.st")
    with pytest.raises(StatsFileError, match="fitted on 4-dimensional.*produces 768"):
        StatsFile.load(good, dim=768)


def test_an_edited_header_or_tensor_is_detected(tmp_path):
    """Flipping the normalisation, claiming another model, or changing a number after `wclip fit`: refused."""
    from safetensors import safe_open

    X = gaussian(200, 4)[0]
    path = StatsFile(towers={"image": WhiteningStats.fit(X)},
                     metadata={"normalize": False, "model_identity": {"model": "a", "weights": "w"}}).save(
        tmp_path / "s.safetensors")
    with safe_open(str(path), framework="numpy") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edits = {
        "normalize": lambda m: m.update(normalize=True),
        "model": lambda m: m.update(model_identity={"model": "b", "weights": "w"}),
    }
    for name, change in edits.items():
        meta = json.loads(header["wclip"])
        change(meta)
        save_file(tensors, str(tmp_path / f"{name}.st"), metadata=dict(header, wclip=json.dumps(meta)))
    bumped = dict(tensors)
    bumped["image.mean"] = bumped["image.mean"] + 1e-9
    save_file(bumped, str(tmp_path / "tensor.st"), metadata=header)
    for name in ("normalize", "model", "tensor"):
        with pytest.raises(StatsFileError, match=r"was changed after `wclip fit` wrote it.*Re-run `wclip fit`"):
            StatsFile.load(tmp_path / f"{name}.st")
    assert StatsFile.load(path).metadata["normalize"] is False
