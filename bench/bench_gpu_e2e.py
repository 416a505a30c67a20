#!/usr/bin/env python
"""End-to-end `wclip score` images/s per GPU from tar shards (issue #5), next to the image tower
alone on the same model, batch and precision (bench_gpu_e2e_model_only.py).

Runs `wclip score --random-init --model NAME --device cuda --decode D` over generated shards of 256x256
JPEGs (img2dataset's usual size) for each model and each JPEG decode place D (`cpu`: PIL in the reader
tasks; `gpu`: torchvision/nvJPEG in the encoder actor), and reports the steady rate from the job summary
(Ray start and model load excluded) and the wall rate. Needs a CUDA GPU; exits with a message otherwise.

    python bench/bench_gpu_e2e.py --models ViT-B-32 ViT-L-14 --decode cpu,gpu --shards 64 --per-shard 1000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_cpu_pipeline import make_shards, run_score
from benchkit import ROOT


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--decode", default="cpu,gpu", help="JPEG decode places to compare, comma-separated")
    ap.add_argument("--workdir", default=str(ROOT / ".bench-gpu"))
    ap.add_argument("--json", type=Path, default=Path("bench_gpu_e2e.json"))
    args = ap.parse_args(argv)
    decodes = [d.strip() for d in args.decode.split(",") if d.strip()]
    if not decodes or set(decodes) - {"cpu", "gpu"}:
        ap.error(f"--decode: a comma-separated list of cpu and gpu, got {args.decode!r}")

    import numpy as np
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu_e2e: no CUDA GPU here; nothing measured.", file=sys.stderr)
        return 2
    import pipeline
    from pipeline.models import ModelSpec, model_identity
    from pipeline.whitening import StatsFile, WhiteningStats

    work = Path(args.workdir)
    urls = make_shards(work / "shards", args.shards, args.per_shard, args.image_size)
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "models": {}}
    for name in args.models:
        model, _, _ = pipeline.load_clip(name, random_init=True)
        d = int(model.text_projection.shape[1])
        del model
        rng = np.random.default_rng(0)
        towers = {t: WhiteningStats.fit(rng.normal(size=(4 * d + 100, d)), components=d, holdout=0.2)
                  for t in ("image", "text")}
        stats = str(work / f"stats-{name}.safetensors")
        StatsFile(towers, {"model_identity": model_identity(ModelSpec(name, random_init=True)),
                           "normalize": False}).save(stats)
        results["models"][name] = {}
        for decode in decodes:
            summary = run_score(urls, stats, work / f"scores-{name}-{decode}", name,
                                extra=["--device", "cuda", "--batch-size", str(args.batch_size),
                                       "--precision", args.precision, "--chunk-size", str(args.batch_size),
                                       "--decode", decode])
            results["models"][name][decode] = {
                "rows": summary["rows"], "status_counts": summary.get("status_counts"),
                "steady_images_per_s": summary["samples_per_s"],
                "wall_images_per_s": summary["rows"] / summary["wall_s"], "peak_pss_mb": summary["peak_pss_mb"]}
            print(f"{name} --decode {decode}: {summary['samples_per_s']} images/s steady, "
                  f"{summary['rows'] / summary['wall_s']:.0f} wall ({summary['rows']} rows, "
                  f"{summary.get('status_counts')})", flush=True)
    args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
