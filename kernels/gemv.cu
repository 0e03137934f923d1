// Decode-sized matrix products: y[t, n] = sum_k x[t, k] * w[n, k] for T <= MAX_T rows of fp32
// activations against bf16 (or, for fp32 checkpoints, fp32) weights, fp32 accumulation.
// Memory-bound on the weights, so each weight row is read once (16-byte loads, coalesced across
// the warp) for all T rows, and the fusions ride along for free:
//   NORM: x is replaced by rms_norm(x) * g, the fp32 statistic computed cooperatively by each
//         block (the QKV, gate/up and lm_head prologue: the original project's RMSNorm+QKV
//         kernel, done right);
//   EPI_ADD: y = residual + x w^T (o_proj / down_proj with their residual adds);
//   EPI_SILU: rows n and n + N/2 are gate and up, y[t, n] = silu(gate) * up.
// Block = 8 warps over 8/S output columns; S warps share a column by splitting K (split-K keeps
// enough loads in flight when N is small), their partial sums meet in shared memory.
// MT (1 or 8) bounds T at compile time so T = 1 keeps its registers few.

#define MAX_T 8
#define WARPS 8

// Eight consecutive weights starting at `p` (16-byte aligned for bf16, 32 for fp32).
__device__ __forceinline__ void load8(const bf16_t* p, float wf[8]) {
    unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(p)), wf);
}
__device__ __forceinline__ void load8(const float* p, float wf[8]) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p + 4));
    wf[0] = a.x; wf[1] = a.y; wf[2] = a.z; wf[3] = a.w; wf[4] = b.x; wf[5] = b.y; wf[6] = b.z; wf[7] = b.w;
}
__device__ __forceinline__ float load1(const bf16_t* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ float load1(const float* p) { return *p; }

// acc[t] += sum over k in [kbeg, kend) of x[t, k] * w[k] (* g[k] when g is given).
template <typename WT, bool VEC, int MT>
__device__ __forceinline__ void dot_row(const float* __restrict__ x, const WT* __restrict__ wrow,
                                        const float* __restrict__ g, int T, int K, int kbeg, int kend,
                                        int lane, float acc[MT]) {
    if (VEC) {
#pragma unroll 4
        for (int k = kbeg + lane * 8; k < kend; k += 256) {
            float wf[8];
            load8(wrow + k, wf);
            if (g != nullptr) {
                const float4 g0 = *reinterpret_cast<const float4*>(g + k);
                const float4 g1 = *reinterpret_cast<const float4*>(g + k + 4);
                wf[0] *= g0.x; wf[1] *= g0.y; wf[2] *= g0.z; wf[3] *= g0.w;
                wf[4] *= g1.x; wf[5] *= g1.y; wf[6] *= g1.z; wf[7] *= g1.w;
            }
#pragma unroll
            for (int t = 0; t < MT; ++t) {
                if (t < T) {
                    const float4 a = *reinterpret_cast<const float4*>(x + (size_t)t * K + k);
                    const float4 b = *reinterpret_cast<const float4*>(x + (size_t)t * K + k + 4);
                    acc[t] += a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + b.x * wf[4] +
                              b.y * wf[5] + b.z * wf[6] + b.w * wf[7];
                }
            }
        }
    } else {
        for (int k = kbeg + lane; k < kend; k += 32) {
            float wk = load1(wrow + k);
            if (g != nullptr) wk *= g[k];
#pragma unroll
            for (int t = 0; t < MT; ++t)
                if (t < T) acc[t] += x[(size_t)t * K + k] * wk;
        }
    }
}

template <typename WT, int MT, int EPI, bool NORM, bool VEC>
__device__ __forceinline__ void gemv(const float* __restrict__ x, const WT* __restrict__ w,
                                     const float* __restrict__ g, const float* __restrict__ residual,
                                     float* __restrict__ y, int T, int K, int out_cols, int S, float eps) {
    constexpr int NACC = EPI == EPI_SILU ? 2 : 1;
    __shared__ float inv_rms[MT];
    __shared__ float partial[WARPS][NACC * MT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    pdl_begin();
    const int n = blockIdx.x * (WARPS / S) + warp / S;
    const int part = warp % S, chunk = K / S;
    float acc[NACC * MT];
#pragma unroll
    for (int i = 0; i < NACC * MT; ++i) acc[i] = 0.0f;
    if (n < out_cols) {
        const float* gain = NORM ? g : nullptr;
        dot_row<WT, VEC, MT>(x, w + (size_t)n * K, gain, T, K, part * chunk, (part + 1) * chunk, lane, acc);
        if (EPI == EPI_SILU)
            dot_row<WT, VEC, MT>(x, w + (size_t)(n + out_cols) * K, gain, T, K, part * chunk,
                                 (part + 1) * chunk, lane, acc + MT);
    }
    // The norm statistic after the products (which take rms_norm's gain but not its 1/rms, a
    // per-row scale applied at the end): the weight loads start at once instead of waiting on
    // the block's reduction, and x is cache-hot by now.
    if (NORM) {
        // Every warp sums squares over a slice of K for each row; lane t then totals row t.
        for (int t = 0; t < T; ++t) {
            float ss = 0.0f;
            if (VEC) {
                for (int k = (warp * 32 + lane) * 4; k < K; k += WARPS * 128) {
                    const float4 v = *reinterpret_cast<const float4*>(x + (size_t)t * K + k);
                    ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
                }
            } else {
                for (int k = warp * 32 + lane; k < K; k += WARPS * 32) {
                    const float v = x[(size_t)t * K + k];
                    ss += v * v;
                }
            }
            ss = warp_sum(ss);
            if (lane == 0) partial[warp][t] = ss;
        }
        __syncthreads();
        if (threadIdx.x < T) {
            float tot = 0.0f;
            for (int i = 0; i < WARPS; ++i) tot += partial[i][threadIdx.x];
            inv_rms[threadIdx.x] = rsqrtf(tot / K + eps);
        }
        __syncthreads();
    }
    float inv[MT];
#pragma unroll
    for (int t = 0; t < MT; ++t) inv[t] = NORM && t < T ? inv_rms[t] : 1.0f;

#pragma unroll
    for (int i = 0; i < NACC * MT; ++i) acc[i] = warp_sum(acc[i]);
    if (S > 1) {
        if (lane == 0) {
#pragma unroll
            for (int i = 0; i < NACC * MT; ++i) partial[warp][i] = acc[i];
        }
        __syncthreads();
        if (part != 0) return;
        for (int s = 1; s < S; ++s) {
#pragma unroll
            for (int i = 0; i < NACC * MT; ++i) acc[i] += partial[warp + s][i];
        }
    }
    if (lane != 0 || n >= out_cols) return;
#pragma unroll
    for (int t = 0; t < MT; ++t) {
        if (t < T) {
            const size_t o = (size_t)t * out_cols + n;
            const float s = acc[t] * inv[t];
            if (EPI == EPI_SILU) y[o] = silu(s) * (acc[MT + t] * inv[t]);
            else if (EPI == EPI_ADD) y[o] = residual[o] + s;
            else y[o] = s;
        }
    }
}

#define GEMV_ENTRY(name, WT, SUFFIX, MT, EPI, NORM, VEC, LAYOUT)                                      \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                          \
        name##_##SUFFIX##_##LAYOUT##_t##MT(const float* x, const WT* w, const float* g,               \
                                           const float* residual, float* y, int T, int K,            \
                                           int out_cols, int S, float eps) {                          \
        gemv<WT, MT, EPI, NORM, VEC>(x, w, g, residual, y, T, K, out_cols, S, eps);                   \
    }

#define GEMV_SHAPES(name, WT, SUFFIX, EPI, NORM)                 \
    GEMV_ENTRY(name, WT, SUFFIX, 1, EPI, NORM, true, vec)        \
    GEMV_ENTRY(name, WT, SUFFIX, 8, EPI, NORM, true, vec)        \
    GEMV_ENTRY(name, WT, SUFFIX, 1, EPI, NORM, false, any)       \
    GEMV_ENTRY(name, WT, SUFFIX, 8, EPI, NORM, false, any)

#define GEMV_ENTRIES(WT, SUFFIX)                           \
    GEMV_SHAPES(gemv, WT, SUFFIX, EPI_NONE, false)         \
    GEMV_SHAPES(gemv_add, WT, SUFFIX, EPI_ADD, false)      \
    GEMV_SHAPES(gemv_silu_mul, WT, SUFFIX, EPI_SILU, false) \
    GEMV_SHAPES(rms_norm_gemv, WT, SUFFIX, EPI_NONE, true) \
    GEMV_SHAPES(rms_norm_gemv_silu_mul, WT, SUFFIX, EPI_SILU, true)

GEMV_ENTRIES(bf16_t, bf16)
GEMV_ENTRIES(float, f32)

// The decode path (T <= 8 rows, bf16 weights, K % 256 == 0; built for MT = 1 and MT = 8), where
// each kernel reads a few MB once and its fixed costs (launch, first-load latency, tail) decide
// the speed, not its loop. Every weight is read once for all T rows.
// Warp w of a column group owns R output columns (2R weight rows with SILU: gate and up) over
// one K-slice of kc * 256 elements (S warps of the group split K). It issues every weight load
// of its slice, kc 16-byte loads per row per lane, before pdl_wait(): launched as a programmatic
// dependent launch they overlap the previous kernel's tail. Then it reads x (a few KB, L2-hot).
// With NORM each warp sums the whole row's squares itself instead of meeting the block at a
// barrier first; 1/rms scales the finished dot products. KCM bounds kc at compile time.
// A block has GEMV_T1_WARPS warps (KernelBuild::gemv_t1_warps; S divides it): at ~96 registers
// a thread, two 8-warp blocks fill an SM's register file, five 4-warp ones (docs/perf.md).
// grid = ceil(N / (R * GEMV_T1_WARPS / S)), block = 32 * GEMV_T1_WARPS.
#ifndef GEMV_T1_WARPS
#define GEMV_T1_WARPS 8
#endif
template <int EPI, bool NORM, int R, int KCM, int MT>
__device__ __forceinline__ void gemv_t1(const float* __restrict__ x, const bf16_t* __restrict__ w,
                                        const float* __restrict__ g, const float* __restrict__ residual,
                                        float* __restrict__ y, int T, int K, int out_cols, int S, int kc,
                                        float eps) {
    constexpr int NR = EPI == EPI_SILU ? 2 * R : R;
    __shared__ float partial[GEMV_T1_WARPS][NR * MT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int part = warp % S;
    const int n0 = (blockIdx.x * (GEMV_T1_WARPS / S) + warp / S) * R;
    const int kbeg = part * kc * 256 + lane * 8;
    uint4 wv[NR][KCM];
#pragma unroll
    for (int r = 0; r < NR; ++r) {
        const int col = n0 + r % R;
        const size_t row = (EPI == EPI_SILU && r >= R) ? (size_t)col + out_cols : (size_t)col;
        const bf16_t* p = w + row * K + kbeg;
#pragma unroll
        for (int i = 0; i < KCM; ++i)
            if (i < kc && col < out_cols) wv[r][i] = __ldg(reinterpret_cast<const uint4*>(p + i * 256));
    }
    pdl_weights_requested();
    pdl_wait();
    pdl_launch_dependents();
    // Lane l writes output (column n0 + l % R, row l / R); its residual is fetched now, so the
    // latency overlaps the weights'.
    const int my_r = lane % R, my_t = lane / R;
    float res = 0.0f;
    if (EPI == EPI_ADD && my_t < T && n0 + my_r < out_cols && part == 0)
        res = residual[(size_t)my_t * out_cols + n0 + my_r];
    float acc[NR][MT], ss[MT];
#pragma unroll
    for (int t = 0; t < MT; ++t) {
        ss[t] = 0.0f;
#pragma unroll
        for (int r = 0; r < NR; ++r) acc[r][t] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < KCM; ++i) {
        if (i < kc) {
            const int k = kbeg + i * 256;
            float gf[8];
            if (NORM) {
                const float4 g0 = *reinterpret_cast<const float4*>(g + k);
                const float4 g1 = *reinterpret_cast<const float4*>(g + k + 4);
                gf[0] = g0.x; gf[1] = g0.y; gf[2] = g0.z; gf[3] = g0.w;
                gf[4] = g1.x; gf[5] = g1.y; gf[6] = g1.z; gf[7] = g1.w;
            }
#pragma unroll
            for (int t = 0; t < MT; ++t) {
                if (t < T) {
                    const float4 a = *reinterpret_cast<const float4*>(x + (size_t)t * K + k);
                    const float4 b = *reinterpret_cast<const float4*>(x + (size_t)t * K + k + 4);
                    float xf[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
                    if (NORM) {
#pragma unroll
                        for (int j = 0; j < 8; ++j) {
                            ss[t] += xf[j] * xf[j];
                            xf[j] *= gf[j];
                        }
                    }
#pragma unroll
                    for (int r = 0; r < NR; ++r) {
                        const uint4 v = wv[r][i];
                        acc[r][t] += xf[0] * bf16_lo(v.x) + xf[1] * bf16_hi(v.x) + xf[2] * bf16_lo(v.y) +
                                     xf[3] * bf16_hi(v.y) + xf[4] * bf16_lo(v.z) + xf[5] * bf16_hi(v.z) +
                                     xf[6] * bf16_lo(v.w) + xf[7] * bf16_hi(v.w);
                    }
                }
            }
        }
    }
    float inv[MT];
#pragma unroll
    for (int t = 0; t < MT; ++t) {
        inv[t] = 1.0f;
        if (NORM && t < T) {
            // With one K-slice per warp the squares came with the products; otherwise the row's
            // remaining slices are read here (L2-hot).
            if (S > 1) {
                ss[t] = 0.0f;
#pragma unroll 8
                for (int k = lane * 4; k < K; k += 128) {
                    const float4 v = *reinterpret_cast<const float4*>(x + (size_t)t * K + k);
                    ss[t] += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
                }
            }
            inv[t] = rsqrtf(warp_sum(ss[t]) / K + eps);
        }
    }
#pragma unroll
    for (int r = 0; r < NR; ++r) {
#pragma unroll
        for (int t = 0; t < MT; ++t)
            if (t < T) acc[r][t] = warp_sum(acc[r][t]);
    }
    if (S > 1) {
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < NR; ++r) {
#pragma unroll
                for (int t = 0; t < MT; ++t) partial[warp][r * MT + t] = acc[r][t];
            }
        }
        __syncthreads();
        if (part != 0) return;
        for (int s = 1; s < S; ++s) {
#pragma unroll
            for (int r = 0; r < NR; ++r) {
#pragma unroll
                for (int t = 0; t < MT; ++t) acc[r][t] += partial[warp + s][r * MT + t];
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MT; ++t) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int n = n0 + r;
            if (t < T && lane == r + R * t && n < out_cols) {
                const size_t o = (size_t)t * out_cols + n;
                const float v = acc[r][t] * inv[t];
                if (EPI == EPI_SILU) y[o] = silu(v) * (acc[R + r][t] * inv[t]);
                else if (EPI == EPI_ADD) y[o] = res + v;
                else y[o] = v;
            }
        }
    }
}

#define GEMV_T1_ENTRY(name, EPI, NORM, R, KCM, MT)                                                        \
    extern "C" __global__ void __launch_bounds__(GEMV_T1_WARPS * 32)                                       \
        name##_t##MT##_r##R##_k##KCM(const float* x, const bf16_t* w, const float* g, const float* residual, \
                                     float* y, int T, int K, int out_cols, int S, int kc, float eps) {     \
        gemv_t1<EPI, NORM, R, KCM, MT>(x, w, g, residual, y, T, K, out_cols, S, kc, eps);                  \
    }

