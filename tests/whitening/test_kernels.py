"""Tests of pipeline.whitening.kernels: the float64 oracle, the torch paths, the CUDA source and the GPU kernel.

Without a GPU the kernel is still checked three ways: NVRTC compiles it to PTX (syntax,
entry points), ptxas reports no register spills (when a CUDA toolkit is present), and a
C++ emulation runs the very same source on the CPU (indexing, tiling, cross-block sums).
"""

from __future__ import annotations

import ctypes
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import nvrtc_compile as nvrtc
import pytest
import torch
from scipy import stats

from pipeline.whitening.formulas import LOG_2PI
from pipeline.whitening.kernels import (
    GemmWhitener,
    MissingDependency,
    TorchWhitener,
    cupy_backend,
    make_whitener,
    reference_scores,
    reference_whiten,
    score_towers,
)
from pipeline.whitening.kernels.reference import (
    INPUT_ROUNDING,
    sqnorm_error_bound,
    sqnorm_error_sigma,
    whiten_error_bound,
)

ROOT = Path(__file__).resolve().parents[2]
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def problem(rows, d, m, seed=0, offset=1.0):
    """Rows from a Gaussian with an anisotropic covariance, and its PCA whitening (m kept)."""
    assert m <= d, "PCA keeps at most d components"
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d)) * np.logspace(0, -1.5, d)
    S = A @ A.T / d + 1e-3 * np.eye(d)
    lam, V = np.linalg.eigh(S)
    lam, V = lam[::-1], V[:, ::-1]
    mean = offset * rng.standard_normal(d) * math.sqrt(np.trace(S) / d)
    x = mean + rng.standard_normal((rows, d)) @ np.linalg.cholesky(S).T
    return x.astype(np.float32), mean, V[:, :m] / np.sqrt(lam[:m]), S, lam


def rel_err(got, ref):
    got = got.detach().cpu().double().numpy() if isinstance(got, torch.Tensor) else got
    return np.abs(got - ref) / np.abs(ref)


# --- the float64 oracle ---------------------------------------------------------------

def test_reference_is_the_mahalanobis_distance_and_the_gaussian_density():
    x, mean, W, S, lam = problem(50, 12, 12)
    sq, ll = reference_scores(x, mean, W)
    xc = x.astype(np.float64) - mean
    np.testing.assert_allclose(sq, np.einsum("ij,ij->i", xc, np.linalg.solve(S, xc.T).T), rtol=1e-9)
    log_det = -0.5 * np.log(lam).sum()
    np.testing.assert_allclose(ll + log_det, stats.multivariate_normal(mean, S).logpdf(x), rtol=1e-9)
    np.testing.assert_allclose(ll, -0.5 * (12 * LOG_2PI + sq), rtol=1e-12)
    assert reference_whiten(x, mean, W).shape == (50, 12)


def test_reference_rejects_mismatched_shapes():
    x, mean, W, _, _ = problem(4, 6, 3)
    with pytest.raises(ValueError, match="whitening must have shape"):
        reference_scores(x, mean, W[:5])
    with pytest.raises(ValueError, match=r"shape \(B, 6\)"):
        reference_scores(x[:, :5], mean, W)
    with pytest.raises(ValueError, match="finite"):
        reference_scores(x, np.full(6, np.nan), W)


# --- torch paths (CPU, run in CI) -------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_whitener_matches_reference(dtype):
    x, mean, W, _, _ = problem(300, 40, 25)
    x = x.astype(dtype)
    ref_sq, ref_ll = reference_scores(x, mean, W)
    sq, ll = TorchWhitener(mean, W).score(torch.from_numpy(x))
    assert sq.dtype == ll.dtype == torch.float32 and sq.shape == (300,)
    assert rel_err(sq, ref_sq).max() <= 1.2e-7   # float64 math, float32 output rounding
    assert rel_err(ll, ref_ll).max() <= 1.2e-7
    assert abs(float(sq.mean()) / 25 - 1) < 0.15  # rows really are whitened


