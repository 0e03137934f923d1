// Batch-1 decode products (T = 1, bf16 weights, K a multiple of 256) with the weights staged in
// shared memory by bulk copies: y[n] = epilogue(sum_k x[k] w[n, k]), as gemv_t1 in gemv.cu
// (NORM: x is rms_norm(x) * g, the statistic formed by every warp from the x it reads; EPI_ADD:
// plus a residual; EPI_SILU: rows n and n + N are gate and up, y[n] = silu(gate) * up).
//
// Why: gemv_t1 holds its weights in registers (~96 a thread), so two product kernels' blocks fit
// an SM, and the next-but-one kernel cannot request its weights until the one before it has
// finished. A block here holds its C = 8 CPW weight rows (and with SILU the C matching up rows)
// in dynamic shared memory, requested before the PDL wait as one bulk copy per contiguous
// 16 KB piece, so each thread needs few registers and up to three kernels' blocks (64 KB each)
// share an SM: their copies stream while earlier kernels finish.
//
// Warp w takes output columns c0 + w CPW + j (j < CPW); lane l the 8 elements at l 8 + 256 i of
// each row. grid = ceil(N / C), block = 256, dynamic shared memory = rows * K * 2 bytes.

#define GT_WARPS 8
#define GT_PIECE 16384

template <int EPI, bool NORM, int CPW>
__device__ __forceinline__ void gemv_tma(const float* __restrict__ x, const bf16_t* __restrict__ w,
                                         const float* __restrict__ g, const float* __restrict__ residual,
                                         float* __restrict__ y, int K, int N, float eps) {
    extern __shared__ __align__(128) unsigned char gt_smem[];
    __shared__ __align__(8) unsigned long long bar_mem;
    constexpr int C = GT_WARPS * CPW;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c0 = blockIdx.x * C, cols = min(C, N - c0);
    const u32 row_bytes = (u32)K * 2u, chunk = (u32)cols * row_bytes;
    const u32 base = (u32)__cvta_generic_to_shared(gt_smem), bar = (u32)__cvta_generic_to_shared(&bar_mem);
    // Warp 0 requests the block's rows (gate rows, then up rows at C rows in), a piece a lane.
    if (warp == 0) {
        if (lane == 0) {
            mbar_init(bar, 1);
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
            mbar_arrive_expect(bar, (EPI == EPI_SILU ? 2u : 1u) * chunk);
        }
        __syncwarp();
        const u32 pieces = (chunk + GT_PIECE - 1) / GT_PIECE;
        for (u32 p = lane; p < (EPI == EPI_SILU ? 2u : 1u) * pieces; p += 32) {
            const u32 half = p / pieces, off = (p % pieces) * GT_PIECE;
            const u32 bytes = min((u32)GT_PIECE, chunk - off);
            const size_t row0 = (size_t)c0 + (half ? (size_t)N : 0);
            bulk_load(base + half * (u32)C * row_bytes + off,
                      reinterpret_cast<const unsigned char*>(w + row0 * K) + off, bytes, bar);
        }
    }
    pdl_weights_requested();
    pdl_wait();
    pdl_launch_dependents();
    float res[CPW];
#pragma unroll
    for (int j = 0; j < CPW; ++j) {
        const int c = warp * CPW + j;
        res[j] = EPI == EPI_ADD && lane == 0 && c < cols ? residual[c0 + c] : 0.0f;
    }
    // Every thread waits on the barrier itself (initialised before any waits: warp 0 reaches
    // the block barrier only after initialising it).
    __syncthreads();
    float acc[CPW], up[CPW], ss = 0.0f;
#pragma unroll
    for (int j = 0; j < CPW; ++j) acc[j] = up[j] = 0.0f;
    mbar_wait(bar, 0);
    const unsigned char* rows = gt_smem + (size_t)warp * CPW * row_bytes;
#pragma unroll 4
    for (int k = lane * 8; k < K; k += 256) {
        float xf[8];
        load8f(x + k, xf);
        if (NORM) {
            float gf[8];
            load8f(g + k, gf);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                ss += xf[i] * xf[i];
                xf[i] *= gf[i];
            }
        }
#pragma unroll
        for (int j = 0; j < CPW; ++j) {
            const uint4 v = *reinterpret_cast<const uint4*>(rows + j * row_bytes + 2 * k);
            acc[j] += xf[0] * bf16_lo(v.x) + xf[1] * bf16_hi(v.x) + xf[2] * bf16_lo(v.y) + xf[3] * bf16_hi(v.y) +
                      xf[4] * bf16_lo(v.z) + xf[5] * bf16_hi(v.z) + xf[6] * bf16_lo(v.w) + xf[7] * bf16_hi(v.w);
            if (EPI == EPI_SILU) {
                const uint4 u = *reinterpret_cast<const uint4*>(rows + (C + j) * row_bytes + 2 * k);
                up[j] += xf[0] * bf16_lo(u.x) + xf[1] * bf16_hi(u.x) + xf[2] * bf16_lo(u.y) + xf[3] * bf16_hi(u.y) +
                         xf[4] * bf16_lo(u.z) + xf[5] * bf16_hi(u.z) + xf[6] * bf16_lo(u.w) + xf[7] * bf16_hi(u.w);
            }
        }
    }
    const float inv = NORM ? rsqrtf(warp_sum(ss) / K + eps) : 1.0f;
#pragma unroll
    for (int j = 0; j < CPW; ++j) {
        const float a = warp_sum(acc[j]) * inv;
        const float b = EPI == EPI_SILU ? warp_sum(up[j]) * inv : 0.0f;
        const int c = warp * CPW + j;
        if (lane == 0 && c < cols) {
            if (EPI == EPI_SILU) y[c0 + c] = silu(a) * b;
            else if (EPI == EPI_ADD) y[c0 + c] = res[j] + a;
            else y[c0 + c] = a;
        }
    }
}

#define GEMV_TMA_ENTRY(name, EPI, NORM, CPW)                                                                   \
    extern "C" __global__ void __launch_bounds__(GT_WARPS * 32)                                                \
        name##_tma_c##CPW(const float* x, const bf16_t* w, const float* g, const float* residual, float* y, \
                          int K, int N, float eps) {                                                          \
        gemv_tma<EPI, NORM, CPW>(x, w, g, residual, y, K, N, eps);                                            \
    }
#define GEMV_TMA_CPWS(name, EPI, NORM) \
    GEMV_TMA_ENTRY(name, EPI, NORM, 1) GEMV_TMA_ENTRY(name, EPI, NORM, 2) GEMV_TMA_ENTRY(name, EPI, NORM, 4)

GEMV_TMA_CPWS(gemv, EPI_NONE, false)
GEMV_TMA_CPWS(gemv_add, EPI_ADD, false)
GEMV_TMA_CPWS(rms_norm_gemv, EPI_NONE, true)
GEMV_TMA_CPWS(gemv_silu_mul, EPI_SILU, false)
GEMV_TMA_CPWS(rms_norm_gemv_silu_mul, EPI_SILU, true)
