#!/usr/bin/env python
"""Benchmark the fused whitening kernel against the unfused torch expressions on one GPU.

For every batch size B, embedding size d (m = d) and input dtype it times, with CUDA events
(warm-up, then the median of repeats):

* ``fused``          FusedWhitener.score (one CuPy kernel launch);
* ``torch_unfused``  ``((x - mu) @ W).square().sum(1)`` exactly as written;
* ``gemm``           GemmWhitener.score (fp32 GEMM + norm reduction), IEEE fp32;
* ``gemm_tf32``      the same with TF32 tensor cores (``--tf32``; not parity-grade),

checks each result against the float64 reference on the same inputs (relative error of
sqnorm <= 1e-5 passes) and names the fastest parity-passing method per shape. Prints a
table and writes JSON. Needs a CUDA GPU and CuPy; ``--cpu-smoke`` only checks the script's
logic on the CPU (torch paths, wall-clock timing) and its numbers mean nothing for GPUs.

    python bench/bench_kernel.py --json bench_kernel.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.whitening.kernels.torch_backend import GemmWhitener

PARITY_RTOL = 1e-5
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1024, 8192, 65536])
    p.add_argument("--dims", type=int, nargs="+", default=[512, 768, 1024], help="d (and m = d)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(_DTYPES))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--tf32", action="store_true", help="also time the GEMM with TF32")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, default=Path("bench_kernel.json"))
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check the script on the CPU (no fused kernel, meaningless timings)")
    return p.parse_args(argv)


def require_gpu(args, need_cupy: bool = True) -> torch.device:
    """The device to run on, or exit with a message saying what is missing."""
    if args.cpu_smoke:
        print("CPU SMOKE TEST: wall-clock CPU timings of the torch paths; not a GPU benchmark.")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit(f"{Path(sys.argv[0]).name} needs a CUDA GPU, and torch sees none "
                 "(torch.cuda.is_available() is False). Use --cpu-smoke to check the script only.")
    if need_cupy:
        try:
            import cupy  # noqa: F401
        except ImportError:
            sys.exit("the fused kernel needs CuPy: pip install 'wclip[gpu]'")
    return torch.device(args.device)


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "device": str(device)}
    if device.type != "cuda":
        env["note"] = "cpu smoke test: not a GPU measurement"
        return env
    props = torch.cuda.get_device_properties(device)
    env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
               memory_gib=round(props.total_memory / 2 ** 30, 1), sm_count=props.multi_processor_count)
    try:
        import cupy
        env["cupy"] = cupy.__version__
        drv = cupy.cuda.runtime.driverGetVersion()
        env["driver_cuda_api"] = f"{drv // 1000}.{drv % 1000 // 10}"
    except Exception as exc:  # CuPy missing or broken: record why
        env["cupy"] = f"unavailable ({exc})"
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except Exception:
        env["driver"] = None
    return env


def time_ms(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Per-call times in ms: CUDA events on a GPU, wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def summarize(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[-1],
            "repeats": len(times)}


def random_whitening(d: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A mean and a PCA-like whitening matrix (orthonormal directions, spread-out scales)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, m)))
    lam = np.logspace(0, -3, m)
    return rng.standard_normal(d) * 0.3, q / np.sqrt(lam)


@contextlib.contextmanager
def tf32_matmul(enabled: bool):
    """Temporarily switch torch's fp32 CUDA matmul precision (new-style API)."""
    m = torch.backends.cuda.matmul
    old = m.fp32_precision
    m.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        m.fp32_precision = old


def methods(mean, W, device, with_fused: bool, with_tf32: bool) -> dict:
    """Name -> callable(x) returning sqnorm, for every method under test."""
    mu_t = torch.as_tensor(mean, dtype=torch.float32, device=device)
    W_t = torch.as_tensor(W, dtype=torch.float32, device=device)
    gemm = GemmWhitener(mean, W, device)
    out = {}
    if with_fused:
        from pipeline.whitening.kernels.cupy_backend import FusedWhitener
        fused = FusedWhitener(mean, W, device)
        out["fused"] = lambda x: fused.score(x)[0]
    out["torch_unfused"] = lambda x: ((x - mu_t) @ W_t).square().sum(1)
    out["gemm"] = lambda x: gemm.score(x)[0]
    if with_tf32:
        def gemm_tf32(x):
            with tf32_matmul(True):
                return gemm.score(x)[0]
        out["gemm_tf32"] = gemm_tf32
    return out