def test_torch_whitener_strided_numpy_and_empty_inputs():
    x, mean, W, _, _ = problem(64, 20, 20)
    wide = torch.zeros(64, 27)
    wide[:, 3:23] = torch.from_numpy(x)
    strided = wide[:, 3:23]
    assert not strided.is_contiguous()
    wt = TorchWhitener(mean, W)
    ref_sq, _ = reference_scores(x, mean, W)
    assert rel_err(wt.score(strided)[0], ref_sq).max() <= 1.2e-7
    assert rel_err(wt.score(x)[0], ref_sq).max() <= 1.2e-7
    sq, ll, w = wt.score_and_whiten(strided)
    assert np.all(np.abs(w.numpy() - reference_whiten(x, mean, W)) <= whiten_error_bound(x, mean, W))
    assert torch.equal(wt.whiten(x), w)
    sq0, ll0 = wt.score(torch.zeros(0, 20))
    assert sq0.shape == ll0.shape == (0,)
    with pytest.raises(ValueError, match=r"shape \(B, 20\)"):
        wt.score(torch.zeros(3, 21))
    with pytest.raises(TypeError, match="float"):
        wt.score(torch.zeros(3, 20, dtype=torch.int32))


def test_gemm_whitener_fp32_parity_on_cpu():
    x, mean, W, _, _ = problem(500, 64, 48, offset=3.0)
    ref_sq, ref_ll = reference_scores(x, mean, W)
    sq, ll = GemmWhitener(mean, W).score(torch.from_numpy(x))
    assert rel_err(sq, ref_sq).max() <= 1e-5
    assert rel_err(ll, ref_ll).max() <= 1e-5


@pytest.mark.parametrize("fmt", sorted(HALF))
@pytest.mark.parametrize("d,m", [(64, 48), (256, 256)])
def test_half_precision_inputs_stay_within_the_documented_bounds(fmt, d, m):
    """Rounding x to bf16/fp16 is the only large error; check it against both bounds."""
    x, mean, W, _, _ = problem(2000, d, m, seed=1)
    xh = torch.from_numpy(x).to(HALF[fmt])
    sq = TorchWhitener(mean, W).score(xh)[0].double().numpy()
    # exact on the values it was given
    assert rel_err(sq, reference_scores(xh, mean, W)[0]).max() <= 1.2e-7
    err = sq - reference_scores(x, mean, W)[0]
    u, eta = INPUT_ROUNDING[fmt]
    bound = sqnorm_error_bound(x, mean, W, u, eta)
    sigma = sqnorm_error_sigma(x, mean, W, u)
    assert np.all(np.abs(err) <= bound)                   # worst case, always
    assert np.max(np.abs(err) / sigma) <= 6.0             # practical bound
    assert 0.4 <= np.sqrt(np.mean((err / sigma) ** 2)) <= 1.2   # the model has the right size
    assert np.median(np.abs(err) / sq) < {"float16": 5e-4, "bfloat16": 4e-3}[fmt]


def test_make_whitener_backends_and_missing_cupy(monkeypatch):
    x, mean, W, _, _ = problem(10, 8, 8)
    assert isinstance(make_whitener((mean, W), "cpu"), TorchWhitener)
    assert isinstance(make_whitener((mean, W), torch.device("cpu"), backend="gemm"), GemmWhitener)
    with pytest.raises(ValueError, match="backend must be one of"):
        make_whitener((mean, W), "cpu", backend="cuda")
    monkeypatch.setitem(sys.modules, "cupy", None)   # makes `import cupy` fail
    with pytest.raises(MissingDependency, match=re.escape("pip install 'wclip[gpu]'")):
        make_whitener((mean, W), "cuda", backend="fused")
    with pytest.raises(MissingDependency, match="cupy"):
        cupy_backend.FusedWhitener(mean, W)


def test_score_towers_scores_each_tower_with_its_own_whitener():
    xi, mi, Wi, _, _ = problem(30, 16, 16, seed=2)
    xt, mt, Wt, _, _ = problem(30, 8, 5, seed=3)
    out = score_towers({"image": (TorchWhitener(mi, Wi), torch.from_numpy(xi)),
                        "text": (TorchWhitener(mt, Wt), torch.from_numpy(xt))})
    assert rel_err(out["image"][0], reference_scores(xi, mi, Wi)[0]).max() <= 1.2e-7
    assert rel_err(out["text"][1], reference_scores(xt, mt, Wt)[1]).max() <= 1.2e-7


# --- the CUDA source without a GPU --------------------------------------------------------

def test_launch_geometry():
    assert cupy_backend.padded_shape(768, 768) == (768, 768)
    assert cupy_backend.padded_shape(33, 65) == (48, 128)
    assert cupy_backend.launch_grid(1, 1) == (1, 1)
    assert cupy_backend.launch_grid(65536, 768) == (1024, 12)
    assert cupy_backend.launch_grid(65, 129) == (2, 3)
    with pytest.raises(ValueError):
        cupy_backend.launch_grid(0, 4)
    assert cupy_backend.entry_name(torch.bfloat16, True) == "wclip_whiten_bf16"
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        cupy_backend.entry_name(torch.float64)


