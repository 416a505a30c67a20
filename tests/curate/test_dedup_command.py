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


def test_filter_dedup_composes_with_a_fraction(corpus, tmp_path, capsys):
    root, _, _ = corpus
    assert _dedup(root, tmp_path / "d", "--clusters", "kmeans", "--cluster-rows", "1000") == 0
    dedup = read_dedup(tmp_path / "d")
    assert main(["filter", "--scores", str(root / "scores"), "--dedup", str(tmp_path / "d"), "--keep-fraction",
                 "clip_score=0.5", "--output", str(tmp_path / "f"), "--executor", "local"]) == 0
    report = json.loads((tmp_path / "f" / "filter.json").read_text())
    representatives = int(dedup["kept"].sum())
    assert representatives == 650 and report["eligible"] == 650 and report["kept"] == 325
    assert report["dedup"]["removed_duplicates"] == 100 and report["dedup"]["eps"] == EPS
    kept = pq.read_table(sorted((tmp_path / "f" / "kept").glob("*.parquet"))).to_pandas()
    assert set(kept["key"]) <= set(dedup.loc[dedup["kept"], "key"])
    scores = pq.read_table(sorted((root / "scores").glob("*.parquet"))).to_pandas()
    best = scores[dedup["kept"].to_numpy()].nlargest(325, "clip_score")
    assert sorted(kept["key"]) == sorted(best["key"])
    capsys.readouterr()
    other = tmp_path / "other"
    other.mkdir()
    (other / ".wclip").mkdir()
    assert main(["filter", "--scores", str(root / "scores"), "--dedup", str(other), "--keep-fraction",
                 "clip_score=0.5", "--output", str(tmp_path / "g"), "--executor", "local"]) == 2
    assert "is not a `wclip dedup` folder" in capsys.readouterr().err


def test_balance_splits_the_fraction_into_quotas_by_size_to_the_alpha(corpus, tmp_path, capsys):
    from pipeline.curate.select import quotas

    root, _, _ = corpus
    stats = tmp_path / "stats4.safetensors"
    assert main(["fit", "--embeddings", str(root / "emb"), "--output", str(stats), "--clusters", "4",
                 "--executor", "local"]) == 0
    assert main(["score", "--embeddings", str(root / "emb"), "--stats", str(stats), "--output",
                 str(tmp_path / "scores"), "--executor", "local", "--no-progress"]) == 0
    assert main(["dedup", "--scores", str(tmp_path / "scores"), "--output", str(tmp_path / "d"), "--embeddings",
                 str(root / "emb"), "--executor", "local", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["clusters_source"] == "image_cluster" and summary["clusters"] == 4
    assert main(["filter", "--scores", str(tmp_path / "scores"), "--dedup", str(tmp_path / "d"), "--balance",
                 "image_cluster", "--keep-fraction", "clip_score=0.4", "--output", str(tmp_path / "f"),
                 "--executor", "local"]) == 0
    scores = pq.read_table(sorted((tmp_path / "scores").glob("*.parquet"))).to_pandas()
    dedup = read_dedup(tmp_path / "d")
    eligible = scores[dedup["kept"].to_numpy()]
    sizes = eligible.groupby("image_cluster").size().to_dict()
    want = quotas(sizes, int(np.ceil(0.4 * len(eligible))), 0.5)
    kept = pq.read_table(sorted((tmp_path / "f" / "kept").glob("*.parquet"))).to_pandas()
    assert kept.groupby("image_cluster").size().to_dict() == {c: q for c, q in want.items() if q}
    for c, q in want.items():  # each cluster keeps its best q rows
        best = eligible[eligible["image_cluster"] == c].nlargest(q, "clip_score")["key"]
        assert sorted(kept.loc[kept["image_cluster"] == c, "key"]) == sorted(best)
    balance = json.loads((tmp_path / "f" / "filter.json").read_text())["conditions"][0]["balance"]
    assert balance["column"] == "image_cluster" and balance["groups"]["0"]["quota"] == want[0]
    assert sum(balance["kept"].values()) == len(kept)
    capsys.readouterr()
    assert main(["filter", "--scores", str(tmp_path / "scores"), "--balance", "image_cluster", "--min",
                 "clip_score=0", "--output", str(tmp_path / "g")]) == 2
    assert "give one (e.g. --keep-fraction clip_score=0.5)" in capsys.readouterr().err
    # the card: the duplicates section and each cluster's quota and kept share
    assert main(["card", "--scores", str(tmp_path / "scores"), "--stats", str(stats), "--filter",
                 str(tmp_path / "f"), "--output", str(tmp_path / "card")]) == 0
    card = json.loads((tmp_path / "card" / "card.json").read_text())
    d = card["duplicates"]["dedup"]
    assert d["eps"] == EPS and d["removed"] == summary["removed"] and d["groups"] == summary["groups"]
    assert len(d["example"]) == 2 and sum(m["kept"] for m in d["example"]) == 1
    readme = (tmp_path / "card" / "README.md").read_text()
    assert "## Duplicates and balance" in readme and f"{summary['removed']:,} rows" in readme
    shown = [int(line.split("|")[1]) for line in readme.split("| group size | groups |")[1].split("\n\n")[0]
             .splitlines()[2:]]
    assert shown == sorted(int(k) for k in d["group_sizes"]) and len(shown) >= 1  # numeric order, every size
    assert (tmp_path / "card" / card["duplicates"]["plot"]).exists()
    assert f"| 0 | {sizes[0]} | {want[0]} | {want[0]} |" in readme
