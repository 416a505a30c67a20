"""`wclip dedup` end to end on real Parquet and real clip-retrieval folders: groups against the all-pairs oracle
(within clusters exact, cross-cluster misses counted), the rule, resume, refusals, both executors."""

import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from dedupkit import oracle_pairs, planted

from pipeline.cli import main

EPS = 0.05
COSINES = [0.94, 0.949, 0.951, 0.96, 0.99, 1.0]


def write_folder(folder, X, rows_per_file=250):
    """A clip-retrieval folder of ``X`` (float32, L2-normalised) as image embeddings, random text embeddings,
    keys ``k00000`` ... in row order."""
    rng = np.random.default_rng(7)
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    units = X / np.linalg.norm(X, axis=1, keepdims=True)
    for n, s in enumerate(range(0, len(X), rows_per_file)):
        img = units[s:s + rows_per_file].astype(np.float32)
        txt = rng.standard_normal(img.shape).astype(np.float32)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        for sub, arr in (("img_emb/img_emb", img), ("text_emb/text_emb", txt)):
            buf = io.BytesIO()
            np.save(buf, arr)
            (folder / f"{sub}_{n}.npy").write_bytes(buf.getbuffer())
        pd.DataFrame({"image_path": [f"k{i:05d}" for i in range(s, s + len(img))],
                      "caption": [f"caption {i}" for i in range(s, s + len(img))]}).to_parquet(
            folder / "metadata" / f"metadata_{n}.parquet")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """750 rows (600 random + 150 planted copies at cosines around 0.95), fitted and scored."""
    root = tmp_path_factory.mktemp("dedup")
    X, plants = planted(600, 32, COSINES * 25, seed=3)
    emb = write_folder(root / "emb", X)
    assert main(["fit", "--embeddings", str(emb), "--output", str(root / "stats.safetensors"),
                 "--executor", "local"]) == 0
    assert main(["score", "--embeddings", str(emb), "--stats", str(root / "stats.safetensors"),
                 "--output", str(root / "scores"), "--executor", "local", "--no-progress"]) == 0
    return root, X, plants


def read_dedup(folder):
    files = sorted(folder.glob("*.parquet"))
    return pq.read_table(files).to_pandas() if files else None


def _dedup(root, out, *extra):
    return main(["dedup", "--scores", str(root / "scores"), "--output", str(out), "--embeddings", str(root / "emb"),
                 "--eps", str(EPS), "--executor", "local", "--no-progress", *extra])


def test_groups_against_the_oracle_within_clusters_and_misses_across(corpus, tmp_path, capsys):
    root, X, plants = corpus
    assert _dedup(root, tmp_path / "d", "--clusters", "kmeans", "--cluster-rows", "150") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = read_dedup(tmp_path / "d")
    assert len(rows) == 750 and rows["key"].tolist() == [f"k{i:05d}" for i in range(750)]
    assert summary["clusters"] == 5 and summary["compared"] == 750 and summary["failed"] == []
    oracle = oracle_pairs(X, EPS)
    assert len(oracle) == 100  # 4 of the 6 planted cosines are >= 0.95, 25 times
    cluster = rows["cluster"].to_numpy()
    within = {(i, j) for i, j in oracle if cluster[i] == cluster[j]}
    across = oracle - within
    group = rows["dup_group"].to_numpy()
    found = {(i, j) for i in range(750) for j in range(i + 1, 750) if group[i] == group[j]}
    assert found == within  # every within-cluster pair found, none beyond the threshold
    assert summary["pairs"] == len(within) and summary["groups"] == len(within)
    print(f"cross-cluster misses: {len(across)} of {len(oracle)} oracle pairs")  # SemDeDup's approximation
    assert len(across) <= 10
    assert summary["removed"] == len(within) == int((~rows["kept"]).sum())
    assert (rows["dup_size"] == 2).sum() == 2 * len(within)


def test_rule_keeps_the_best_clip_score_ties_by_key(corpus, tmp_path):
    root, X, _ = corpus
    assert _dedup(root, tmp_path / "d", "--clusters", "kmeans", "--cluster-rows", "1000") == 0
    rows = read_dedup(tmp_path / "d")
    scores = pq.read_table(sorted((root / "scores").glob("*.parquet"))).to_pandas()
    rows["clip_score"] = scores["clip_score"].to_numpy()
    for _, members in rows[rows["dup_size"] > 1].groupby("dup_group"):
        best = members.sort_values(["clip_score", "key"], ascending=[False, True]).index[0]
        assert members["kept"].tolist() == [i == best for i in members.index]
        assert (members["dup_group"] == best).all()  # the group is named by its kept row's position


def test_same_on_ray_and_resume_and_refusals(corpus, tmp_path, ray_local, capsys):
    root, _, _ = corpus
    assert _dedup(root, tmp_path / "a", "--clusters", "kmeans", "--cluster-rows", "150") == 0
    args = ["dedup", "--scores", str(root / "scores"), "--output", str(tmp_path / "b"), "--embeddings",
            str(root / "emb"), "--eps", str(EPS), "--executor", "ray", "--no-progress", "--clusters", "kmeans",
            "--cluster-rows", "150"]
    assert main(args) == 0
    assert read_dedup(tmp_path / "a").equals(read_dedup(tmp_path / "b"))
    capsys.readouterr()
    victim = sorted((tmp_path / "a").glob("*.parquet"))[1]
    victim.unlink()
    assert _dedup(root, tmp_path / "a", "--clusters", "kmeans", "--cluster-rows", "150") == 0
    assert read_dedup(tmp_path / "a").equals(read_dedup(tmp_path / "b"))
    capsys.readouterr()
    assert _dedup(root, tmp_path / "a", "--clusters", "kmeans", "--cluster-rows", "150", "--eps", "0.1") == 2
    err = capsys.readouterr().err
    assert "holds a dedup made otherwise (eps 0.05 -> 0.1)" in err and len(err.strip().splitlines()) == 1
    assert _dedup(root, tmp_path / "c", "--keep", "caption:highest") == 2
    assert "'caption' is not a score column" in capsys.readouterr().err
    assert _dedup(root, tmp_path / "c", "--clusters", "scores") == 2
    assert "the scores have no image_cluster column" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