def run(args) -> dict:
    device = require_gpu(args)
    on_gpu = device.type == "cuda"
    results = []
    for d in args.dims:
        mean, W = random_whitening(d, d)
        fns = methods(mean, W, device, with_fused=on_gpu, with_tf32=args.tf32 and on_gpu)
        mu64 = torch.as_tensor(mean, dtype=torch.float64, device=device)
        W64 = torch.as_tensor(W, dtype=torch.float64, device=device)
        for B in args.batch:
            for dname in args.dtypes:
                x = (torch.randn(B, d, device=device) * 0.5 + mu64.float()).to(_DTYPES[dname])
                ref = ((x.double() - mu64) @ W64).square().sum(1)  # float64, same input values
                for name, fn in fns.items():
                    ctx = tf32_matmul(False) if on_gpu and name != "gemm_tf32" else contextlib.nullcontext()
                    with ctx:
                        rel = float(((fn(x).double() - ref).abs() / ref).max())
                        row = summarize(time_ms(lambda: fn(x), device, args.warmup, args.repeats))  # noqa: F821
                    flops = 2.0 * B * d * d
                    nbytes = B * d * x.element_size() + d * d * 4 + 2 * B * 4
                    row.update(batch=B, d=d, m=d, dtype=dname, method=name, max_rel_err=rel,
                               parity_ok=rel <= PARITY_RTOL,
                               tflops=flops / (row["median_ms"] * 1e-3) / 1e12,
                               gbps=nbytes / (row["median_ms"] * 1e-3) / 1e9)
                    results.append(row)
                del x, ref
    return {"mode": "cpu-smoke" if not on_gpu else "gpu", "environment": environment(device),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "parity_rtol": PARITY_RTOL, "results": results, "fastest": fastest(results)}


def fastest(results: list[dict]) -> list[dict]:
    """Per (batch, d, dtype): the fastest method whose parity check passed."""
    best = {}
    for r in results:
        key = (r["batch"], r["d"], r["dtype"])
        if r["parity_ok"] and (key not in best or r["median_ms"] < best[key]["median_ms"]):
            best[key] = r
    return [{"batch": k[0], "d": k[1], "dtype": k[2], "method": v["method"],
             "median_ms": v["median_ms"]} for k, v in sorted(best.items())]


def print_table(report: dict) -> None:
    head = f"{'B':>6} {'d=m':>5} {'dtype':>5} {'method':>14} {'median ms':>10} {'p90 ms':>9} " \
           f"{'TFLOP/s':>8} {'GB/s':>8} {'max rel err':>11} parity"
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        print(f"{r['batch']:>6} {r['d']:>5} {r['dtype']:>5} {r['method']:>14} {r['median_ms']:>10.4f} "
              f"{r['p90_ms']:>9.4f} {r['tflops']:>8.2f} {r['gbps']:>8.1f} {r['max_rel_err']:>11.2e} "
              f"{'ok' if r['parity_ok'] else ('no (tf32)' if r['method'].endswith('tf32') else 'FAIL')}")
    print("\nfastest parity-passing method per shape:")
    for f in report["fastest"]:
        print(f"  B={f['batch']:>6} d=m={f['d']:>5} {f['dtype']:>5}: {f['method']} ({f['median_ms']:.4f} ms)")


def run_and_report(parse, run_fn, table, argv=None) -> int:
    """Parse arguments, run the benchmark, print its table and write its JSON report."""
    args = parse(argv)
    report = run_fn(args)
    table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")
    return 0


def main(argv=None) -> int:
    return run_and_report(parse_args, run, print_table, argv)


if __name__ == "__main__":
    sys.exit(main())
