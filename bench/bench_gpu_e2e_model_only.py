#!/usr/bin/env python
"""Image-tower throughput of open_clip models (random weights) and the scoring kernel's share.

Model only: random input tensors already on the GPU, no decoding, no data loading. For each
model (``open_clip.create_model(name, pretrained=None)``, image tower only, bf16 autocast,
channels_last) and batch size it reports images/s of the image tower (CUDA events, median
of repeats) and the time of scoring that batch's embeddings with the fused kernel and with
the unfused GEMM path, as a fraction of the encoder time. Prints a table, writes JSON.
Needs a CUDA GPU (CuPy optional: without it only the GEMM path is timed); ``--cpu-smoke``
only checks the script's logic on the CPU.

    python bench/bench_gpu_e2e_model_only.py --json bench_e2e.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from bench_kernel import environment, random_whitening, require_gpu, run_and_report, summarize, time_ms

from pipeline.whitening.kernels.torch_backend import GemmWhitener


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    p.add_argument("--batch", type=int, nargs="+", default=[256, 512, 768, 1024])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="autocast dtype of the image tower (fp32: no autocast)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, default=Path("bench_e2e_model_only.json"))
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check the script on the CPU (meaningless timings)")
    return p.parse_args(argv)


def image_tower(name: str, device: torch.device, channels_last: bool):
    """open_clip's image tower with random weights, in eval mode on ``device``."""
    try:
        import open_clip
    except ImportError:
        sys.exit("this benchmark needs open_clip: pip install open_clip_torch")
    model = open_clip.create_model(name, pretrained=None)
    visual = model.visual.to(device).eval()
    del model
    if channels_last:
        visual = visual.to(memory_format=torch.channels_last)
    size = visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return visual, size


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def flops_per_image(visual, size, device) -> float | None:
    """FLOPs of one image through the tower, counted by torch's FlopCounterMode.

    Counted in train mode: in eval mode nn.MultiheadAttention takes a fused fast path whose
    projections the counter does not see.
    """
    try:
        from torch.utils.flop_counter import FlopCounterMode
        x = torch.randn(1, 3, *size, device=device)
        visual.train()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            visual(x)
        return float(counter.get_total_flops())
    except Exception:
        return None
    finally:
        visual.eval()


def scorers(dim: int, device: torch.device) -> dict:
    mean, W = random_whitening(dim, dim)
    out = {"gemm": GemmWhitener(mean, W, device).score}
    if device.type == "cuda":
        try:
            from pipeline.whitening.kernels.cupy_backend import FusedWhitener
            out["fused"] = FusedWhitener(mean, W, device).score
        except ImportError as exc:
            print(f"fused kernel skipped: {exc}")
    return out


def run(args) -> dict:
    device = require_gpu(args, need_cupy=False)
    channels_last = not args.no_channels_last
    results = []
    for name in args.models:
        visual, size = image_tower(name, device, channels_last)
        fpi = flops_per_image(visual, size, device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with torch.inference_mode():
            dim = visual(torch.randn(1, 3, *size, device=device)).shape[-1]
        score = scorers(dim, device)
        for B in args.batch:
            row = {"model": name, "batch": B, "image_size": list(size), "embed_dim": dim,
                   "precision": args.precision, "channels_last": channels_last,
                   "flops_per_image": fpi}
            try:
                x = torch.randn(B, 3, *size, device=device).contiguous(memory_format=fmt)

                def encode():
                    with torch.inference_mode(), autocast(device, args.precision):
                        return visual(x)  # noqa: F821 (bound in the loop, deleted after it)

                enc = summarize(time_ms(encode, device, args.warmup, args.repeats))
                feats = encode()
                row.update(encoder=enc, images_per_s=B / (enc["median_ms"] * 1e-3))
                if fpi:
                    row["encoder_tflops"] = fpi * B / (enc["median_ms"] * 1e-3) / 1e12
                for sname, fn in score.items():
                    with torch.inference_mode():
                        t = summarize(time_ms(lambda: fn(feats), device, args.warmup, args.repeats))  # noqa: F821
                    row[sname] = t
                    row[f"{sname}_fraction_of_encoder"] = t["median_ms"] / enc["median_ms"]
                del x, feats
            except torch.cuda.OutOfMemoryError as exc:
                row["error"] = f"out of memory: {exc}".splitlines()[0]
                torch.cuda.empty_cache()
            results.append(row)
        del visual
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"mode": "cpu-smoke" if device.type != "cuda" else "gpu",
            "environment": environment(device),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": results}


def print_table(report: dict) -> None:
    head = f"{'model':>10} {'B':>5} {'enc ms':>9} {'images/s':>10} {'fused ms':>9} {'fused %':>8} " \
           f"{'gemm ms':>9} {'gemm %':>7}"
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        if "error" in r:
            print(f"{r['model']:>10} {r['batch']:>5} {r['error']}")
            continue

        def cell(key, width):
            return (f"{r[key]['median_ms']:>{width}.4f}", f"{100 * r[key + '_fraction_of_encoder']:>{width - 1}.3f}") \
                if key in r else (f"{'-':>{width}}", f"{'-':>{width - 1}}")

        f_ms, f_pct = cell("fused", 9)
        g_ms, g_pct = cell("gemm", 9)
        print(f"{r['model']:>10} {r['batch']:>5} {r['encoder']['median_ms']:>9.3f} "
              f"{r['images_per_s']:>10.1f} {f_ms} {f_pct:>8} {g_ms} {g_pct:>7}")


def main(argv=None) -> int:
    return run_and_report(parse_args, run, print_table, argv)


if __name__ == "__main__":
    sys.exit(main())
