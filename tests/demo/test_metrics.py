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


def _brute_force(planted: dict, rows: list) -> dict:
    """Precision and recall in pairs, counted over every pair of keys: found if both rows are in one group."""
    import itertools

    group = {r["key"]: r["dup_group"] for r in rows}
    wanted = {frozenset(p) for p in planted.items()}
    found = {frozenset((a, b)) for a, b in itertools.combinations(sorted(group), 2)
             if group[a] is not None and group[a] == group[b]}
    return {"found_pairs": len(found), "planted_found": len(found & wanted),
            "precision": len(found & wanted) / len(found), "recall": len(found & wanted) / len(wanted)}


def test_dedup_quality_counts_pairs_as_an_independent_count_does():
    # a tiny world: 12 rows; three planted pairs (copy -> faithful source)
    planted = {"c1": "s1", "c2": "s2", "c3": "s3"}
    rows = [
        # s1 + c1 found, faithful kept
        {"key": "s1", "dup_group": 0, "kept": True}, {"key": "c1", "dup_group": 0, "kept": False},
        # s2 + c2 found with a stranger x1 (3 rows: 3 pairs, one planted), the copy kept
        {"key": "s2", "dup_group": 2, "kept": False}, {"key": "c2", "dup_group": 2, "kept": True},
        {"key": "x1", "dup_group": 2, "kept": False},
        # s3 and c3 in different groups: missed
        {"key": "s3", "dup_group": 5, "kept": True}, {"key": "c3", "dup_group": 6, "kept": True},
        # two strangers grouped: a false pair; rows not compared (null group) and singletons
        {"key": "x2", "dup_group": 7, "kept": True}, {"key": "x3", "dup_group": 7, "kept": False},
        {"key": "x4", "dup_group": None, "kept": True}, {"key": "x5", "dup_group": None, "kept": True},
        {"key": "x6", "dup_group": 11, "kept": True},
    ]
    out = metrics.dedup_quality(planted, rows)
    expected = _brute_force(planted, rows)
    assert expected == {"found_pairs": 5, "planted_found": 2, "precision": 2 / 5, "recall": 2 / 3}
    assert {k: out[k] for k in expected} == expected
    assert out["groups"] == 3 and out["planted_pairs"] == 3      # groups of two or more rows: 0, 2, 7
    assert (out["groups_with_planted"], out["faithful_kept"], out["faithful_share"]) == (2, 1, 0.5)
    # nothing found, nothing planted: the ratios are None, not 0 or a division error
    empty = metrics.dedup_quality({}, [{"key": "a", "dup_group": None, "kept": True}])
    assert (empty["found_pairs"], empty["precision"], empty["recall"], empty["faithful_share"]) == (0, None, None, None)
