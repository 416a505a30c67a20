"""CPU cost of feeding a GPU: wclip's reader-side image work per core, on web-sized JPEGs. Not a test: run it
by hand and read the table.

    .venv/bin/python bench/bench_decode.py                  # 300 JPEGs of 300-800 px, ViT-B/32's 224-px transform
    .venv/bin/python bench/bench_decode.py --images 600 --processes 2

On a GPU node with ``--decode cpu`` every image is decoded, resized and cropped on a CPU core (the reader
tasks); the GPU only gets uint8 pixels. This measures that work per image on one core, exactly as a reader
task does it (``pipeline.flow.decode.prepare_sample`` with the model's ``Preprocessor``), with the JPEG
DCT-domain downscaling on (the default) and off (``--no-jpeg-draft``), then how many cores keep a GPU that
encodes 10,000 images/s busy. ``--processes N`` runs N copies at once to show how the rate holds when
several cores work (memory bandwidth, shared caches).

The images: photographic-like content (smooth random fields, edges and noise), 300-800 px per side,
JPEG quality 90, the sizes LAION's img2dataset downloads before resizing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from multiprocessing import get_context

import numpy as np

TARGET = 10_000  # images/s a GPU encodes (ViT-B/32 on an H100-class GPU, bf16)


def make_jpegs(n: int, seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(300, 801, size=2))
        field = rng.normal(size=(6, 6, 3))
        small = Image.fromarray(((field - field.min()) / np.ptp(field) * 255).astype(np.uint8))
        base = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float32)
        yy, xx = np.mgrid[0:h, 0:w]
        edges = ((xx // int(rng.integers(20, 80)) + yy // int(rng.integers(20, 80))) % 2)[:, :, None] * 40.0
        pixels = np.clip(base + edges + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def per_image_ms(jpegs: list, draft: bool, repeat: int) -> float:
    """Milliseconds per image of wclip's reader-side image work on one core (best of ``repeat`` passes)."""
    import open_clip
    import torch

    from pipeline.config import InputConfig
    from pipeline.flow.decode import prepare_sample
    from pipeline.flow.preprocess import Preprocessor
    from pipeline.flow.read import RawSample

    torch.set_num_threads(1)
    pre = Preprocessor(open_clip.image_transform(224, is_train=False))
    cfg = InputConfig(jpeg_draft=draft)
    samples = [RawSample(key=f"{i:09d}", index=i, members={"jpg": d, "txt": b"a photo"}) for i, d in enumerate(jpegs)]
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for s in samples:
            prepared = prepare_sample(s, "bench", cfg, pre)
            assert prepared.pixels is not None and prepared.pixels.shape == (3, 224, 224), prepared.problems
        best = min(best, time.perf_counter() - started)
    return 1000 * best / len(samples)


def _worker(args):
    jpegs, draft, repeat = args
    return per_image_ms(jpegs, draft, repeat)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--repeat", type=int, default=3, help="passes over the images; the best is kept")
    p.add_argument("--processes", type=int, default=1, help="copies running at once, one per core")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jpegs = make_jpegs(args.images)
    sizes = [len(d) for d in jpegs]
    results = {}
    for draft in (True, False):
        if args.processes == 1:
            ms = [per_image_ms(jpegs, draft, args.repeat)]
        else:
            with get_context("spawn").Pool(args.processes) as pool:
                ms = pool.map(_worker, [(jpegs, draft, args.repeat)] * args.processes)
        per_core = 1000 / statistics.mean(ms)
        results["draft" if draft else "no_draft"] = {"ms_per_image": ms, "images_per_s_per_core": per_core,
                                                     "cores_for_10k": TARGET / per_core}
    print(json.dumps({"images": args.images, "jpeg_kb_median": statistics.median(sizes) / 1024,
                      "processes": args.processes, "load_before": os.getloadavg(), "results": results}, indent=1))
    print(f"\n{args.images} JPEGs of 300-800 px (median {statistics.median(sizes) / 1024:.0f} kB) -> 224 px, "
          f"{args.processes} process(es) at once, {os.cpu_count()} CPUs")
    print("| JPEG draft | ms per image per core | images/s per core | cores to feed 10,000 images/s |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {'on (default)' if name == 'draft' else 'off (--no-jpeg-draft)'} | "
              f"{statistics.mean(r['ms_per_image']):.2f} | {r['images_per_s_per_core']:.0f} | "
              f"{r['cores_for_10k']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
