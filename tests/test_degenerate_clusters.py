"""Issue #26 (5) through the command line: a reference of 20 distinct rows repeated, ``wclip fit --clusters 64``,
``wclip score`` and ``wclip filter --keep-fraction image_local_pvalue=0.5`` on precomputed embeddings. Before,
44 of the 64 clusters had no held-out row, 98-99% of the scored rows got a NaN local p-value beside status ok,
and the filter kept 12 of 2,000 rows (the fraction was taken over the few rows with a value)."""

import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.cli import main
from pipeline.whitening import StatsFile

D = 24


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _folder(folder, img, txt):
    """One clip-retrieval file (np.save'd float16 embeddings, metadata by pandas)."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for sub, arr in (("img_emb/img_emb", img), ("text_emb/text_emb", txt)):
        buf = io.BytesIO()
        np.save(buf, arr)
        (folder / f"{sub}_0.npy").write_bytes(buf.getbuffer())
    n = len(img)
    pd.DataFrame({"image_path": [f"{i:06d}" for i in range(n)], "caption": [f"caption {i}" for i in range(n)],
                  "url": [f"http://example.com/{i}.jpg" for i in range(n)]}
                 ).to_parquet(folder / "metadata" / "metadata_0.parquet")
    return folder


def test_twenty_distinct_reference_rows_and_64_clusters_end_to_end(tmp_path, capsys, caplog):
    rng = np.random.default_rng(0)
    img_base, txt_base = rng.standard_normal((20, D)) + 2.0, rng.standard_normal((20, D)) - 1.0
    pick = np.arange(2000) % 20
    ref = _folder(tmp_path / "ref", _unit(img_base[pick]), _unit(txt_base[pick]))
    near = rng.integers(20, size=2000)
    corpus = _folder(tmp_path / "corpus", _unit(img_base[near] + 0.2 * rng.standard_normal((2000, D))),
                     _unit(txt_base[near] + 0.2 * rng.standard_normal((2000, D))))
    stats = tmp_path / "stats.safetensors"
    assert main(["fit", "--embeddings", str(ref), "--output", str(stats), "--components", "8", "--shrinkage", "0.1",
                 "--holdout", "0.2", "--clusters", "64", "--executor", "local", "--no-progress"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "image: asked for 64 clusters, fitted 20: the reference sample has only 20 distinct direction(s), and " \
           "a cluster of copies of one row cannot be calibrated" in warned
    fitted = StatsFile.load(stats)
    assert fitted.metadata["clusters"] == 64 and [ws.clusters.k for ws in fitted.towers.values()] == [20, 20]
    scores = tmp_path / "scores"
    assert main(["score", "--embeddings", str(corpus), "--stats", str(stats), "--output", str(scores),
                 "--executor", "local", "--no-progress"]) == 0
    table = pq.read_table(scores / "metadata_0.parquet")
    ok = np.array(table["status"].to_pylist()) == "ok"
    assert ok.sum() == 2000
    for tower in ("image", "text"):
        p = table[f"{tower}_local_pvalue"].to_numpy(zero_copy_only=False)
        assert np.isfinite(p[ok]).all(), f"{np.isnan(p[ok]).sum()} NaN {tower} local p-values"
    capsys.readouterr()
    assert main(["filter", "--scores", str(scores), "--output", str(tmp_path / "kept"), "--keep-fraction",
                 "image_local_pvalue=0.5", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    p = table["image_local_pvalue"].to_numpy(zero_copy_only=False)
    threshold = np.sort(p)[::-1][999]            # the 1,000th highest of the 2,000: ties with it are kept
    assert report["conditions"][0]["ranked"] == 2000 and report["conditions"][0]["rank"] == 1000
    assert report["kept"] == int(np.sum(p >= threshold))
    assert 1000 <= report["kept"] <= 1200, report["kept"]