def test_source_constants_and_entries_match_the_python_side():
    src = cupy_backend.kernel_source()
    consts = dict(re.findall(r"constexpr int (\w+) = (\d+);", src))
    assert {k: int(consts[k]) for k in ("TILE_ROWS", "TILE_COLS", "TILE_K", "THREADS")} == \
        {"TILE_ROWS": cupy_backend.TILE_ROWS, "TILE_COLS": cupy_backend.TILE_COLS, "TILE_K": cupy_backend.TILE_K,
         "THREADS": cupy_backend.THREADS}
    assert cupy_backend.THREADS == (cupy_backend.TILE_ROWS // 4) * (cupy_backend.TILE_COLS // 4)
    assert set(re.findall(r"^WCLIP_ENTRY\((\w+),", src, re.M)) == set(cupy_backend.ENTRY_POINTS)
    assert "#include" not in src   # NVRTC must compile it without a toolkit


def _nvrtc_or_skip():
    try:
        return nvrtc.find_nvrtc()
    except nvrtc.NvrtcUnavailable as exc:
        pytest.skip(f"no NVRTC library importable: {exc}")


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_kernel_compiles_to_ptx_with_all_entry_points(arch):
    _nvrtc_or_skip()
    ptx = nvrtc.compile_to_ptx(cupy_backend.kernel_source(), arch, cupy_backend.COMPILE_OPTIONS, "whiten.cu")
    assert f".target sm_{arch.split('_')[1]}" in ptx
    assert sorted(nvrtc.ptx_entries(ptx)) == sorted(cupy_backend.ENTRY_POINTS)


def test_every_installed_nvrtc_compiles_the_kernel():
    """The cu12 wheel and torch's bundled cu13 NVRTC (when present) must both accept the source."""
    _nvrtc_or_skip()
    versions = {}
    for lib in nvrtc.candidate_libraries():
        try:
            version = nvrtc.nvrtc_version(lib)
        except nvrtc.NvrtcUnavailable:
            continue
        if version not in versions:
            ptx = nvrtc.compile_to_ptx(cupy_backend.kernel_source(), "compute_90", cupy_backend.COMPILE_OPTIONS,
                                       library=lib)
            versions[version] = sorted(nvrtc.ptx_entries(ptx))
    assert versions and all(v == sorted(cupy_backend.ENTRY_POINTS) for v in versions.values())


def test_broken_source_fails_with_the_compiler_log():
    _nvrtc_or_skip()
    broken = cupy_backend.kernel_source().replace("const int tid = threadIdx.x;",
                                           "const int tid = threadIdx.x + wclip_no_such_name;")
    with pytest.raises(nvrtc.NvrtcError, match="wclip_no_such_name") as info:
        nvrtc.compile_to_ptx(broken, "compute_90", cupy_backend.COMPILE_OPTIONS, "whiten.cu")
    assert "undefined" in info.value.log and "whiten.cu" in info.value.log
    with pytest.raises(ValueError, match="virtual architecture"):
        nvrtc.compile_to_ptx("", "sm_90")


def _ptxas():
    found = shutil.which("ptxas") or next(iter(sorted(Path("/usr/local").glob("cuda*/bin/ptxas"))), None)
    return str(found) if found else None


@pytest.mark.parametrize("sm", ["80", "90"])
def test_ptxas_reports_no_register_spills(sm, tmp_path):
    _nvrtc_or_skip()
    if _ptxas() is None:
        pytest.skip("ptxas (CUDA toolkit) not found; the PTX check above still ran")
    ptx = tmp_path / "whiten.ptx"
    ptx.write_text(nvrtc.compile_to_ptx(cupy_backend.kernel_source(), f"compute_{sm}", cupy_backend.COMPILE_OPTIONS))
    out = subprocess.run([_ptxas(), f"-arch=sm_{sm}", "-v", str(ptx), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(re.findall(r"0 bytes spill stores, 0 bytes spill loads", out.stderr)) == len(cupy_backend.ENTRY_POINTS)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", out.stderr)]
    assert len(regs) == len(cupy_backend.ENTRY_POINTS) and max(regs) <= 128   # >= 2 blocks per SM


# CPU emulation: one block at a time, one std::thread per CUDA thread.
_EMU_PRELUDE = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>
#define WCLIP_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
struct alignas(16) float4 { float x, y, z, w; };
static thread_local emu_dim3 threadIdx, blockIdx;
static emu_dim3 blockDim, gridDim;
static std::barrier<>* emu_block_barrier = nullptr;
static std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
static float emu_exchange[1024];
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    const unsigned t = threadIdx.x, warp = t / 32;
    emu_exchange[t] = v;
    emu_warp_barriers[warp]->arrive_and_wait();
    const float r = emu_exchange[warp * 32 + ((t % 32) ^ (unsigned)lane_mask)];
    emu_warp_barriers[warp]->arrive_and_wait();
    return r;
}
inline float wclip_bf16_to_f32(unsigned short b) { unsigned u = (unsigned)b << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline float wclip_f16_to_f32(unsigned short h) {
    const int e = (h >> 10) & 31, mant = h & 1023;
    const float mag = e == 0 ? std::ldexp((float)mant, -24)
                    : e == 31 ? (mant ? NAN : INFINITY) : std::ldexp((float)(mant | 1024), e - 25);
    return (h & 0x8000) ? -mag : mag;
}
"""
_EMU_LAUNCHER = r"""
template <typename F> static void emu_launch(unsigned gx, unsigned gy, unsigned seed, F body) {
    gridDim = {gx, gy, 1};
    blockDim = {(unsigned)THREADS, 1, 1};
    std::vector<emu_dim3> blocks;
    for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) blocks.push_back({x, y, 0});
    if (seed) std::shuffle(blocks.begin(), blocks.end(), std::mt19937(seed));
    for (const emu_dim3 b : blocks) {
        std::barrier<> bar(THREADS);
        emu_block_barrier = &bar;
        emu_warp_barriers.clear();
        for (int w = 0; w < THREADS / 32; ++w) emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < (unsigned)THREADS; ++t)
            threads.emplace_back([&, t] { threadIdx = {t, 0, 0}; blockIdx = b; body(); });
        for (auto& th : threads) th.join();
    }
}
#define EMU(NAME, T) extern "C" void emu_##NAME(unsigned gx, unsigned gy, unsigned seed, const T* x, \
    long long ldx, int rows, int d, const float* mean, const float* proj, int m_pad, int m, float c, \
    float* partial, unsigned* counters, float* sq, float* ll, float* w) { \
    emu_launch(gx, gy, seed, [=] { NAME(x, ldx, rows, d, mean, proj, m_pad, m, c, partial, counters, sq, ll, w); }); }
