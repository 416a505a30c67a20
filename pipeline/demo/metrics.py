"""How the demo is measured: one AUROC, and how well a model's whitened likelihoods rank the labelled
anomalies of a generated world.

The evaluation scores with the product's numerics: :meth:`pipeline.whitening.WhiteningStats.fit` with
:data:`FIT`, the settings ``wclip demo`` gives ``wclip fit``, then the fit's ``sqnorm``, ``loglik`` and
``pvalue``. So the figures recorded for the shipped model (``wclip-demo.train.json``) and the checkpoint
selection of its training measure what ``wclip score`` computes.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from pipeline.demo import world

#: How every demo evaluation fits a reference world: ``wclip fit``'s defaults (``FitConfig``: the largest
#: number of components whose held-out sqnorm/m stays within 1 + DEFAULT_TOL, no shrinkage, the hold-out
#: chosen by a hash of each sample's key, seed 0), but holding out 0.2 rather than 0.1 for a larger
#: calibration table (about 800 rows of a 4000-sample reference, so p-values reach below 0.01).
FIT = {"components": "auto", "shrinkage": 0.0, "holdout": 0.2, "seed": 0}


def auroc(anomalous, normal) -> float:
    """Probability that an anomalous row scores *lower* than a normal one, ties counted half (Mann–Whitney).

    The sign convention of wclip's scores: a lower loglik, p-value or clip_score is more anomalous. 1.0: every
    anomaly below every normal row; 0.5: chance. Pass a score where higher means more anomalous negated.
    """
    from scipy.stats import rankdata

    a, b = np.asarray(anomalous, float), np.asarray(normal, float)
    ranks = rankdata(np.concatenate([-a, -b]))
    return float((ranks[:len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


def to_batch(jpegs: Sequence[bytes], captions: Sequence[str], preprocess, tokenizer):
    """Decode JPEGs through the model's own preprocess and tokenize captions: ``(images, tokens)``."""
    import torch
    from PIL import Image

    images = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs])
    return images, tokenizer(list(captions))


