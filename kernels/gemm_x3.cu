// OPT-IN (CudaOptions::gemm_x3, QFUSE_CUDA_GEMM_X3=1): correct and more accurate than the cuBLAS
// path, but ~2x slower per product on the H200 (21-31 us against cuBLAS's 9-11 + 3-4 for the sum
// kernel): each K group's weight loads and activation staging wait on the group before, so every
// group pays a DRAM and an L2 round trip in series. A multi-stage pipeline (the whole slice's
// weights and activations in flight at once, 1 block an SM) is the next step (docs/perf.md).
//
// Products of 9-64 rows (batched decode steps) on the tensor cores: y = epilogue(x w^T) from the
// three bf16 parts of x that split_f32_bf16x3 / rms_norm_split_bf16x3 wrote ([3][T][K]: hi, mid,
// lo; fp32-exact together) and bf16 weights w [N, K]. One kernel replaces a cuBLAS GEMM over the
// stacked parts and the kernel that summed its three partial products: the weights are read once,
// the three products accumulate in registers and the epilogue is fused (EPI_NONE: y = x w^T;
// EPI_ADD: y = residual + x w^T; EPI_SILU: y[:, n] = silu(x w_n^T) * (x w_{n + N/2}^T), N/2 columns).
//
// Block: 8 warps over 128 weight rows (with EPI_SILU 64 gate rows and the 64 matching up rows) and
// one slice of K; warp w takes rows 32 (w & 1) .. + 32 of x (two m16 tiles) and 32 weight rows
// (four n8 tiles), so each activation fragment read from shared memory serves four products. The
// S slices of a tile form a thread-block cluster (sm_90): each block leaves its partial tile in
// shared memory and, after a cluster barrier, reduces 1/S of the tile over all S blocks' tiles
// (distributed shared memory, always in slice order, so results do not depend on timing) and
// applies the epilogue.
//
// mma.sync m16n8k16 (bf16 in, fp32 accumulate). The dot product is indifferent to the order of k,
// so each lane loads 16 contiguous bytes (8 k) of its weight row (from global memory, into
// registers) and of its activation rows (from shared memory, where the block staged them with
// cp.async) per 32-k chunk, and the two mma k-steps of a chunk take words (0, 1) and (2, 3) of
// those loads: A and B use the same k order, so no shuffles are needed. The hi part accumulates
// apart from mid + lo, which are 2^-8 smaller, as the GEMM path summed them.
// grid = (tiles, S), cluster = (1, S), block = 256; T <= 64, K % 32 == 0, (K / 32) % S == 0.

#ifndef EPI_NONE
#define EPI_NONE 0
#define EPI_ADD 1
#define EPI_SILU 2
#endif
#define X3_WARPS 8
#define X3_ROWS 128
#define X3_KCM 2
#define X3_TMAX 64

#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ u32 x3_smem_addr(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}

__device__ __forceinline__ void x3_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

__device__ __forceinline__ u32 x3_cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

// The float at shared address `addr` of the cluster's block `rank`.
__device__ __forceinline__ float x3_ld_peer(u32 addr, u32 rank) {
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}