EMU(wclip_score_f32, float) EMU(wclip_score_f16, wclip_f16) EMU(wclip_score_bf16, wclip_bf16)
EMU(wclip_whiten_f32, float) EMU(wclip_whiten_f16, wclip_f16) EMU(wclip_whiten_bf16, wclip_bf16)
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CPU emulation of the kernel")
    tmp = tmp_path_factory.mktemp("emu")
    probe = tmp / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if subprocess.run([cxx, "-std=c++20", "-pthread", str(probe), "-o", str(tmp / "probe")],
                      capture_output=True).returncode != 0:
        pytest.skip(f"{cxx} lacks C++20 <barrier>")
    src = tmp / "emu.cpp"
    src.write_text(_EMU_PRELUDE + cupy_backend.kernel_source() + _EMU_LAUNCHER)
    out = subprocess.run([cxx, "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", "-w", str(src),
                          "-o", str(tmp / "emu.so")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return ctypes.CDLL(str(tmp / "emu.so"))


def emulate(lib, x: torch.Tensor, mean, W, write=False, seed=0):
    """Run one kernel entry on the CPU exactly as FusedWhitener would launch it."""
    rows, d = x.shape
    m = W.shape[1]
    d_pad, m_pad = cupy_backend.padded_shape(d, m)
    proj = np.zeros((d_pad, m_pad), np.float32)
    proj[:d, :m] = W
    mean_pad = np.zeros(d_pad, np.float32)
    mean_pad[:d] = mean
    gx, gy = cupy_backend.launch_grid(rows, m)
    xa = (x if x.dtype == torch.float32 else x.view(torch.int16)).numpy()
    guard = 32   # NaN sentinels after every output: must survive the launch
    partial = np.full(rows * gy + guard, np.nan, np.float32)
    counters = np.zeros(gx + guard, np.uint32)
    sq, ll = np.full(rows + guard, np.nan, np.float32), np.full(rows + guard, np.nan, np.float32)
    w = np.full(rows * m + guard, np.nan, np.float32)
    assert proj.ctypes.data % 16 == 0
    fn = getattr(lib, "emu_" + cupy_backend.entry_name(x.dtype, write))
    P = ctypes.c_void_p
    fn.argtypes = [ctypes.c_uint] * 3 + [P, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, P, P,
                                         ctypes.c_int, ctypes.c_int, ctypes.c_float] + [P] * 5
    fn(gx, gy, seed, xa.ctypes.data, x.stride(0), rows, d, mean_pad.ctypes.data, proj.ctypes.data,
       m_pad, m, 0.5 * m * LOG_2PI, partial.ctypes.data, counters.ctypes.data, sq.ctypes.data,
       ll.ctypes.data, w.ctypes.data)
    assert not counters.any(), "tile counters must be left zeroed"
    for buf, n in ((partial, rows * gy if gy > 1 else 0), (sq, rows), (ll, rows),
                   (w, rows * m if write else 0)):
        assert np.isnan(buf[n:]).all(), "a write outside the output"
    return sq[:rows], ll[:rows], (w[: rows * m].reshape(rows, m) if write else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,d,m,ld,grid", [(150, 100, 70, 100, (3, 2)), (70, 33, 30, 33, (2, 1)),
                                              (65, 140, 129, 147, (2, 3)), (1, 1, 1, 1, (1, 1))])
def test_emulated_kernel_matches_reference(emulator, dtype, rows, d, m, ld, grid):
    assert cupy_backend.launch_grid(rows, m) == grid     # partial tiles, one and several column tiles
    x, mean, W, _, _ = problem(rows, d, m, seed=rows + d, offset=2.0)
    buf = torch.full((rows, ld), float("nan"), dtype=dtype)   # NaN: reads past d would show
    buf[:, :d] = torch.from_numpy(x).to(dtype)
    xt = buf[:, :d]                               # row stride ld >= d
    ref_sq, ref_ll = reference_scores(xt, mean, W)  # on the values the kernel sees
    sq, ll, w = emulate(emulator, xt, mean, W, write=True)
    assert rel_err(sq, ref_sq).max() <= 1e-5 and rel_err(ll, ref_ll).max() <= 1e-5
    assert np.all(np.abs(w - reference_whiten(xt, mean, W)) <= whiten_error_bound(xt, mean, W))
    sq2, ll2, _ = emulate(emulator, xt, mean, W, write=False)
    assert np.array_equal(sq, sq2) and np.array_equal(ll, ll2)


def test_emulated_kernel_is_bitwise_reproducible_in_any_block_order(emulator):
    x, mean, W, _, _ = problem(200, 200, 200, seed=5)
    assert cupy_backend.launch_grid(200, 200) == (4, 4)
    xt = torch.from_numpy(x)
    first = emulate(emulator, xt, mean, W, seed=0)
    for seed in (1, 7):
        again = emulate(emulator, xt, mean, W, seed=seed)
        assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


# --- benchmarks' command lines (CPU) -----------------------------------------------------

def _bench(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("script", ["bench_kernel.py", "bench_gpu_e2e_model_only.py"])
def test_benchmarks_refuse_to_run_without_a_gpu(script):
    out = _bench(script)
    assert out.returncode != 0 and "needs a CUDA GPU" in out.stderr


def test_kernel_benchmark_cpu_smoke_run_writes_its_report(tmp_path):
    report = tmp_path / "k.json"
    out = _bench("bench_kernel.py", "--cpu-smoke", "--batch", "70", "--dims", "24",
                 "--dtypes", "fp32", "bf16", "--repeats", "2", "--warmup", "1", "--json", str(report))
    assert out.returncode == 0, out.stderr
    data = json.loads(report.read_text())
    assert data["mode"] == "cpu-smoke" and "not a GPU" in data["environment"]["note"]
    assert {r["method"] for r in data["results"]} == {"torch_unfused", "gemm"}
    assert all(r["parity_ok"] and r["max_rel_err"] < 1e-5 for r in data["results"])
    assert len(data["fastest"]) == 2 and "fastest parity-passing" in out.stdout


@pytest.mark.slow
def test_e2e_benchmark_cpu_smoke_run(tmp_path):
    report = tmp_path / "e.json"
    out = _bench("bench_gpu_e2e_model_only.py", "--cpu-smoke", "--models", "ViT-B-32", "--batch", "1",
                 "--repeats", "1", "--warmup", "0", "--precision", "fp32", "--json", str(report))
    assert out.returncode == 0, out.stderr
    row = json.loads(report.read_text())["results"][0]
    assert row["embed_dim"] == 512 and row["images_per_s"] > 0
    assert row["flops_per_image"] > 8e9            # ViT-B-32 at 224 px: ~8.7 GFLOP
    assert 0 < row["gemm_fraction_of_encoder"] < 1


# --- on a GPU ------------------------------------------------------------------------------

def _cuda_problem(rows, d, m, dtype=torch.float32, seed=0):
    x, mean, W, _, _ = problem(rows, d, m, seed=seed)
    return x, torch.from_numpy(x).to(device="cuda", dtype=dtype), mean, W


@pytest.mark.gpu
@pytest.mark.parametrize("rows,d,m", [(1, 16, 1), (100, 512, 512), (1000, 768, 768),
                                      (513, 768, 256), (4096, 1024, 1024), (3, 80, 70)])
def test_fused_fp32_parity(rows, d, m):
    x, xc, mean, W = _cuda_problem(rows, d, m)
    fw = cupy_backend.FusedWhitener(mean, W)
    sq, ll = fw.score(xc)
    ref_sq, ref_ll = reference_scores(x, mean, W)
    assert sq.device == xc.device and sq.dtype == torch.float32
    assert rel_err(sq, ref_sq).max() <= 1e-5 and rel_err(ll, ref_ll).max() <= 1e-5
    s2, l2, w = fw.score_and_whiten(xc)
    assert torch.equal(s2, sq) and torch.equal(l2, ll)       # bitwise reproducible
    assert np.all(np.abs(w.cpu().numpy() - reference_whiten(x, mean, W)) <= whiten_error_bound(x, mean, W))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", sorted(HALF))
def test_fused_half_inputs_within_bounds(fmt):
    x, xh, mean, W = _cuda_problem(2000, 768, 768, dtype=HALF[fmt], seed=4)
    sq = cupy_backend.FusedWhitener(mean, W).score(xh)[0].double().cpu().numpy()
    assert rel_err(sq, reference_scores(xh, mean, W)[0]).max() <= 1e-5
    err = sq - reference_scores(x, mean, W)[0]
    u, eta = INPUT_ROUNDING[fmt]
    assert np.all(np.abs(err) <= sqnorm_error_bound(x, mean, W, u, eta))
    assert np.max(np.abs(err) / sqnorm_error_sigma(x, mean, W, u)) <= 6.0


@pytest.mark.gpu
def test_fused_zero_copy_current_stream_strides_and_counter_reuse(monkeypatch):
    import cupy
    x, xc, mean, W = _cuda_problem(700, 256, 200)
    fw = make_whitener((mean, W), "cuda")
    assert isinstance(fw, cupy_backend.FusedWhitener)
    seen = []
    real = cupy.from_dlpack
    monkeypatch.setattr(cupy, "from_dlpack", lambda t, *a, **k: seen.append(t.data_ptr()) or real(t, *a, **k))
    fw.score(xc)
    assert xc.data_ptr() in seen                         # handed over, not copied
    monkeypatch.undo()
    ref_sq = reference_scores(x, mean, W)[0]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):                        # x is produced late on `side`
        late = torch.zeros_like(xc)
        torch.cuda._sleep(100_000_000)
        late.copy_(xc)
        sq_side = fw.score(late)[0]                      # wrong if launched on another stream
    side.synchronize()
    assert rel_err(sq_side, ref_sq).max() <= 1e-5
    wide = torch.zeros(700, 300, device="cuda")
    wide[:, 10:266] = xc
    for rows in (700, 1, 64, 65, 700):                   # counters are reused across launches
        assert rel_err(fw.score(wide[:rows, 10:266])[0], ref_sq[:rows]).max() <= 1e-5
    assert fw.score(xc[:0])[0].shape == (0,)
    with pytest.raises(TypeError):
        fw.score(xc.double())
    with pytest.raises(ValueError, match="lives on"):
        fw.score(xc.cpu())


@pytest.mark.gpu
def test_gemm_backend_and_fallback_on_cuda(monkeypatch):
    x, xc, mean, W = _cuda_problem(1000, 512, 512)
    mm = torch.backends.cuda.matmul
    old, mm.fp32_precision = mm.fp32_precision, "ieee"
    try:
        sq = make_whitener((mean, W), "cuda", backend="gemm").score(xc)[0]
    finally:
        mm.fp32_precision = old
    assert rel_err(sq, reference_scores(x, mean, W)[0]).max() <= 1e-5
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert isinstance(make_whitener((mean, W), "cuda"), TorchWhitener)
