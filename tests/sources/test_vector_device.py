"""``wclip score --embeddings`` through the tar path's backends (``whitening.kernels.blocks.BlockScorer``): NumPy
on the CPU by default, torch with ``--backend torch`` (on the CPU here) or ``--device cuda``; the same scores to
float32 rounding; a device that is not there, or a backend for the tar path, refused in one line."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from shardkit import clean_shards
from test_embeddings import write_clip_retrieval

from pipeline.cli import main
from pipeline.whitening import StatsFile

RUN = ["--executor", "local", "--no-progress"]
FILES = ("metadata_0.parquet", "metadata_1.parquet", "metadata_2.parquet")
SCORES = ("image_sqnorm", "image_loglik", "text_sqnorm", "text_loglik", "clip_score", "image_local_loglik",
          "text_local_loglik")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A fit with clusters on one clip-retrieval folder, another scored on the default path (NumPy, CPU)."""
    root = tmp_path_factory.mktemp("device")
    reference = write_clip_retrieval(root / "reference", rows=(400, 300), seed=0, nan_row=None)
    targets = write_clip_retrieval(root / "targets", seed=1)  # with a NaN row and an empty file
    stats = root / "stats.safetensors"
    assert main(["fit", "--embeddings", str(reference), "--output", str(stats), "--clusters", "3", *RUN]) == 0
    assert main(["score", "--embeddings", str(targets), "--stats", str(stats), "--output", str(root / "numpy"),
                 *RUN]) == 0
    return root, targets, stats


def _score(scored, out, *extra) -> int:
    _, targets, stats = scored
    return main(["score", "--embeddings", str(targets), "--stats", str(stats), "--output", str(out), *extra, *RUN])


def _same_to_float32_rounding(scored, folder) -> None:
    root, _, stats = scored
    heldout = min(len(ws.calibration) for ws in StatsFile.load(stats).towers.values())
    for name in FILES:
        want, got = pq.read_table(root / "numpy" / name), pq.read_table(folder / name)
        assert got.num_rows == want.num_rows and got.schema.names == want.schema.names
        for column in ("key", "shard", "index", "status", "error", "image_cluster", "text_cluster"):
            assert got[column].to_pylist() == want[column].to_pylist(), (name, column)
        for column in SCORES:
            np.testing.assert_allclose(got[column].to_numpy(zero_copy_only=False).astype(float),
                                       want[column].to_numpy(zero_copy_only=False).astype(float),
                                       rtol=1e-4, atol=1e-4, err_msg=f"{name} {column}")
        for column in ("image_pvalue", "text_pvalue"):  # a sqnorm on a held-out one may take the next step
            np.testing.assert_allclose(got[column].to_numpy(zero_copy_only=False).astype(float),
                                       want[column].to_numpy(zero_copy_only=False).astype(float),
                                       atol=1.0 / heldout + 1e-6, err_msg=f"{name} {column}")
    assert pq.read_table(folder / "metadata_1.parquet")["status"].to_pylist()[7] == "encode"


def test_the_default_is_the_numpy_backend_bit_for_bit(scored, tmp_path):
    root = scored[0]
    assert _score(scored, tmp_path / "numpy", "--device", "cpu", "--backend", "numpy") == 0
    for name in FILES:
        want, got = pq.read_table(root / "numpy" / name), pq.read_table(tmp_path / "numpy" / name)
        assert got.replace_schema_metadata().equals(want.replace_schema_metadata()), name


def test_the_torch_backend_on_the_cpu_gives_the_same_scores(scored, tmp_path):
    assert _score(scored, tmp_path / "torch", "--device", "cpu", "--backend", "torch") == 0
    _same_to_float32_rounding(scored, tmp_path / "torch")


def _refused(capsys, code: int, expected: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err == f"wclip score: error: {expected}", err


def test_a_device_or_backend_that_cannot_be_had_is_refused_in_one_line(scored, tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        _refused(capsys, _score(scored, tmp_path / "a", "--device", "cuda"),
                 "--device cuda: this machine has no usable CUDA GPU; use --device cpu (or auto), or --address to "
                 "run on a Ray cluster with GPU nodes")
    shard = clean_shards(tmp_path, 1, 2)[0]
    _refused(capsys, main(["score", "--input", shard, "--stats", str(scored[2]), "--output", str(tmp_path / "a"),
                           "--backend", "torch", *RUN]),
             "--backend torch applies to --embeddings; the encoders of --input pick theirs (the fused kernel on "
             "CUDA, else torch)")
    assert not (tmp_path / "a").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "gemm", "torch"])
def test_cuda_gives_the_same_scores(scored, tmp_path, backend):
    assert _score(scored, tmp_path / backend, "--device", "cuda", "--backend", backend) == 0
    _same_to_float32_rounding(scored, tmp_path / backend)