// (R, KCM): R output columns a warp, at most KCM loads a weight row per lane, at most 16 loads
// (64 registers) a warp; MT = 1 for batch-1 decode, 8 for batches of 2-8 rows (R * 8 <= 32: a
// lane for each output). ptxas sizes the registers by KCM, not by the kc a launch uses (o_proj's
// 4 loads a lane: 36 registers as r1_k4, 94 as r1_k16; at 2-8 rows 48 against 98), and the
// registers decide how many blocks of the next kernels find room on an SM before their wait.
// Batches of 2-8 rows take the smallest KCM that holds their kc (on the H200 batch 2 10% faster,
// batch 4 6%, batch 8 level);
// batch 1 the largest: its next kernels' loads would then run beside attention and slow it
// (docs/perf.md, 14th session).
#define GEMV_T1_MTS(name, EPI, NORM, R, KCM) \
    GEMV_T1_ENTRY(name, EPI, NORM, R, KCM, 1) GEMV_T1_ENTRY(name, EPI, NORM, R, KCM, 8)
#define GEMV_T1_PLAIN(name, EPI, NORM)                                                            \
    GEMV_T1_MTS(name, EPI, NORM, 4, 4) GEMV_T1_MTS(name, EPI, NORM, 2, 4)                         \
    GEMV_T1_MTS(name, EPI, NORM, 2, 8) GEMV_T1_MTS(name, EPI, NORM, 1, 4)                         \
    GEMV_T1_MTS(name, EPI, NORM, 1, 8) GEMV_T1_MTS(name, EPI, NORM, 1, 16)
#define GEMV_T1_SILU(name, NORM)                                                                  \
    GEMV_T1_MTS(name, EPI_SILU, NORM, 2, 4) GEMV_T1_MTS(name, EPI_SILU, NORM, 1, 4)               \
    GEMV_T1_MTS(name, EPI_SILU, NORM, 1, 8)

GEMV_T1_PLAIN(gemv, EPI_NONE, false)
GEMV_T1_PLAIN(gemv_add, EPI_ADD, false)
GEMV_T1_PLAIN(rms_norm_gemv, EPI_NONE, true)
GEMV_T1_SILU(gemv_silu_mul, false)
GEMV_T1_SILU(rms_norm_gemv_silu_mul, true)
