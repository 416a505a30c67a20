"""CPU benchmark of `wclip score` (issue #3): throughput against a bare single-process loop, and peak
memory for a small vs a large number of shards. Not a test: run it by hand and read the table.

    .venv/bin/python bench/bench_cpu_pipeline.py                # defaults: 16 shards x 128 images, 8 vs 64 shards
    .venv/bin/python bench/bench_cpu_pipeline.py --model wclip-demo

Both sides read the same tar shards (384x384 JPEGs with captions), decode, preprocess, encode both
towers with the same model and whiten. Throughput is reported as a ratio from one run, side by side;
memory as the peak summed PSS (proportional set size, so shared pages are not double-counted) of the
`wclip score` process and all its descendants (Ray's processes included).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from pathlib import Path

import benchkit
import numpy as np
from benchkit import ROOT


def make_shards(folder: Path, shards: int, per_shard: int, size: int, seed: int = 0) -> list:
    """Photo-like JPEGs (smooth colour fields, shapes, noise) with captions, img2dataset layout."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        paths.append(str(path))
        if path.exists():
            continue
        rng = np.random.default_rng([seed, s])
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                yy, xx = np.mgrid[0:size, 0:size] / size
                base = np.stack([np.sin(xx * rng.uniform(1, 6) + c) * 0.5 + 0.5 for c in rng.uniform(0, 6, 3)], -1)
                arr = (base * 200 + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(arr)
                draw = ImageDraw.Draw(img)
                for _ in range(3):
                    x, y, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(10, size // 4))]
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.integers(0, 255, 3).tolist()))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"a picture {key} with circles".encode()),
                                  ("json", json.dumps({"uid": f"{s * per_shard + i:032x}"}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return paths


def bare_loop(urls, model_name: str, stats_path: str, batch: int = 256) -> tuple:
    """The straightforward single-process loop: read -> decode -> preprocess -> encode -> whiten."""
    import torch
    from PIL import Image

    import pipeline
    from pipeline.whitening import StatsFile

    model, preprocess, tokenizer = pipeline.load_clip(model_name, random_init=model_name != "wclip-demo")
    stats = StatsFile.load(stats_path)
    n = 0
    start = time.perf_counter()

    def flush(images, captions):
        with torch.inference_mode():
            img = model.encode_image(torch.stack(images)).double().numpy()
            txt = model.encode_text(tokenizer(captions)).double().numpy()
        stats.towers["image"].loglik(img)
        stats.towers["text"].loglik(txt)

    for url in urls:
        images, captions, members = [], [], {}
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
        for name in sorted(k for k in members if k.endswith(".jpg")):
            key = name[:-4]
            images.append(preprocess(Image.open(io.BytesIO(members[name])).convert("RGB")))
            captions.append(members[key + ".txt"].decode())
            n += 1
            if len(images) == batch:
                flush(images, captions)
                images, captions = [], []
        if images:
            flush(images, captions)
    return n, time.perf_counter() - start


def run_score(urls, stats_path: str, output: Path, model_name: str, extra=()) -> dict:
    """`wclip score` as a user runs it; returns its JSON summary plus wall time and peak PSS."""
    args = [*benchkit.WCLIP, "score", "--input", *urls, "--stats", stats_path,
            "--output", str(output), "--no-progress", "--overwrite", *extra]
    if model_name != "wclip-demo":
        args += ["--random-init"]
    return benchkit.run_summary(args, "wclip score", env=benchkit.command_env(None, PYTHONUNBUFFERED="1"),
                                interval=0.25)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="wclip-tiny", help="wclip-tiny (random weights) or wclip-demo")
    ap.add_argument("--shards", type=int, default=16, help="shards for the throughput comparison")
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--memory-shards", type=int, nargs=2, default=(8, 64))
    ap.add_argument("--workdir", default=str(ROOT / ".bench"))
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)

    from pipeline.models import ModelSpec, model_identity
    from pipeline.whitening import StatsFile, WhiteningStats

    work = Path(args.workdir)
    n_mem = max(args.memory_shards)
    urls = make_shards(work / "shards", max(args.shards, n_mem), args.per_shard, args.image_size)
    # Stats with the right identity and dimension; values do not matter for speed.
    import pipeline
    model, _, _ = pipeline.load_clip(args.model, random_init=args.model != "wclip-demo")
    d = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else 64
    rng = np.random.default_rng(0)
    towers = {t: WhiteningStats.fit(rng.normal(size=(4 * d + 100, d)), components=d, holdout=0.2) for t in ("image", "text")}
    spec = ModelSpec(args.model, random_init=args.model != "wclip-demo")
    stats_path = str(work / f"stats-{args.model}.safetensors")
    StatsFile(towers, {"model_identity": model_identity(spec), "normalize": False}).save(stats_path)

    cores = os.cpu_count()
    print(f"machine: {cores} CPU cores; model {args.model}; {args.shards} shards x {args.per_shard} "
          f"{args.image_size}px JPEGs", flush=True)
    n_bare, t_bare = bare_loop(urls[:args.shards], args.model, stats_path)
    pipe = run_score(urls[:args.shards], stats_path, work / "scores", args.model)
    n_pipe = pipe["rows"]
    assert n_pipe == n_bare == args.shards * args.per_shard, (n_pipe, n_bare)
    mem = {k: run_score(urls[:k], stats_path, work / f"scores-{k}", args.model) for k in args.memory_shards}
    results = {
        "cores": cores, "model": args.model, "samples": n_bare,
        "bare_samples_per_s": n_bare / t_bare,
        "pipeline_samples_per_s_steady": pipe["samples_per_s"],
        "pipeline_samples_per_s_wall": n_pipe / pipe["wall_s"],
        "ratio_steady": pipe["samples_per_s"] / (n_bare / t_bare),
        "ratio_wall_incl_ray_start": (n_pipe / pipe["wall_s"]) / (n_bare / t_bare),
        "peak_pss_mb": {str(k): round(v["peak_pss_mb"], 1) for k, v in mem.items()},
    }
    a, b = args.memory_shards
    results["memory_ratio"] = mem[b]["peak_pss_mb"] / mem[a]["peak_pss_mb"]
    print("\n| measure | value |\n|---|---|")
    print(f"| bare loop (1 process) | {results['bare_samples_per_s']:.1f} samples/s |")
    print(f"| wclip score, steady (excl. Ray start) | {results['pipeline_samples_per_s_steady']:.1f} samples/s |")
    print(f"| wclip score, wall (incl. Ray start) | {results['pipeline_samples_per_s_wall']:.1f} samples/s |")
    print(f"| ratio steady / wall | {results['ratio_steady']:.2f}x / {results['ratio_wall_incl_ray_start']:.2f}x |")
    print(f"| peak PSS {a} shards / {b} shards | {mem[a]['peak_pss_mb']:.0f} MB / {mem[b]['peak_pss_mb']:.0f} MB "
          f"(x{results['memory_ratio']:.2f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
