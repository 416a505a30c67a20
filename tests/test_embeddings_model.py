"""Fit on images, score released embeddings of the same model (``--embeddings-model``): the built-in wclip-demo
model fits real tar shards and saves the target shards' embeddings in clip-retrieval's layout; scoring those
embeddings with the tar fit gives the tar scores, and every other model, weights, normalisation or width is
refused in one line before anything is written."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from shardkit import clean_shards

from pipeline.cli import main
from pipeline.models import DeclaredModel, ModelSpec, declare, file_sha256, model_identity
from pipeline.scores.layout import SAVED_STAMP, embeddings_folder, run_path
from pipeline.scores.provenance import read_provenance
from pipeline.whitening import StatsFile

COLUMNS = ("image_sqnorm", "image_loglik", "image_pvalue", "text_sqnorm", "text_loglik", "text_pvalue", "clip_score")
SHARDS = ("00000", "00001")
RUN = ["--executor", "local", "--no-progress"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A wclip-demo fit on two reference shards, and two other shards scored with their embeddings saved."""
    root = tmp_path_factory.mktemp("coco")
    reference = clean_shards(root / "reference", 2, 24)
    targets = clean_shards(root / "targets", 2, 24, start=1000)
    stats = str(root / "stats.safetensors")
    assert main(["fit", "--input", *reference, "--model", "wclip-demo", "--output", stats, "--components", "8",
                 *RUN]) == 0
    tars = root / "tar-scores"
    assert main(["score", "--input", *targets, "--stats", stats, "--output", str(tars), "--save-embeddings",
                 *RUN]) == 0
    released = root / "released"  # the same embeddings as a clip-retrieval folder of unknown origin (no wclip.json)
    shutil.copytree(embeddings_folder(tars), released, ignore=shutil.ignore_patterns(SAVED_STAMP))
    return root, stats, tars, released


def _score(embeddings, stats, out, *extra) -> int:
    return main(["score", "--embeddings", str(embeddings), "--stats", str(stats), "--output", str(out), *extra, *RUN])


def test_a_tar_fit_scores_the_embeddings_of_its_model_as_it_scores_the_tars(demo, tmp_path):
    _, stats, tars, embeddings = demo
    out = tmp_path / "scores"
    assert _score(embeddings, stats, out, "--embeddings-model", "wclip-demo") == 0
    for name in SHARDS:
        want, got = pq.read_table(tars / f"{name}.parquet"), pq.read_table(out / f"metadata_{name}.parquet")
        assert got.num_rows == want.num_rows == 24
        for column in ("key", "index", "url", "uid", "caption", "status"):
            assert got[column].to_pylist() == want[column].to_pylist(), column
        for column in COLUMNS:
            np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=2e-6, atol=1e-6,
                                       err_msg=column)
    identity = model_identity(ModelSpec("wclip-demo"))
    made = {**identity, "source": "embeddings:clip-retrieval"}
    assert json.loads(open(run_path(out)).read())["model"] == made
    provenance = read_provenance(out / "metadata_00000.parquet")
    assert provenance["model"] == made and provenance["embeddings_model"] == "wclip-demo"
    assert provenance["stats_digest"] == file_sha256(stats) and provenance["normalize"] is False
    # the same model named as the stats record it resumes the folder: nothing is redone
    assert _score(embeddings, stats, out, "--embeddings-model", f"wclip-demo@{identity['weights']}") == 0
    assert read_provenance(out / "metadata_00000.parquet") == provenance


def _tar_keys(folder) -> list:
    """The sample keys of the tar shards in ``folder``, in order."""
    import tarfile

    keys = []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            keys.extend(dict.fromkeys(m.name.rsplit(".", 1)[0] for m in tar.getmembers()))
    return keys


