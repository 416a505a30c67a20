"""`wclip demo` end to end on a smaller world: real Ray, the shipped model, real AUROCs."""

import json
import subprocess
import sys

import pytest

from pipeline.demo import DemoConfig, auroc, report, run_demo
from pipeline.models import DEMO_WEIGHTS

pytestmark = pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason="the demo weights are not built")


def test_auroc_is_mann_whitney():
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 1.0  # anomalies score lower: perfectly ranked
    assert auroc([5.0], [1.0]) == 0.0
    assert auroc([1.0, 2.0], [1.0, 2.0]) == 0.5


@pytest.fixture(scope="module")
def summary(tmp_path_factory, ray_local):
    work = tmp_path_factory.mktemp("demo")
    return run_demo(DemoConfig(workdir=str(work), reference_shards=2, reference_per_shard=400,
                               target_shards=1, target_per_shard=500, anomaly_rate=0.4, progress=False))


def test_small_demo_ranks_anomalies(summary):
    # The shipped model reaches the 0.9 on every kind but damaged images (~0.89: an image cut
    # off by flat filler on a coloured background looks much like a plain scene on a grey one).
    groups, kinds = summary["groups"], summary["kinds"]
    assert all(groups[g]["n"] > 20 for g in ("image", "caption", "mismatch"))
    for group in ("image", "caption", "mismatch"):
        assert groups[group]["auroc"] >= 0.9, groups
    for kind in ("noise", "blank", "unseen_shape", "unseen_colour", "gibberish", "ungrammatical", "mismatch"):
        assert kinds[kind]["auroc"] >= 0.9, (kind, kinds)
    assert kinds["damaged"]["auroc"] >= 0.85, kinds
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


def test_demo_command_line_help():
    out = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--workdir" in out.stdout
