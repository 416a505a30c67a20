"""`wclip demo` end to end on a smaller world: real Ray, the shipped model, real AUROCs."""

import json
import subprocess
import sys

import pytest

from pipeline.demo import MODEL
from pipeline.demo.metrics import FIT
from pipeline.demo.run import DemoConfig, report, run_demo
from pipeline.models import builtin_weights
from pipeline.whitening import StatsFile

pytestmark = pytest.mark.skipif(not builtin_weights(MODEL).is_file(), reason="the demo weights are not built")


@pytest.fixture(scope="module")
def summary(tmp_path_factory, ray_local):
    work = tmp_path_factory.mktemp("demo")
    return run_demo(DemoConfig(workdir=str(work), reference_shards=2, reference_per_shard=400,
                               target_shards=1, target_per_shard=500, anomaly_rate=0.4, progress=False))


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
                "kinds": {"damaged": {"auroc": 0.93}, "noise": {"auroc": 1.0}}}

    monkeypatch.setattr(pipeline.demo.run, "run_demo", fake_run_demo)
    monkeypatch.setattr(pipeline.demo.run, "report", lambda summary: "report")
    assert main(["demo", "--workdir", "somewhere", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == 'note: AUROC below 0.95 for {"caption": 0.949, "damaged": 0.93}'
    cfg = seen["cfg"]   # the default sizes: 4000 reference and 2000 target samples
    assert (cfg.reference_shards * cfg.reference_per_shard, cfg.target_shards * cfg.target_per_shard) == (4000, 2000)
