// wclip fused whitening-and-norm kernel.
//
// For each row x of a (rows, d) batch (fp32, fp16 or bf16, row stride ldx elements):
//     w = (x - mean) @ proj          (m values, fp32 accumulation)
//     sqnorm = ||w||^2,  loglik = -(0.5 m log(2 pi) + 0.5 sqnorm)
// in one launch, without writing w to global memory (the *_whiten_* entries also write w).
//
// Contract with pipeline/whitening/kernels/cupy_backend.py (constants checked by tests/whitening/test_kernels.py):
//   * grid = (ceil(rows / TILE_ROWS), m_pad / TILE_COLS), block = THREADS threads;
//   * proj is fp32, zero-padded to (d_pad, m_pad), row-major, d_pad a multiple of TILE_K,
//     m_pad a multiple of TILE_COLS, 16-byte aligned; mean is fp32, zero-padded to d_pad;
//   * partial holds rows * gridDim.y floats (unused when gridDim.y == 1);
//   * counters holds gridDim.x zeros before the launch and is left zeroed after it, so one
//     buffer serves every launch on one stream;
//   * whitened is (rows, m) fp32 for the *_whiten_* entries, ignored otherwise.
// The sum over column tiles is done in a fixed order by the last block of each row tile,
// so results are bitwise reproducible whatever order the blocks run in.
//
// The source needs no headers, so NVRTC can compile it without a GPU or a CUDA toolkit.
// WCLIP_HOST_EMULATION is defined only by the CPU emulation in tests/test_kernels.py,
// which supplies the two conversion helpers below.

constexpr int TILE_ROWS = 64;   // rows of x per block
constexpr int TILE_COLS = 64;   // whitening directions per block
constexpr int TILE_K = 16;      // embedding values per shared-memory stage
constexpr int THREADS = 256;    // 16 x 16 threads, each owning a 4 x 4 piece of w
constexpr int XS_STRIDE = TILE_ROWS + 4;  // padded (fewer bank conflicts), 16-byte rows

struct wclip_f16 { unsigned short bits; };
struct wclip_bf16 { unsigned short bits; };

#ifndef WCLIP_HOST_EMULATION
__device__ __forceinline__ float wclip_f16_to_f32(unsigned short bits) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
}
__device__ __forceinline__ float wclip_bf16_to_f32(unsigned short bits) {
    return __uint_as_float(((unsigned int)bits) << 16);
}
#endif

__device__ __forceinline__ float wclip_to_f32(float v) { return v; }
__device__ __forceinline__ float wclip_to_f32(wclip_f16 v) { return wclip_f16_to_f32(v.bits); }
__device__ __forceinline__ float wclip_to_f32(wclip_bf16 v) { return wclip_bf16_to_f32(v.bits); }

