"""How the demo is measured: one AUROC convention, and an evaluation scored by the product's WhiteningStats."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.demo import metrics, world
from pipeline.whitening import WhiteningStats


def test_auroc_counts_anomalies_scoring_lower():
    assert metrics.auroc([0.0, 1.0], [2.0, 3.0]) == 1.0      # anomalies score lower: perfectly ranked
    assert metrics.auroc([5.0], [1.0]) == 0.0
    assert metrics.auroc([1.0, 2.0], [1.0, 2.0]) == 0.5      # ties count half
    assert metrics.auroc([1.0, 3.0], [2.0]) == 0.5
    assert metrics.auroc(np.array([-np.inf]), np.array([0.0, 1.0])) == 1.0   # an unscorable anomaly is caught
    # Mann–Whitney U / (n1 n0) by brute force
    rng = np.random.default_rng(0)
    a, b = rng.normal(-1, 1, 30).round(1), rng.normal(0, 1, 40).round(1)
    pairs = (a[:, None] < b[None, :]).sum() + 0.5 * (a[:, None] == b[None, :]).sum()
    assert metrics.auroc(a, b) == pytest.approx(pairs / (30 * 40))


def _fake_embed(model, preprocess, tokenizer, samples):
    """Embeddings that depend only on a sample's key and labels: clean rows are standard normal, an image
    anomaly's image row and a caption anomaly's text row are scaled by 3, a mismatch's text is unrelated."""
    img, txt = [], []
    for s in samples:
        rng = np.random.default_rng([int(s.labels["key"]), len(s.caption)])
        x = rng.normal(size=6)
        kind = s.labels["anomaly"]
        y = x + 0.1 * rng.normal(size=6) if kind != "mismatch" else rng.normal(size=6)
        img.append(3 * x if world.anomaly_modality(kind) == "image" else x)
        txt.append(3 * y if world.anomaly_modality(kind) == "caption" else y)
    return np.array(img), np.array(txt)


def test_evaluation_scores_with_whitening_stats_fitted_as_the_demo_fits(monkeypatch):
    reference, target = metrics.eval_worlds(seed=3, n_reference=600, n_target=300, anomaly_rate=0.4)
    monkeypatch.setattr(metrics, "embed", _fake_embed)
    ev = metrics.evaluate(None, None, None, reference, target)

    ref_img, ref_txt = _fake_embed(None, None, None, reference)
    tgt_img, tgt_txt = _fake_embed(None, None, None, target)
    keys = [s.labels["key"] for s in reference]
    fits = {"image": WhiteningStats.fit(ref_img, keys=keys, **metrics.FIT),
            "text": WhiteningStats.fit(ref_txt, keys=keys, **metrics.FIT)}
    kinds = np.array([s.labels["anomaly"] or "" for s in target])
    clean = kinds == ""
    assert ev["components"] == {t: f.components for t, f in fits.items()}
    assert ev["held_out"] == {t: f.n_heldout for t, f in fits.items()} and 80 < ev["held_out"]["image"] < 160
    loglik = fits["image"].loglik(tgt_img)
    for kind in ("noise", "damaged"):
        assert ev["auroc"][kind] == round(metrics.auroc(loglik[kinds == kind], loglik[clean]), 4)
    pvalue = fits["text"].pvalue(tgt_txt)
    assert ev["gibberish_frac_p_below_0.01"] == round(float((pvalue[kinds == "gibberish"] < 0.01).mean()), 4)
    assert ev["clean_frac_p_below_0.01"]["text"] == round(float((pvalue[clean] < 0.01).mean()), 4)
    # the made-up anomalies are far out: every kind is ranked almost perfectly, by the right score
    assert set(ev["auroc"]) == set(world.ANOMALY_KINDS)
    assert min(ev["auroc"].values()) >= 0.9 and ev["auroc_pair"] >= 0.9
    assert ev["scorer"] == "pipeline.whitening.WhiteningStats"
    assert {k: ev["fit"][k] for k in metrics.FIT} == metrics.FIT