def embed(model, preprocess, tokenizer, samples, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Raw (not L2-normalised) float64 image and text embeddings of world samples."""
    import torch

    img, txt = [], []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            images, tokens = to_batch([s.image for s in chunk], [s.caption for s in chunk], preprocess, tokenizer)
            img.append(model.encode_image(images, normalize=False).double().numpy())
            txt.append(model.encode_text(tokens, normalize=False).double().numpy())
    return np.concatenate(img), np.concatenate(txt)


def eval_worlds(seed: int, n_reference: int, n_target: int, anomaly_rate: float) -> tuple[list, list]:
    """A clean reference world (shard 0) and a labelled target world (shard 1) for ``seed``."""
    return ([s for _, s in world.iter_world(seed, 0, n_reference)],
            [s for _, s in world.iter_world(seed, 1, n_target, anomaly_rate)])


def _fraction_below(p: np.ndarray, level: float = 0.01) -> float:
    return round(float((p < level).mean()), 4)


def evaluate(model, preprocess, tokenizer, reference: list, target: list) -> dict:
    """Fit each tower on the clean ``reference`` samples (:data:`FIT`), score the labelled ``target``.

    Returns the AUROC per anomaly kind and pooled per modality (image kinds by image loglik, caption
    kinds by text loglik, mismatched pairs by cosine similarity), the share of noise and gibberish with
    p < 0.01, calibration checks on the clean target rows, and the fits' sizes.
    """
    from pipeline.whitening import WhiteningStats

    ref_img, ref_txt = embed(model, preprocess, tokenizer, reference)
    tgt_img, tgt_txt = embed(model, preprocess, tokenizer, target)
    keys = [s.labels["key"] for s in reference]
    fits = {"image": WhiteningStats.fit(ref_img, keys=keys, **FIT),
            "text": WhiteningStats.fit(ref_txt, keys=keys, **FIT)}
    rows = {"image": tgt_img, "text": tgt_txt}
    sqnorm = {t: fits[t].sqnorm(rows[t]) for t in fits}
    loglik = {t: fits[t].loglik(rows[t]) for t in fits}
    pvalue = {t: fits[t].pvalue(rows[t]) for t in fits}
    cos = (tgt_img * tgt_txt).sum(1) / (np.linalg.norm(tgt_img, axis=1) * np.linalg.norm(tgt_txt, axis=1))
    kinds = np.array([s.labels["anomaly"] or "" for s in target])
    clean = kinds == ""
    score = {"image": loglik["image"], "caption": loglik["text"], "pair": cos}   # lower = more anomalous

    def ranked(modality, only=None):
        chosen = [k for k in world.ANOMALY_KINDS if world.anomaly_modality(k) == modality
                  and (only is None or k in only)]
        return round(auroc(score[modality][np.isin(kinds, chosen)], score[modality][clean]), 4)

    return {
        "n_reference": len(reference), "n_target": len(target),
        "anomaly_rate": round(float(np.mean(kinds != "")), 4),
        "embeddings": "raw (not L2-normalised)",
        "scorer": "pipeline.whitening.WhiteningStats", "fit": {**FIT, "holdout_split": "hash of the sample key"},
        "components": {t: f.components for t, f in fits.items()},
        "held_out": {t: f.n_heldout for t, f in fits.items()},
        "held_sqnorm_per_m": {t: round(f.summary()["heldout_sqnorm_over_m"], 3) for t, f in fits.items()},
        "clean_target_sqnorm_per_m": {t: round(float(sqnorm[t][clean].mean() / fits[t].components), 3)
                                      for t in fits},
        "auroc": {kind: ranked(world.anomaly_modality(kind), (kind,)) for kind in world.ANOMALY_KINDS
                  if (kinds == kind).any()},
        "auroc_image_obvious": ranked("image", ("noise", "blank", "damaged")),
        "auroc_image_all": ranked("image"), "auroc_caption": ranked("caption"), "auroc_pair": ranked("pair"),
        "noise_frac_p_below_0.01": _fraction_below(pvalue["image"][kinds == "noise"]),
        "gibberish_frac_p_below_0.01": _fraction_below(pvalue["text"][kinds == "gibberish"]),
        "clean_frac_p_below_0.01": {t: _fraction_below(pvalue[t][clean]) for t in pvalue},
        "clip_score_clean_mean": round(float(cos[clean].mean()), 4),
        "clip_score_mismatch_mean": round(float(cos[kinds == "mismatch"].mean()), 4),
        # spread of the raw embeddings' norms: a nuisance that whitening raw embeddings cannot remove
        "reference_norm_cv": {t: round(float(n.std() / n.mean()), 4) for t, n in
                              (("image", np.linalg.norm(ref_img, axis=1)), ("text", np.linalg.norm(ref_txt, axis=1)))},
    }


def dedup_quality(planted: dict, rows) -> dict:
    """How well a dedup found the planted duplicates, counted in pairs.

    ``planted``: ``{copy key: source key}`` (the world's ``duplicate_of``: the source is the faithful copy);
    ``rows``: a dedup folder's rows (``key``, ``dup_group``, ``kept``; ``dup_group`` null for rows not compared).
    The pairs found are every pair of rows in one group (a group of ``s`` rows holds ``s (s - 1) / 2``), as the
    dedup acts on them. Returns the groups found (two or more rows), the planted and found pairs, those both
    planted and found, ``precision`` (of the found pairs, the share planted) and ``recall`` (of the planted,
    the share found), None where they divide by zero; and of the groups holding a planted pair, how many keep
    its faithful copy (``faithful_kept``, ``faithful_share``).
    """
    members: dict = {}
    kept = {}
    for row in rows:
        if row["dup_group"] is not None:
            members.setdefault(row["dup_group"], []).append(row["key"])
            if row["kept"]:
                kept[row["dup_group"]] = row["key"]
    group_of = {key: g for g, keys in members.items() for key in keys}
    groups = [g for g, keys in members.items() if len(keys) > 1]
    found = sum(len(members[g]) * (len(members[g]) - 1) // 2 for g in groups)
    hits = {copy: source for copy, source in planted.items()
            if copy in group_of and group_of.get(source) == group_of[copy]}
    holding = {group_of[copy] for copy in hits}
    faithful = {group_of[copy] for copy, source in hits.items() if kept.get(group_of[copy]) == source}
    return {"groups": len(groups), "planted_pairs": len(planted), "found_pairs": found, "planted_found": len(hits),
            "precision": len(hits) / found if found else None,
            "recall": len(hits) / len(planted) if planted else None,
            "groups_with_planted": len(holding), "faithful_kept": len(faithful),
            "faithful_share": len(faithful) / len(holding) if holding else None}
