"""Precomputed embeddings that do not fit together (issue #26, items 1, 2, 11): a batch without metadata, a
stray .npy, a later file of the other normalisation or another width, a DataComp shard without its arrays, a
declared model of another width, fit flags that cannot end in a stats file. Each is refused in one line before
any work, or fails as its own file (recorded, exit 1) while the others are scored; nothing is scored as ``ok``
against stats it does not fit, and no stats file is written from part of the input. Real .npy/.npz and Parquet,
on threads (``--executor local``)."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from shardkit import clean_shards, state
from test_embeddings import write_clip_retrieval, write_datacomp

from pipeline.cli import main
from pipeline.whitening import StatsFile

RUN = ["--executor", "local", "--no-progress", "--retries", "0"]
ROWS = (120, 90, 70)
SCALE = np.linspace(2.0, 6.0, 1000)  # row norms of the raw vectors


def _folder(path, d=24, seed=0):
    return write_clip_retrieval(path, rows=ROWS, d=d, seed=seed, nan_row=None)


def _change(folder, n, change, towers=("img_emb/img_emb", "text_emb/text_emb")):
    for sub in towers:
        path = folder / f"{sub}_{n}.npy"
        np.save(path, change(np.load(path)))


def _raw(a):
    """Rows of norms 2..6: not L2-normalised."""
    return (a.astype(np.float32) * SCALE[: len(a), None]).astype(np.float16)


def _unit(a):
    a = a.astype(np.float32)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float16)


def _fit(folder, stats, *extra) -> int:
    return main(["fit", "--embeddings", str(folder), "--output", str(stats), "--components", "8", *extra, *RUN])


def _score(folder, stats, out, *extra) -> int:
    return main(["score", "--embeddings", str(folder), "--stats", str(stats), "--output", str(out), *extra, *RUN])


def _refused(capsys, code: int, command: str, expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wclip {command}: error: ") and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    return lines[0]


def _summary(capsys) -> tuple:
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def _failures(out) -> dict:
    lines = (state(out) / "failures.jsonl").read_text().splitlines()
    return {r["name"]: r["error"] for r in map(json.loads, lines)}


def _scored(out) -> dict:
    return {p.stem: pq.read_table(p)["status"].to_pylist() for p in sorted(out.glob("*.parquet"))}


# -- item 1: every .npy is accounted for ------------------------------------------------------------------
def test_embeddings_without_metadata_fail_as_their_own_file(tmp_path, capsys):
    folder = _folder(tmp_path / "laion")
    stats = tmp_path / "stats.safetensors"
    assert _fit(folder, stats) == 0
    for sub in ("img_emb/img_emb", "text_emb/text_emb"):  # batch 3: embeddings, no metadata_3.parquet
        shutil.copy(folder / f"{sub}_0.npy", folder / f"{sub}_3.npy")
    shutil.copy(folder / "img_emb" / "img_emb_1.npy", folder / "img_emb" / "img_emb_10.npy")  # one tower only
    capsys.readouterr()
    out = tmp_path / "scores"
    assert _score(folder, stats, out) == 1
    summary, err = _summary(capsys)
    assert summary["rows"] == sum(ROWS) and summary["shards_done"] == 3 and len(summary["failed"]) == 2
    assert _scored(out) == {f"metadata_{n}": ["ok"] * rows for n, rows in enumerate(ROWS)}
    meta = folder / "metadata"
    assert _failures(out) == {
        "metadata_3": f"ValueError: {meta / 'metadata_3.parquet'} does not exist: img_emb_3.npy and "
                      f"text_emb_3.npy have no metadata (keys) beside them",
        "metadata_10": f"ValueError: {meta / 'metadata_10.parquet'} does not exist: img_emb_10.npy has no "
                       f"metadata (keys) beside it"}
    assert "FAILED shards (2)" in err and f"{meta / 'metadata_3.parquet'}: " in err
    # the fit reads them too: it fails, and writes no stats file from the other batches
    before = stats.read_bytes()
    assert _fit(folder, stats) == 1
    summary, err = _summary(capsys)
    assert sorted(f["shard"] for f in summary["failed"]) == [str(meta / "metadata_10.parquet"),
                                                            str(meta / "metadata_3.parquet")]
    assert summary["stats"] is None and summary["not_written"] == "2 of 5 embedding files failed"
    assert f"fit -> {stats} NOT WRITTEN (2 of 5 embedding files failed: mend or remove them and rerun)" in err
    assert stats.read_bytes() == before  # the earlier stats file stays as it was
    assert _fit(folder, tmp_path / "new.safetensors") == 1 and not (tmp_path / "new.safetensors").exists()


def test_a_stray_npy_is_refused_up_front(tmp_path, capsys):
    folder = _folder(tmp_path / "laion")
    stats = tmp_path / "stats.safetensors"
    assert _fit(folder, stats) == 0
    capsys.readouterr()
    shutil.copy(folder / "img_emb" / "img_emb_0.npy", folder / "img_emb" / "all.npy")
    shutil.copy(folder / "text_emb" / "text_emb_0.npy", folder / "text_emb" / "img_emb_0.npy")
    expected = (f"--embeddings {folder}: img_emb/all.npy, text_emb/img_emb_0.npy not named like clip-retrieval's "
                f"img_emb/img_emb_N.npy or text_emb/text_emb_N.npy, so no metadata_N.parquet names their rows: "
                f"move them out of the folder")
    _refused(capsys, _score(folder, stats, tmp_path / "scores"), "score", expected)
    _refused(capsys, _fit(folder, tmp_path / "new.safetensors"), "fit", expected)
    assert not (tmp_path / "scores").exists() and not (tmp_path / "new.safetensors").exists()


# -- item 2: every file is checked against the stats ------------------------------------------------------
@pytest.mark.parametrize("declared", [None, "wclip-tiny@random-init:seed=0"])
@pytest.mark.parametrize("fitted", ["raw", "unit"])
def test_a_later_file_of_the_other_normalisation_fails_alone(tmp_path, capsys, declared, fitted):
    folder = _folder(tmp_path / "laion", d=32)  # wclip-tiny's width
    if fitted == "raw":
        for n in range(len(ROWS)):
            _change(folder, n, _raw)
    declare = ["--embeddings-model", declared] if declared else []
    stats = tmp_path / "stats.safetensors"
    assert _fit(folder, stats, *declare) == 0
    assert StatsFile.load(stats).metadata["normalize"] is (fitted == "unit")
    _change(folder, 2, _unit if fitted == "raw" else _raw, towers=("text_emb/text_emb",))
    capsys.readouterr()
    out = tmp_path / "scores"
    assert _score(folder, stats, out, *declare) == 1
    summary, _ = _summary(capsys)
    assert summary["rows"] == ROWS[0] + ROWS[1] and summary["status_counts"] == {"ok": ROWS[0] + ROWS[1]}
    assert _scored(out) == {"metadata_0": ["ok"] * ROWS[0], "metadata_1": ["ok"] * ROWS[1]}
    has, stats_have = ("L2-normalised", "raw") if fitted == "raw" else ("raw", "L2-normalised")
    assert _failures(out) == {"metadata_2": f"ValueError: text_emb_2.npy: these text embeddings are {has}, but the "
                                            f"stats were fitted on {stats_have} vectors: a file of another kind "
                                            f"among the inputs (its rows are not scored)"}
    assert not (out / "metadata_2.parquet").exists() and not (state(out) / "shards" / "metadata_2.json").exists()


def test_a_later_file_of_another_width_fails_alone_in_score_and_fit(tmp_path, capsys):
    folder = _folder(tmp_path / "laion")
    stats = tmp_path / "stats.safetensors"
    assert _fit(folder, stats) == 0
    _change(folder, 1, lambda a: np.ascontiguousarray(a[:, :16]), towers=("img_emb/img_emb",))
    capsys.readouterr()
    out = tmp_path / "scores"
    assert _score(folder, stats, out) == 1
    summary, _ = _summary(capsys)
    assert summary["rows"] == ROWS[0] + ROWS[2] and sorted(_scored(out)) == ["metadata_0", "metadata_2"]
    assert _failures(out) == {"metadata_1": "ValueError: img_emb_1.npy holds 16-d image embeddings, but the stats "
                                            "were fitted on 24-d ones: a file of another model among the inputs"}
    assert _fit(folder, tmp_path / "new.safetensors") == 1
    summary, err = _summary(capsys)
    assert [f["error"] for f in summary["failed"]] == [
        "ValueError: img_emb_1.npy holds 16-d image embeddings, but img_emb_0.npy (the first file) holds 24-d ones: "
        "a file of another model among the inputs"]
    assert "new.safetensors NOT WRITTEN (1 of 3 embedding files failed" in err
    assert not (tmp_path / "new.safetensors").exists()


def test_a_fit_over_files_of_both_normalisations_writes_no_stats(tmp_path, capsys):
    folder = _folder(tmp_path / "laion")
    _change(folder, 1, _raw)
    stats = tmp_path / "stats.safetensors"
    assert _fit(folder, stats) == 1
    summary, err = _summary(capsys)
    first = folder / "metadata" / "metadata_0.parquet"
    assert summary["failed"] == [{"shard": str(folder / "metadata" / "metadata_1.parquet"),
                                  "error": f"its embeddings are raw, but those of {first} (the first file) are "
                                           f"L2-normalised: a file of another kind among the inputs"}]
    assert summary["shards_done"] == 3 and summary["not_written"] == "1 of 3 embedding files failed"
    assert not stats.exists()


# -- item 11: fits that cannot be right are refused, or write nothing ----------------------------------------
def test_a_datacomp_fit_with_a_shard_missing_its_arrays_writes_no_stats(tmp_path, capsys):
    pool = write_datacomp(tmp_path / "pool", shards=4, rows=30)
    arrays = dict(np.load(pool / "00000002.npz"))
    np.savez(pool / "00000002.npz", **{k: v for k, v in arrays.items() if not k.startswith("l14")})
    stats = tmp_path / "stats.safetensors"
    assert main(["fit", "--embeddings", str(pool), "--embedding-key", "l14", "--output", str(stats),
                 "--components", "4", *RUN]) == 1
    summary, err = _summary(capsys)
    assert summary["failed"] == [{"shard": str(pool / "00000002.npz"),
                                  "error": "ValueError: 00000002.npz has no array 'l14_img' (it has b32_img, b32_txt)"}]
    assert summary["shards_done"] == 3 and summary["stats"] is None and not stats.exists()
    assert f"fit -> {stats} NOT WRITTEN (1 of 4 embedding files failed" in err
    assert main(["fit", "--embeddings", str(pool), "--embedding-key", "b32", "--output", str(stats),
                 "--components", "4", *RUN]) == 0  # the other arrays are all there
    assert StatsFile.load(stats).metadata["n_reference"] == 120


def test_a_declared_model_of_another_width_is_refused(tmp_path, capsys):
    folder = _folder(tmp_path / "laion")  # 24-d
    stats = tmp_path / "stats.safetensors"
    _refused(capsys, _fit(folder, stats, "--embeddings-model", "ViT-B-32/openai"), "fit",
             "--embeddings-model ViT-B-32/openai: that model makes 512-d embeddings, but img_emb_0.npy holds 24-d "
             "image embeddings: name the model that made them, or leave --embeddings-model out")
    assert not stats.exists()
    wide = _folder(tmp_path / "tiny", d=32)  # wclip-tiny's width, but a later file is not
    _change(wide, 2, lambda a: np.ascontiguousarray(a[:, :24]))
    assert _fit(wide, stats, "--embeddings-model", "wclip-tiny@random-init:seed=0") == 1
    summary, _ = _summary(capsys)
    assert [f["error"] for f in summary["failed"]] == [
        "ValueError: img_emb_2.npy holds 24-d image embeddings, but --embeddings-model "
        "wclip-tiny@random-init:seed=0 makes 32-d ones: a file of another model among the inputs"]
    assert not stats.exists()


@pytest.mark.parametrize("flags, expected", [
    (["--components", "100000"], "--components 100000: the embeddings are 24-d, so at most 24 components can be "
                                 "kept: give --components 24 or fewer (or 'all')"),
    (["--holdout", "0"], "--holdout 0 holds no reference rows out, but --components auto chooses the components by "
                         "them: give --holdout > 0 (e.g. 0.1), or a fixed --components"),
    (["--holdout", "0", "--components", "8", "--clusters", "3"],
     "--holdout 0 holds no reference rows out, but --clusters 3 chooses its shrinkage by them: give --holdout > 0"),
    (["--clusters", "1000", "--components", "8"],
     "cannot make 1000 clusters of at most 280 reference rows (counted from the embedding files' headers): pass "
     "fewer --clusters or more reference rows"),
    (["--clusters", "100", "--components", "8", "--max-samples", "50"],
     "cannot make 100 clusters of at most 50 reference rows (--max-samples 50)"),
])
def test_an_embeddings_fit_that_cannot_end_in_stats_is_refused_before_reading(tmp_path, capsys, monkeypatch,
                                                                              flags, expected):
    from pipeline.runs import fit

    def no_work(*args, **kwargs):
        raise AssertionError("the fit started reading files")

    folder = _folder(tmp_path / "laion")
    monkeypatch.setattr(fit, "open_executor", no_work)
    stats = tmp_path / "stats.safetensors"
    _refused(capsys, main(["fit", "--embeddings", str(folder), "--output", str(stats), *flags, *RUN]), "fit", expected)
    assert not stats.exists()


@pytest.mark.parametrize("flags, expected", [
    (["--components", "100"], "--components 100: the embeddings are 32-d, so at most 32 components can be kept"),
    (["--holdout", "0"], "--holdout 0 holds no reference rows out, but --components auto chooses the components"),
    (["--components", "4", "--clusters", "20", "--max-samples", "10"],
     "cannot make 20 clusters of at most 10 reference rows (--max-samples 10)"),
])
def test_a_tar_fit_that_cannot_end_in_stats_is_refused_before_encoding(tmp_path, capsys, monkeypatch, flags,
                                                                       expected):
    from pipeline.runs import fit

    def no_work(*args, **kwargs):
        raise AssertionError("the fit started its shards")

    monkeypatch.setattr(fit, "open_executor", no_work)
    urls = clean_shards(tmp_path, shards=1, per_shard=4)
    stats = tmp_path / "stats.safetensors"
    _refused(capsys, main(["fit", "--input", *urls, "--model", "wclip-tiny", "--random-init", "--output", str(stats),
                           *flags, *RUN]), "fit", expected)
    assert not stats.exists()
