"""`wclip demo` end to end on a smaller world: real Ray, the shipped model, real AUROCs."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.demo import CLUSTERS, MODEL, shards
from pipeline.demo.metrics import FIT, auroc
from pipeline.demo.run import DEDUP_EPS, DemoConfig, evaluate, report, run_demo
from pipeline.models import builtin_weights
from pipeline.whitening import StatsFile

needs_weights = pytest.mark.skipif(not builtin_weights(MODEL).is_file(), reason="the demo weights are not built")


@pytest.fixture(scope="module")
def summary(tmp_path_factory, ray_local):
    work = tmp_path_factory.mktemp("demo")
    return run_demo(DemoConfig(workdir=str(work), reference_shards=2, reference_per_shard=400,
                               target_shards=1, target_per_shard=500, anomaly_rate=0.4, progress=False))


@needs_weights
def test_small_demo_ranks_anomalies(summary):
    # the 0.9 for this smaller run, on every group and every kind
    groups, kinds = summary["groups"], summary["kinds"]
    assert all(groups[g]["n"] > 20 for g in ("image", "caption", "mismatch"))
    assert set(kinds) == {"noise", "blank", "damaged", "unseen_shape", "unseen_colour", "gibberish",
                          "ungrammatical", "mismatch"}
    for group in ("image", "caption", "mismatch"):
        assert groups[group]["auroc"] >= 0.9, groups
    for kind, value in kinds.items():
        assert value["n"] >= 15 and value["auroc"] >= 0.9, (kind, kinds)
    # With 160 held-out reference rows the smallest p-value is 1/161, so "p < 0.01" means beyond
    # every calibration row: a strict test at this size.
    assert summary["obvious"]["gibberish"]["fraction_p_below_0.01"] >= 0.8


@needs_weights
def test_demo_writes_its_outputs(summary):
    from pathlib import Path

    work = Path(summary["workdir"])
    on_disk = json.loads((work / "summary.json").read_text())
    assert on_disk["groups"] == summary["groups"]
    assert summary["scored_rows"] == 500 and summary["reference_samples"] == 800
    assert len(list((work / "scores").glob("*.parquet"))) == 1
    assert (work / "card" / "README.md").read_text().startswith("---\n")
    text = report(summary)
    assert "AUROC" in text and "summary.json" in text
    # fitted with the settings the model's recorded evaluation uses (one definition, metrics.FIT)
    meta = StatsFile.load(summary["stats"]).metadata
    assert {k: meta["components_requested" if k == "components" else k] for k in FIT} == FIT


@needs_weights
def test_small_demo_reports_the_unseen_pairing_by_global_and_local_likelihood(summary):
    assert summary["clusters"] == {"image": CLUSTERS, "text": CLUSTERS}
    entry = summary["local"]["unseen_pairing"]
    assert entry["n"] >= 15 and "unseen_pairing" not in summary["kinds"]   # the global groups are as before
    for tower in ("image", "text"):
        assert entry[tower]["global"]["score"] == f"{tower}_loglik"
        assert entry[tower]["local"]["score"] == f"{tower}_local_loglik"
        assert 0.0 <= entry[tower]["global"]["auroc"] <= 1.0 and 0.0 <= entry[tower]["local"]["auroc"] <= 1.0
    from pathlib import Path

    assert json.loads((Path(summary["workdir"]) / "summary.json").read_text())["local"] == summary["local"]
    text = report(summary)
    assert (f"unseen pairing: global image_loglik {entry['image']['global']['auroc']:.3f}, "
            f"local image_local_loglik {entry['image']['local']['auroc']:.3f}") in text
    assert f"local likelihood ({CLUSTERS} clusters)" in text


@needs_weights
def test_small_demo_finds_the_planted_duplicates_and_keeps_the_faithful_copy(summary):
    import itertools
    from pathlib import Path

    work = Path(summary["workdir"])
    labels = {r["key"]: r for r in shards.read_labels(work / "target")}
    planted = {k: r["duplicate_of"] for k, r in labels.items() if r["duplicate_of"] is not None}
    rows = [r for f in sorted((work / "dedup").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(planted) == 15 and len(rows) == 500                  # 3% of 500 target rows, each a pair
    group = {r["key"]: r["dup_group"] for r in rows}
    kept = {r["dup_group"]: r["key"] for r in rows if r["kept"] and r["dup_group"] is not None}
    clip = {r["key"]: r["clip_score"] for f in sorted((work / "scores").glob("*.parquet"))
            for r in pq.read_table(f).to_pylist()}
    # an independent count: every pair of keys, found when both rows share a group
    hits = [(c, s) for c, s in planted.items() if group[c] is not None and group[c] == group[s]]
    normal = sorted(k for k in group if labels[k]["anomaly"] is None)
    found_normal = sum(1 for a, b in itertools.combinations(normal, 2) if group[a] is not None and group[a] == group[b])
    d = summary["dedup"]
    assert (d["eps"], d["keep"], d["clusters_source"]) == (DEDUP_EPS, "clip_score:highest", "image_cluster")
    assert d["planted_pairs"] == 15 and d["planted_found"] == len(hits) and d["recall"] == len(hits) / 15
    assert d["normal"]["found_pairs"] == found_normal and d["normal"]["precision"] == len(hits) / found_normal
    assert d["recall"] >= 0.9 and d["normal"]["precision"] >= 0.9, d
    faithful = [s for c, s in hits if kept[group[s]] == s]
    assert d["faithful_kept"] == len(faithful) and d["faithful_share"] >= 0.9, d
    assert all(clip[kept[group[s]]] >= clip[s] for _, s in hits)   # the rule: the highest clip_score is kept
    removed = json.loads((work / "dedup.wclip" / "dedup.json").read_text())["summary"]["removed"]  # beside dedup/
    assert d["rows_removed"] == removed == sum(not r["kept"] for r in rows)
    assert json.loads((work / "summary.json").read_text())["dedup"] == d and summary["timings"]["dedup_s"] > 0
    assert (f"of 15 planted duplicate pairs, recall {d['recall']:.3f}, precision {d['normal']['precision']:.3f} "
            f"among normal rows") in report(summary)


def _scores(tmp_path, local: bool):
    """A generated target (withheld pairs, every kind) and a scores file made up for it: clean rows and
    unseen pairings alike by the global log-likelihood, the pairings far below by the local one."""
    target = tmp_path / "target"
    shards.generate_world(target, 1, 180, seed=3, anomaly_rate=0.5, unseen_pairs=True)
    rows = shards.read_labels(target)
    rng = np.random.default_rng(0)
    table = {"key": [r["key"] for r in rows]}
    kinds = np.array([r["anomaly"] or "" for r in rows])
    for column in ("image_loglik", "text_loglik", "clip_score", "image_pvalue", "text_pvalue"):
        table[column] = rng.normal(size=len(rows))
    if local:
        for tower in ("image", "text"):
            table[f"{tower}_local_loglik"] = rng.normal(size=len(rows)) - 5.0 * (kinds == "unseen_pairing")
            table[f"{tower}_cluster"] = np.zeros(len(rows), dtype=np.int32)
    (tmp_path / "scores").mkdir()
    pq.write_table(pa.table(table), tmp_path / "scores" / "00000.parquet")
    return tmp_path / "scores", target, table, kinds


@pytest.mark.parametrize("local", [True, False])
def test_evaluate_ranks_the_unseen_pairing_by_both_likelihoods(tmp_path, local):
    scores, target, table, kinds = _scores(tmp_path, local)
    out = evaluate(scores, target)
    clean, pairing = kinds == "", kinds == "unseen_pairing"
    entry = out["local"]["unseen_pairing"]
    assert entry["n"] == pairing.sum() == 10
    for tower in ("image", "text"):
        g = table[f"{tower}_loglik"]
        assert entry[tower]["global"] == {"score": f"{tower}_loglik", "auroc": auroc(g[pairing], g[clean])}
        if local:
            loc = table[f"{tower}_local_loglik"]
            assert entry[tower]["local"] == {"score": f"{tower}_local_loglik",
                                             "auroc": auroc(loc[pairing], loc[clean])}
            assert entry[tower]["local"]["auroc"] > 0.95
        else:
            assert entry[tower]["local"] == {"score": f"{tower}_local_loglik", "auroc": None}
    # the existing groups and kinds are computed as before, without the new kind
    image = np.isin(kinds, ["noise", "blank", "damaged", "unseen_shape", "unseen_colour"])
    assert out["groups"]["image"]["auroc"] == auroc(table["image_loglik"][image], table["image_loglik"][clean])
    assert "unseen_pairing" not in out["kinds"] and len(out["kinds"]) == 8
    assert out["normal"] == clean.sum()


def test_demo_command_line_help():
    out = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--workdir" in out.stdout


def test_demo_command_names_every_group_and_kind_below_target(monkeypatch, capsys):
    import pipeline.demo.run
    from pipeline.cli import main

    seen = {}

    def fake_run_demo(cfg):
        seen["cfg"] = cfg
        return {"groups": {"image": {"auroc": 0.96}, "caption": {"auroc": 0.949}, "mismatch": {"auroc": None}},
                "kinds": {"damaged": {"auroc": 0.93}, "noise": {"auroc": 1.0}},
                "local": {"unseen_pairing": {"n": 60, **{t: {"global": {"auroc": 0.7}, "local": {"auroc": a}}
                                                         for t, a in (("image", 0.95), ("text", 0.899))}}}}

    monkeypatch.setattr(pipeline.demo.run, "run_demo", fake_run_demo)
    monkeypatch.setattr(pipeline.demo.run, "report", lambda summary: "report")
    assert main(["demo", "--workdir", "somewhere", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-2:] == ['note: AUROC below 0.95 for {"caption": 0.949, "damaged": 0.93}',
                                     'note: local AUROC below 0.9 for {"unseen_pairing/text": 0.899}']
    cfg = seen["cfg"]   # the default sizes: 4000 reference and 2000 target samples, the demo's clusters
    assert (cfg.reference_shards * cfg.reference_per_shard, cfg.target_shards * cfg.target_per_shard) == (4000, 2000)
    assert cfg.clusters == CLUSTERS == DemoConfig().clusters
    assert main(["demo", "--workdir", "somewhere", "--clusters", "8"]) == 0 and seen["cfg"].clusters == 8
    assert main(["demo", "--workdir", "somewhere", "--clusters", "0"]) == 2
    assert main(["demo", "--workdir", "somewhere", "--reference-samples", "100", "--clusters", "51"]) == 2
    assert "--clusters must be between 1 and half the reference samples (50); got 51" in capsys.readouterr().err