template <typename T, bool WRITE_W>
__device__ __forceinline__ void wclip_whiten_rows(
    const T* __restrict__ x, long long ldx, int rows, int d,
    const float* __restrict__ mean, const float* __restrict__ proj, int m_pad, int m,
    float half_m_log2pi, float* __restrict__ partial, unsigned int* __restrict__ counters,
    float* __restrict__ sqnorm, float* __restrict__ loglik, float* __restrict__ whitened)
{
    __shared__ __align__(16) float xs[2][TILE_K][XS_STRIDE];  // centred x, k-major
    __shared__ __align__(16) float ws[2][TILE_K][TILE_COLS];  // proj tile
    __shared__ unsigned int is_last;

    const int tid = threadIdx.x;
    const int tx = tid % 16;              // owns columns col0 + 4 tx .. + 3
    const int ty = tid / 16;              // owns rows row0 + 4 ty .. + 3
    const int row0 = blockIdx.x * TILE_ROWS;
    const int col0 = blockIdx.y * TILE_COLS;

    // Staging roles: x values (row lx_row, k lx_k .. +3) and proj values (k lw_k, cols lw_c .. +3).
    const int lx_row = tid >> 2;
    const int lx_k = (tid & 3) * 4;
    const bool lx_live = row0 + lx_row < rows;
    const T* xrow = x + (long long)(lx_live ? row0 + lx_row : 0) * ldx;
    const int lw_k = tid >> 4;
    const int lw_c = (tid & 15) * 4;

    float xr[4];
    float4 wr;
    auto fetch = [&](int k0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int k = k0 + lx_k + i;
            xr[i] = (lx_live && k < d) ? wclip_to_f32(xrow[k]) - mean[k] : 0.0f;
        }
        wr = *reinterpret_cast<const float4*>(proj + (long long)(k0 + lw_k) * m_pad + col0 + lw_c);
    };
    auto stage = [&](int buf) {
#pragma unroll
        for (int i = 0; i < 4; ++i) xs[buf][lx_k + i][lx_row] = xr[i];
        *reinterpret_cast<float4*>(&ws[buf][lw_k][lw_c]) = wr;
    };

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    const int n_k = (d + TILE_K - 1) / TILE_K;
    fetch(0);
    stage(0);
    __syncthreads();
    for (int t = 0; t < n_k; ++t) {
        const int cur = t & 1;
        if (t + 1 < n_k) fetch((t + 1) * TILE_K);   // global loads overlap the FMAs below
#pragma unroll
        for (int kk = 0; kk < TILE_K; ++kk) {
            const float4 a4 = *reinterpret_cast<const float4*>(&xs[cur][kk][ty * 4]);
            const float4 b4 = *reinterpret_cast<const float4*>(&ws[cur][kk][tx * 4]);
            const float a[4] = {a4.x, a4.y, a4.z, a4.w};
            const float b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        if (t + 1 < n_k) stage(cur ^ 1);
        __syncthreads();
    }

    if (WRITE_W) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = row0 + ty * 4 + i;
            if (r >= rows) continue;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int c = col0 + tx * 4 + j;
                if (c < m) whitened[(long long)r * m + c] = acc[i][j];
            }
        }
    }

    // Square and sum over this block's columns; padded columns hold exact zeros.
    float part[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) s = fmaf(acc[i][j], acc[i][j], s);
        part[i] = s;
    }
#pragma unroll
    for (int offset = 8; offset > 0; offset >>= 1)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[i] += __shfl_xor_sync(0xffffffffu, part[i], offset);

    if (gridDim.y == 1) {
        if (tx == 0) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = row0 + ty * 4 + i;
                if (r < rows) {
                    sqnorm[r] = part[i];
                    loglik[r] = -(half_m_log2pi + 0.5f * part[i]);
                }
            }
        }
        return;
    }

    const int n_col_tiles = gridDim.y;
    if (tx == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = row0 + ty * 4 + i;
            if (r < rows) partial[(long long)r * n_col_tiles + blockIdx.y] = part[i];
        }
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        const unsigned int ticket = atomicAdd(&counters[blockIdx.x], 1u);
        is_last = (ticket == (unsigned int)(n_col_tiles - 1)) ? 1u : 0u;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    if (tid < TILE_ROWS) {
        const int r = row0 + tid;
        if (r < rows) {
            const volatile float* pr = partial + (long long)r * n_col_tiles;
            float s = 0.0f;
            for (int j = 0; j < n_col_tiles; ++j) s += pr[j];
            sqnorm[r] = s;
            loglik[r] = -(half_m_log2pi + 0.5f * s);
        }
    }
    if (tid == 0) counters[blockIdx.x] = 0u;
}

#define WCLIP_ENTRY(NAME, T, WRITE_W)                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                              \
        const T* __restrict__ x, long long ldx, int rows, int d,                             \
        const float* __restrict__ mean, const float* __restrict__ proj, int m_pad, int m,    \
        float half_m_log2pi, float* __restrict__ partial, unsigned int* __restrict__ counters, \
        float* __restrict__ sqnorm, float* __restrict__ loglik, float* __restrict__ whitened) \
    {                                                                                        \
        wclip_whiten_rows<T, WRITE_W>(x, ldx, rows, d, mean, proj, m_pad, m, half_m_log2pi,  \
                                      partial, counters, sqnorm, loglik, whitened);          \
    }

WCLIP_ENTRY(wclip_score_f32, float, false)
WCLIP_ENTRY(wclip_score_f16, wclip_f16, false)
WCLIP_ENTRY(wclip_score_bf16, wclip_bf16, false)
WCLIP_ENTRY(wclip_whiten_f32, float, true)
WCLIP_ENTRY(wclip_whiten_f16, wclip_f16, true)
WCLIP_ENTRY(wclip_whiten_bf16, wclip_bf16, true)
