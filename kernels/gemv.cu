// Decode-sized matrix products: y[t, n] = sum_k x[t, k] * w[n, k] for T <= MAX_T rows of fp32
// activations against bf16 (or, for fp32 checkpoints, fp32) weights, fp32 accumulation. Memory-bound on the weights, so each
// weight row is read once (16-byte loads, coalesced across the warp) for all T rows, and the
// fusions ride along for free:
//   NORM: x is replaced by rms_norm(x) * g, the statistic computed per block (the QKV and lm_head
//         prologue: the original project's RMSNorm+QKV kernel, with the statistic in fp32);
//   EPI_ADD: y = residual + x w^T (o_proj / down_proj with their residual adds);
//   EPI_SILU: rows n and n + N/2 are gate and up, y[t, n] = silu(gate) * up.
// One warp per output column; block = WARPS * 32 threads; grid = ceil(out_cols / WARPS).

#define MAX_T 8
#define WARPS 8
#define EPI_NONE 0
#define EPI_ADD 1
#define EPI_SILU 2

// Eight consecutive weights starting at `p` (16-byte aligned for bf16, 32 for fp32).
__device__ __forceinline__ void load8(const bf16_t* p, float wf[8]) {
    const uint4 wv = __ldg(reinterpret_cast<const uint4*>(p));
    wf[0] = bf16_lo(wv.x); wf[1] = bf16_hi(wv.x); wf[2] = bf16_lo(wv.y); wf[3] = bf16_hi(wv.y);
    wf[4] = bf16_lo(wv.z); wf[5] = bf16_hi(wv.z); wf[6] = bf16_lo(wv.w); wf[7] = bf16_hi(wv.w);
}
__device__ __forceinline__ void load8(const float* p, float wf[8]) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p + 4));
    wf[0] = a.x; wf[1] = a.y; wf[2] = a.z; wf[3] = a.w; wf[4] = b.x; wf[5] = b.y; wf[6] = b.z; wf[7] = b.w;
}
__device__ __forceinline__ float load1(const bf16_t* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ float load1(const float* p) { return *p; }

template <typename WT, bool VEC>
__device__ __forceinline__ void dot_row(const float* __restrict__ x, const WT* __restrict__ wrow,
                                        const float* __restrict__ g, int T, int K, int lane,
                                        float acc[MAX_T]) {
    if (VEC) {
        // K % 8 == 0: lane reads 8 weights (16 bytes) per step.
#pragma unroll 4
        for (int k = lane * 8; k < K; k += 256) {
            float wf[8];
            load8(wrow + k, wf);
            if (g != nullptr) {
                const float4 g0 = *reinterpret_cast<const float4*>(g + k);
                const float4 g1 = *reinterpret_cast<const float4*>(g + k + 4);
                wf[0] *= g0.x; wf[1] *= g0.y; wf[2] *= g0.z; wf[3] *= g0.w;
                wf[4] *= g1.x; wf[5] *= g1.y; wf[6] *= g1.z; wf[7] *= g1.w;
            }
#pragma unroll
            for (int t = 0; t < MAX_T; ++t) {
                if (t < T) {
                    const float4 a = *reinterpret_cast<const float4*>(x + (size_t)t * K + k);
                    const float4 b = *reinterpret_cast<const float4*>(x + (size_t)t * K + k + 4);
                    float s = a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + b.x * wf[4] +
                              b.y * wf[5] + b.z * wf[6] + b.w * wf[7];
                    acc[t] += s;
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            float wk = load1(wrow + k);
            if (g != nullptr) wk *= g[k];
#pragma unroll
            for (int t = 0; t < MAX_T; ++t)
                if (t < T) acc[t] += x[(size_t)t * K + k] * wk;
        }
    }
}

template <typename WT, int EPI, bool NORM, bool VEC>
__device__ __forceinline__ void gemv(const float* __restrict__ x, const WT* __restrict__ w,
                                     const float* __restrict__ g, const float* __restrict__ residual,
                                     float* __restrict__ y, int T, int K, int out_cols, float eps) {
    __shared__ float inv_rms[MAX_T];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (NORM) {
        // Warp t computes row t's statistic in fp32.
        for (int t = warp; t < T; t += WARPS) {
            float ss = 0.0f;
            for (int k = lane; k < K; k += 32) { float v = x[(size_t)t * K + k]; ss += v * v; }
            ss = warp_sum(ss);
            if (lane == 0) inv_rms[t] = rsqrtf(ss / K + eps);
        }
        __syncthreads();
    }
    float inv[MAX_T];
#pragma unroll
    for (int t = 0; t < MAX_T; ++t) inv[t] = NORM && t < T ? inv_rms[t] : 1.0f;

    const int n = blockIdx.x * WARPS + warp;
    if (n >= out_cols) return;
    float acc[MAX_T] = {0, 0, 0, 0, 0, 0, 0, 0};
    dot_row<WT, VEC>(x, w + (size_t)n * K, NORM ? g : nullptr, T, K, lane, acc);
    if (EPI == EPI_SILU) {
        float up[MAX_T] = {0, 0, 0, 0, 0, 0, 0, 0};
        dot_row<WT, VEC>(x, w + (size_t)(n + out_cols) * K, NORM ? g : nullptr, T, K, lane, up);
#pragma unroll
        for (int t = 0; t < MAX_T; ++t) {
            if (t < T) {
                const float gs = warp_sum(acc[t]) * inv[t], us = warp_sum(up[t]) * inv[t];
                if (lane == 0) y[(size_t)t * out_cols + n] = silu(gs) * us;
            }
        }
    } else {
#pragma unroll
        for (int t = 0; t < MAX_T; ++t) {
            if (t < T) {
                const float s = warp_sum(acc[t]) * inv[t];
                if (lane == 0) {
                    const size_t o = (size_t)t * out_cols + n;
                    y[o] = EPI == EPI_ADD ? residual[o] + s : s;
                }
            }
        }
    }
}

#define GEMV_ENTRY(name, WT, SUFFIX, EPI, NORM)                                                       \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                          \
        name##_##SUFFIX##_vec(const float* x, const WT* w, const float* g, const float* residual,      \
                              float* y, int T, int K, int out_cols, float eps) {                       \
        gemv<WT, EPI, NORM, true>(x, w, g, residual, y, T, K, out_cols, eps);                          \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                          \
        name##_##SUFFIX##_any(const float* x, const WT* w, const float* g, const float* residual,      \
                              float* y, int T, int K, int out_cols, float eps) {                       \
        gemv<WT, EPI, NORM, false>(x, w, g, residual, y, T, K, out_cols, eps);                         \
    }

#define GEMV_ENTRIES(WT, SUFFIX)                          \
    GEMV_ENTRY(gemv, WT, SUFFIX, EPI_NONE, false)         \
    GEMV_ENTRY(gemv_add, WT, SUFFIX, EPI_ADD, false)      \
    GEMV_ENTRY(gemv_silu_mul, WT, SUFFIX, EPI_SILU, false) \
    GEMV_ENTRY(rms_norm_gemv, WT, SUFFIX, EPI_NONE, true)

GEMV_ENTRIES(bf16_t, bf16)
GEMV_ENTRIES(float, f32)