def test_saved_embeddings_go_round_trip(demo, tmp_path, capsys, caplog):
    """``score --save-embeddings``, then ``score --embeddings`` on what it saved, with the stats that made them
    and no other flag: the tar scores again, in files named like the tar shards and naming them in ``shard``, so
    ``filter --input`` with the tars copies the kept samples; a folder of symbolic links to the files reads too."""
    root, stats, tars, _ = demo
    saved = Path(embeddings_folder(tars))
    out = tmp_path / "again"
    with caplog.at_level("INFO", logger="wclip"):
        assert _score(saved, stats, out) == 0
    assert "saved by `wclip score --save-embeddings` with model wclip-demo (builtin:sha256:" in caplog.text
    assert "read as --embeddings-model wclip-demo" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.parquet" for name in SHARDS]
    for name in SHARDS:
        want, got = pq.read_table(tars / f"{name}.parquet"), pq.read_table(out / f"{name}.parquet")
        assert got.num_rows == want.num_rows == 24
        for column in ("key", "index", "url", "uid", "caption", "status", "shard"):
            assert got[column].to_pylist() == want[column].to_pylist(), column
        for column in COLUMNS:
            np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=2e-6, atol=1e-6,
                                       err_msg=column)
    made = {**model_identity(ModelSpec("wclip-demo")), "source": "embeddings:clip-retrieval"}
    provenance = read_provenance(out / "00000.parquet")
    assert provenance["model"] == made and provenance["embeddings_model"] == "wclip-demo"

    capsys.readouterr()
    targets = sorted(str(p) for p in (root / "targets").glob("*.tar"))
    kept = tmp_path / "kept"
    assert main(["filter", "--scores", str(out), "--output", str(kept), "--keep-fraction", "image_loglik=0.25",
                 "--input", *targets, "--samples-per-shard", "100", "--executor", "local", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = pq.read_table(kept / "kept").sort_by([("shard", "ascending"), ("index", "ascending")])
    assert report["kept"] == rows.num_rows == 12
    assert (report["shards"]["inputs_matched"], report["shards"]["copied"]) == (2, 12)
    assert _tar_keys(kept / "shards") == rows["key"].to_pylist()

    links = tmp_path / "links"  # every file a symbolic link, as `ln -s` into another folder makes them
    for path in saved.rglob("*"):
        if path.is_file():
            (links / path.relative_to(saved)).parent.mkdir(parents=True, exist_ok=True)
            (links / path.relative_to(saved)).symlink_to(path)
    assert _score(links, stats, tmp_path / "linked") == 0
    for name in SHARDS:
        a, b = pq.read_table(out / f"{name}.parquet"), pq.read_table(tmp_path / "linked" / f"{name}.parquet")
        assert a.replace_schema_metadata().equals(b.replace_schema_metadata()), name


def _restat(stats, path, **metadata) -> str:
    """A copy of the stats file whose metadata says other things (another model, the other normalisation)."""
    fitted = StatsFile.load(stats)
    StatsFile(towers=fitted.towers, metadata={**fitted.metadata, **metadata}).save(path)
    return str(path)


def _copy_embeddings(embeddings, folder, change):
    shutil.copytree(embeddings, folder)
    for path in folder.glob("*_emb/*.npy"):
        np.save(path, change(np.load(path)))
    return folder


def _refused(capsys, argv_result: int, expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert argv_result == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("wclip score: error: ") and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    return lines[0]


SHA = "0" * 64


@pytest.mark.parametrize("declared, expected", [
    (None, "say so with --embeddings-model wclip-demo;"),
    ("ViT-B-32/openai", "but --embeddings-model says ViT-B-32 (pretrained:openai) made these embeddings: score "
                        "embeddings of the fit's model (--embeddings-model wclip-demo)"),
    (f"wclip-demo@builtin:sha256:{SHA}", f"says wclip-demo (builtin:sha256:{SHA}) made these"),
    ("wclip-demo@STATS", "says wclip-demo (checkpoint:sha256:"),
    ("ViT-L-14", "--embeddings-model 'ViT-L-14' names no weights; the forms: ARCH/TAG"),
    ("wclip-demo@no/such/file.pt", "neither a local weights file nor weights as a stats file records them"),
])
def test_another_model_or_none_declared_is_refused(demo, tmp_path, capsys, declared, expected):
    _, stats, _, embeddings = demo
    out = tmp_path / "scores"
    extra = [] if declared is None else ["--embeddings-model", declared.replace("STATS", stats)]
    line = _refused(capsys, _score(embeddings, stats, out, *extra), expected)
    if "says" in expected:
        weights = model_identity(ModelSpec("wclip-demo"))["weights"]
        assert line.startswith(f"wclip score: error: model mismatch: the stats were fitted with model wclip-demo "
                               f"({weights}), but --embeddings-model says ")
    assert not out.exists()


def test_the_other_normalisation_or_width_is_refused(demo, tmp_path, capsys):
    root, stats, _, embeddings = demo
    unit = _copy_embeddings(embeddings, tmp_path / "unit", lambda a: a / np.linalg.norm(a, axis=1, keepdims=True))
    out = tmp_path / "scores"
    _refused(capsys, _score(unit, stats, out, "--embeddings-model", "wclip-demo"),
             "the stats were fitted on raw vectors, but these image embeddings are L2-normalised: refit on the "
             "images with --normalize, as these are")
    normalized = _restat(stats, tmp_path / "normalized.safetensors", normalize=True)
    _refused(capsys, _score(embeddings, normalized, out, "--embeddings-model", "wclip-demo"),
             "fitted on L2-normalised vectors, but these image embeddings are raw: refit on the images with --raw")
    narrow = _copy_embeddings(embeddings, tmp_path / "narrow", lambda a: np.ascontiguousarray(a[:, :32]))
    _refused(capsys, _score(narrow, stats, out, "--embeddings-model", "wclip-demo"),
             "the image embeddings are 32-d but the stats were fitted on 64-d ones: wclip-demo did not make them")
    assert _score(unit, normalized, out, "--embeddings-model", "wclip-demo", "--dry-run") == 0  # both normalised
    assert not out.exists()


def test_every_identity_form_wclip_records(demo, tmp_path, capsys):
    """ARCH/TAG, hf-hub:org/name (cached or not), a checkpoint (file or sha256), a stats file's MODEL@WEIGHTS:
    accepted for a fit of that identity (a dry run: the checks run, nothing is written), refused for another."""
    _, stats, _, embeddings = demo
    out = tmp_path / "scores"
    checkpoint = tmp_path / "weights.safetensors"
    checkpoint.write_bytes(b"weights")
    sha = file_sha256(checkpoint)
    cases = [
        ({"model": "ViT-L-14", "weights": "pretrained:openai"},
         ["ViT-L-14/openai", "ViT-L-14@pretrained:openai"],
         {"ViT-L-14/laion2b_s32b_b82k": "(--embeddings-model ViT-L-14/openai)",
          "ViT-B-32/openai": "with model ViT-L-14 (pretrained:openai), but --embeddings-model says ViT-B-32"}),
        ({"model": "hf-hub:org/clip", "weights": f"hf-hub:sha256:{SHA}"},
         ["hf-hub:org/clip", f"hf-hub:org/clip@hf-hub:sha256:{SHA}"],
         {"hf-hub:org/other": "(--embeddings-model hf-hub:org/clip)",
          f"hf-hub:org/clip@hf-hub:sha256:{'1' * 64}": f"says hf-hub:org/clip (hf-hub:sha256:{'1' * 64})"}),
        ({"model": "wclip-tiny", "weights": f"checkpoint:sha256:{sha}"},
         [f"wclip-tiny@checkpoint:sha256:{sha}", f"wclip-tiny@{checkpoint}"],
         {f"wclip-tiny@{stats}": f"(--embeddings-model wclip-tiny@checkpoint:sha256:{sha})",
          f"ViT-B-32@{checkpoint}": "ViT-B-32 (checkpoint:sha256:"}),
        ({"model": "wclip-tiny", "weights": "random-init:seed=3"},
         ["wclip-tiny@random-init:seed=3"],
         {"wclip-tiny@random-init:seed=4": "(--embeddings-model wclip-tiny@random-init:seed=3)"}),
    ]
    for n, (identity, accepted, refused) in enumerate(cases):
        fitted = _restat(stats, tmp_path / f"{n}.safetensors", model_identity=identity, model=identity["model"])
        assert declare(identity) == accepted[0]
        for text in accepted:
            # an empty cache: hf-hub:org/clip's weights are not here, so any weights of the repository match
            assert _score(embeddings, fitted, out, "--embeddings-model", text, "--cache-dir", str(tmp_path),
                          "--dry-run") == 0, (text, capsys.readouterr().err)
            assert json.loads(capsys.readouterr().out.splitlines()[-1])["to_do"] == len(SHARDS)
            assert DeclaredModel.parse(text, cache_dir=str(tmp_path)).matches(identity)
        for text, expected in refused.items():
            _refused(capsys, _score(embeddings, fitted, out, "--embeddings-model", text, "--cache-dir",
                                    str(tmp_path)), expected)
    assert not out.exists()


def test_fit_on_embeddings_records_the_declared_model(demo, tmp_path, capsys):
    root, tar_stats, _, embeddings = demo
    stats = tmp_path / "emb.safetensors"
    assert main(["fit", "--embeddings", str(embeddings), "--embeddings-model", "wclip-demo", "--output", str(stats),
                 "--components", "8", *RUN]) == 0
    meta = StatsFile.load(stats).metadata
    identity = model_identity(ModelSpec("wclip-demo"))
    assert meta["model_identity"] == identity and meta["model"] == "wclip-demo" and meta["pretrained"] is None
    assert meta["embeddings"]["model"] == "wclip-demo" and meta["normalize"] is False
    assert meta["embeddings"]["source"] == {"model": "embeddings:clip-retrieval", "weights": "precomputed"}
    capsys.readouterr()
    made = {**identity, "source": "embeddings:clip-retrieval"}
    for extra, out in (([], "plain"), (["--embeddings-model", "wclip-demo"], "declared")):
        assert _score(embeddings, stats, tmp_path / out, *extra) == 0
        assert json.loads(open(run_path(tmp_path / out)).read())["model"] == made
    capsys.readouterr()
    _refused(capsys, _score(embeddings, stats, tmp_path / "b32", "--embeddings-model", "ViT-B-32/openai"),
             "fitted with model wclip-demo (builtin:sha256:")
    # stats of embeddings whose model was not declared cannot vouch for one
    plain = tmp_path / "plain.safetensors"
    assert main(["fit", "--embeddings", str(embeddings), "--output", str(plain), "--components", "8", *RUN]) == 0
    capsys.readouterr()
    _refused(capsys, _score(embeddings, plain, tmp_path / "x", "--embeddings-model", "wclip-demo"),
             "vectors of a model not declared, so no model can be checked: drop --embeddings-model, or refit with "
             "`wclip fit --embeddings PATHS --embeddings-model wclip-demo`")
    # an hf-hub repository whose weights are not cached here: the fit cannot say which weights made them
    uncached = tmp_path / "hub.safetensors"
    assert main(["fit", "--embeddings", str(embeddings), "--embeddings-model", "hf-hub:org/clip", "--cache-dir",
                 str(tmp_path), "--output", str(uncached), *RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert "so the fit cannot record which they are: name them as hf-hub:org/clip@hf-hub:sha256:HEX" in err
    assert len(err.splitlines()) == 1 and not uncached.exists()
    # --embeddings-model belongs to --embeddings
    tars = sorted(str(p) for p in (root / "targets").glob("*.tar"))
    assert main(["score", "--input", *tars, "--stats", tar_stats, "--output", str(tmp_path / "y"),
                 "--embeddings-model", "wclip-demo", *RUN]) == 2
    assert "with --input the model is --model" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("b32", "x", "y"))


def test_a_declared_fit_scores_that_model_from_another_source(demo, tmp_path, capsys):
    """Fit on DataComp-style shards of the model (its l14 arrays), score a clip-retrieval folder of it."""
    import pandas as pd

    _, _, tars, embeddings = demo
    pool = tmp_path / "pool"
    pool.mkdir()
    for name in SHARDS:
        img, txt = np.load(embeddings / "img_emb" / f"img_emb_{name}.npy"), np.load(
            embeddings / "text_emb" / f"text_emb_{name}.npy")
        np.savez(pool / f"{name}.npz", l14_img=img, l14_txt=txt, b32_img=img[:, :16], b32_txt=txt[:, :16])
        scores = pq.read_table(tars / f"{name}.parquet")
        pd.DataFrame({"uid": scores["uid"].to_pylist(), "text": scores["caption"].to_pylist()}).to_parquet(
            pool / f"{name}.parquet")
    stats = tmp_path / "pool.safetensors"
    assert main(["fit", "--embeddings", str(pool), "--embedding-key", "l14", "--embeddings-model", "wclip-demo",
                 "--output", str(stats), "--components", "8", *RUN]) == 0
    capsys.readouterr()
    _refused(capsys, _score(embeddings, stats, tmp_path / "a"),
             "embedding kind mismatch: the stats were fitted on embeddings:datacomp-l14 vectors, but these inputs are "
             "embeddings:clip-retrieval; fit stats on them with `wclip fit --embeddings`, or, if the fit's model made "
             "them, say so with --embeddings-model wclip-demo")
    assert _score(embeddings, stats, tmp_path / "b", "--embeddings-model", "wclip-demo") == 0
    assert pq.read_table(tmp_path / "b" / "metadata_00000.parquet")["status"].to_pylist() == ["ok"] * 24
    assert json.loads(open(run_path(tmp_path / "b")).read())["model"]["source"] == \
        "embeddings:clip-retrieval"
    capsys.readouterr()
    # DataComp inputs still take the fit's key, and their own errors are the ones shown
    _refused(capsys, _score(pool / "{00000,00000}.npz", stats, tmp_path / "c"), "two embedding files share")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_a_declared_embeddings_fit_scores_that_models_shards(demo, tmp_path, capsys):
    """The other way round: fit on released embeddings of a model, score shards with that model."""
    root, _, tars, embeddings = demo
    targets = sorted(str(p) for p in (root / "targets").glob("*.tar"))
    declared, plain = tmp_path / "declared.safetensors", tmp_path / "plain.safetensors"
    for path, extra in ((declared, ["--embeddings-model", "wclip-demo"]), (plain, [])):
        assert main(["fit", "--embeddings", str(embeddings), *extra, "--output", str(path), "--components", "8",
                     *RUN]) == 0
    out = tmp_path / "tars"
    assert main(["score", "--input", *targets, "--stats", str(declared), "--output", str(out), *RUN]) == 0
    emb_out = tmp_path / "emb"
    assert _score(embeddings, declared, emb_out) == 0
    for name in SHARDS:
        a, b = pq.read_table(out / f"{name}.parquet"), pq.read_table(emb_out / f"metadata_{name}.parquet")
        assert a["key"].to_pylist() == b["key"].to_pylist()
        for column in COLUMNS:  # a p-value may take the next step when a sqnorm sits on a held-out one
            step = 1.0 / 7 + 1e-6 if column.endswith("pvalue") else 1e-6  # 6 held-out rows
            np.testing.assert_allclose(a[column].to_numpy(zero_copy_only=False),
                                       b[column].to_numpy(zero_copy_only=False), rtol=2e-6, atol=step)
    capsys.readouterr()
    _refused(capsys, main(["score", "--input", *targets, "--stats", str(plain), "--output", str(tmp_path / "z"),
                           *RUN]), "the stats were fitted on precomputed embeddings (embeddings:clip-retrieval): "
                                   "score that kind of embeddings with `wclip score --embeddings PATHS`")
    assert not (tmp_path / "z").exists()