__device__ __forceinline__ void x3_mma(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif

// One 16-byte unit (8 bf16) of a staged activation row: unit u of row r sits at u ^ 4 on odd rows,
// so the two rows that a quarter-warp's 16-byte loads touch (g, g + 1) fall in different banks.
__device__ __forceinline__ int x3_unit(int r, int u) { return (r * 4 * X3_KCM + (u ^ ((r & 1) << 2))) * 8; }

template <int EPI>
__device__ __forceinline__ void gemm_x3(const bf16_t* __restrict__ parts, const bf16_t* __restrict__ w,
                                        const float* __restrict__ residual, float* __restrict__ y, int T, int K,
                                        int N, int kc) {
#if __CUDA_ARCH__ >= 900
    // The activations of X3_KCM chunks ([3 parts][64 rows][64 k] bf16, 24 KiB), staged by the
    // whole block with cp.async; after the products the same memory holds the partial tile
    // ([64 rows][128 columns] fp32, 32 KiB) for the cluster's reduction.
    __shared__ __align__(16) float red[X3_TMAX * X3_ROWS];
    bf16_t* act = reinterpret_cast<bf16_t*>(red);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q4 = lane & 3;
    const int tile = blockIdx.x, S = gridDim.y, slice = blockIdx.y;
    const int half = N / 2;
    // This warp's rows of x (m tiles 2 wm, 2 wm + 1), its first weight row, and the first of its
    // columns within the block's tile.
    const int wm = warp & 1, wn = warp >> 1;
    const int gate_col = tile * 64 + (wn & 1) * 32;
    const int row0 = EPI == EPI_SILU ? (wn < 2 ? gate_col : half + gate_col) : tile * X3_ROWS + wn * 32;
    const int col0 = wn * 32;
    const int mtiles = (T + 15) >> 4, rows = 16 * mtiles;
    const size_t part_stride = (size_t)T * K;
    const int k_slice = slice * kc * 32;
    float acc_hi[2][4][4], acc_lo[2][4][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc_hi[m][nt][i] = acc_lo[m][nt][i] = 0.0f;
    bool row_ok[4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
        row_ok[nt] = EPI == EPI_SILU ? gate_col + nt * 8 + g < half : row0 + nt * 8 + g < N;
    uint4 zero;
    zero.x = zero.y = zero.z = zero.w = 0u;
    const u32 act_addr = x3_smem_addr(act);
    for (int c0 = 0; c0 < kc; c0 += X3_KCM) {
        // This group's weights in registers (the first group's before the PDL wait: weights
        // never depend on an earlier kernel).
        uint4 wv[X3_KCM][4];
#pragma unroll
        for (int c = 0; c < X3_KCM; ++c)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const size_t r = (size_t)(row0 + nt * 8 + g);
                wv[c][nt] = (c0 + c < kc && row_ok[nt])
                                ? __ldg(reinterpret_cast<const uint4*>(w + r * K + k_slice + (c0 + c) * 32 + q4 * 8))
                                : zero;
            }
        if (c0 == 0) {
            pdl_wait();
            pdl_launch_dependents();
        } else {
            __syncthreads();  // every warp is done with the previous group's activations
        }
        // Stage the group's activations: rows past T are zero-filled.
        const int chunks = kc - c0 < X3_KCM ? kc - c0 : X3_KCM;
        const int upr = 4 * chunks, units = 3 * rows * upr;
        for (int i = threadIdx.x; i < units; i += X3_WARPS * 32) {
            const int p = i / (rows * upr), rem = i - p * rows * upr, r = rem / upr, u = rem - r * upr;
            const bf16_t* src = parts + p * part_stride + (size_t)(r < T ? r : 0) * K + k_slice + c0 * 32 + u * 8;
            const u32 dst = act_addr + 2u * (u32)(p * X3_TMAX * X3_KCM * 32 + x3_unit(r, u));
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(r < T ? 16 : 0)
                         : "memory");
        }
        asm volatile("cp.async.commit_group;\n\tcp.async.wait_group 0;" ::: "memory");
        __syncthreads();
#pragma unroll
        for (int c = 0; c < X3_KCM; ++c) {
            if (c0 + c >= kc) break;
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                if (2 * wm + m >= mtiles) break;
                const int r0 = (2 * wm + m) * 16 + g, r1 = r0 + 8;
#pragma unroll
                for (int p = 0; p < 3; ++p) {
                    const bf16_t* base = act + p * X3_TMAX * X3_KCM * 32;
                    const uint4 a0 = *reinterpret_cast<const uint4*>(base + x3_unit(r0, c * 4 + q4));
                    const uint4 a1 = *reinterpret_cast<const uint4*>(base + x3_unit(r1, c * 4 + q4));
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt) {
                        float* acc = p == 0 ? acc_hi[m][nt] : acc_lo[m][nt];
                        x3_mma(acc, a0.x, a1.x, a0.y, a1.y, wv[c][nt].x, wv[c][nt].y);
                        x3_mma(acc, a0.z, a1.z, a0.w, a1.w, wv[c][nt].z, wv[c][nt].w);
                    }
                }
            }
        }
    }
    __syncthreads();  // the activations are read; their memory takes the partial tile
    // The partial tile, [row t][column], rows past the last m tile left unwritten (never read).
#pragma unroll
    for (int m = 0; m < 2; ++m) {
        if (2 * wm + m >= mtiles) break;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int col = col0 + nt * 8 + 2 * q4, t0 = (2 * wm + m) * 16 + g;
            red[t0 * X3_ROWS + col] = acc_hi[m][nt][0] + acc_lo[m][nt][0];
            red[t0 * X3_ROWS + col + 1] = acc_hi[m][nt][1] + acc_lo[m][nt][1];
            red[(t0 + 8) * X3_ROWS + col] = acc_hi[m][nt][2] + acc_lo[m][nt][2];
            red[(t0 + 8) * X3_ROWS + col + 1] = acc_hi[m][nt][3] + acc_lo[m][nt][3];
        }
    }
    x3_cluster_sync();
    // This block's share of the tile's outputs, summed over the S slices in order.
    const u32 rank = x3_cluster_rank();
    const int cols_out = EPI == EPI_SILU ? 64 : X3_ROWS;
    const int out_n = EPI == EPI_SILU ? half : N;
    const int total = T * cols_out, per = (total + S - 1) / S;
    const int end = (int)(rank + 1) * per < total ? (int)(rank + 1) * per : total;
    const u32 red_addr = act_addr;
    for (int idx = (int)rank * per + threadIdx.x; idx < end; idx += blockDim.x) {
        const int t = idx / cols_out, c = idx % cols_out;
        const int n = tile * cols_out + c;
        float va[8], vb[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) {
            va[q] = vb[q] = 0.0f;
            if (q < S) {
                va[q] = x3_ld_peer(red_addr + 4u * (u32)(t * X3_ROWS + c), (u32)q);
                if (EPI == EPI_SILU) vb[q] = x3_ld_peer(red_addr + 4u * (u32)(t * X3_ROWS + 64 + c), (u32)q);
            }
        }
        float a = 0.0f, b = 0.0f;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
            a += va[q];
            b += vb[q];
        }
        if (n < out_n) {
            const size_t o = (size_t)t * out_n + n;
            if (EPI == EPI_SILU) y[o] = silu(a) * b;
            else if (EPI == EPI_ADD) y[o] = residual[o] + a;
            else y[o] = a;
        }
    }
    // No block may leave while the others still read its tile.
    x3_cluster_sync();
#endif
}

#define X3_ENTRY(name, EPI)                                                                                    \
    extern "C" __global__ void __launch_bounds__(X3_WARPS * 32, 2)                                             \
        name(const bf16_t* parts, const bf16_t* w, const float* residual, float* y, int T, int K, int N, int kc) { \
        gemm_x3<EPI>(parts, w, residual, y, T, K, N, kc);                                                      \
    }

X3_ENTRY(gemm_x3_f32, EPI_NONE)
X3_ENTRY(gemm_x3_add_f32, EPI_ADD)
X3_ENTRY(gemm_x3_silu_mul_f32, EPI_SILU)
