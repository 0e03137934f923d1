// Prompt-sized products (more than 64 rows) on Hopper's warpgroup tensor-core instructions
// (wgmma; compiled for sm_90a and used only on compute capability 9.0, elsewhere cuBLAS runs
// them): y = epilogue(sum over p of X_p Wᵀ), where X_p are the PARTS bf16 parts of the fp32
// activations that the split kernel wrote, [PARTS][T][K] (three: hi, mid, lo, the fp32 operand
// exactly; two: hi and mid, to ~2^-18 of each element, for two thirds of the products), and W
// [N][K] is bf16. It replaces a cuBLAS GEMM over the stacked parts, which wrote a [T][N] partial
// output per part, and the sum kernel that read them back: here the parts accumulate in
// registers and the epilogue (residual add, SiLU·up) runs on them before the one store.
//
// Tile: 128 rows x 128 weight rows; a block (one an SM: the grid is at most the SM count) takes
// tile after tile, with two consumer warpgroups of 64 rows each and a producer warp. K advances
// in rounds of 64. One producer thread has the tensor-memory accelerator (TMA) copy a round's
// tiles (PARTS A tiles of 128 x 64 and B of 128 x 64, bf16) into one of the shared-memory stages
// (three of 64 KB with three parts, four of 48 KB with two), in the 128-byte-swizzled K-major
// layout that wgmma reads through descriptors; the copies complete the stage's "full" mbarrier
// by their byte count. The consumers wait on it, issue PARTS x 4 k-steps of m64n128k16, and once
// those have completed arrive on the stage's "empty" mbarrier, which the producer waits on
// before refilling it. No block-wide barrier runs in the loop, and the producer runs on into
// the next tile while the consumers store this one. (Producers issuing the copies as cp.async,
// one warp or a warpgroup of them, were slower than cuBLAS: docs/perf.md.) The hi part's products
// accumulate apart from the other parts': the tensor cores truncate as they accumulate, relative
// to the accumulator, and one accumulator for all three moved the synthetic 0.6B's logits 3.6x
// further from the reference (docs/perf.md).
// With SILU the block's first 64 rows of B are gate rows n0.. and the rest the matching up rows
// N/2 + n0.., so one thread holds both accumulators of each of its outputs.

#define WG_BM 128
#define WG_BN 128
#define WG_BK 64
#define WG_CONSUMERS 256
#define WG_THREADS 288
// One part's A tile, the B tile, in bytes.
#define WG_A_BYTES (WG_BM * WG_BK * 2)
#define WG_B_BYTES (WG_BN * WG_BK * 2)
// Dynamic shared memory: the stages + 1 KiB to align the swizzle atoms (crates/cuda/src/lib.rs).
#define WG_SMEM 197632
// A stage (PARTS A tiles + B) in bytes, and as many stages as the shared memory holds.
template <int PARTS> struct WgStages {
    static constexpr int BYTES = PARTS * WG_A_BYTES + WG_B_BYTES;
    static constexpr int COUNT = (WG_SMEM - 1024) / BYTES;
};
static_assert(WgStages<3>::COUNT == 3 && WgStages<2>::COUNT == 4, "stages");
static_assert(WgStages<3>::COUNT * WgStages<3>::BYTES + 1024 == WG_SMEM, "WG_SMEM");
static_assert(WgStages<2>::COUNT * WgStages<2>::BYTES + 1024 == WG_SMEM, "WG_SMEM");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// D[64 x 128] = A[64 x 16] · B[128 x 16]ᵀ (+ D when `accumulate`), both operands K-major in
// shared memory.
__device__ __forceinline__ void wg_mma(float (&d)[64], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" WG_ACC_REGS64 "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : WG_ACC_OPS64(d)
                 : "l"(a), "l"(b), "r"(accumulate));
}

// Round kb's weight tile: 128 rows (with SILU 64 gate rows and the matching 64 up rows).
template <int EPI, int PARTS>
__device__ __forceinline__ void wg_load_b(u32 stage, const TmaMap* w, int N, int n0, int kb, u32 bar) {
    const u32 dst = stage + PARTS * WG_A_BYTES;
    if (EPI == EPI_SILU) {
        tma_load_2d(dst, w, kb * WG_BK, n0, bar);
        tma_load_2d(dst + WG_B_BYTES / 2, w, kb * WG_BK, N / 2 + n0, bar);
    } else {
        tma_load_2d(dst, w, kb * WG_BK, n0, bar);
    }
}

// Round kb's PARTS activation tiles. The parts are one [PARTS T][K] tensor: a tile reaching past
// a part's last row reads the next part's first rows (or zeros past the last), whose outputs are
// not stored.
// (ROWS64: the map's boxes are 64 rows, the tile's only rows.)
template <int PARTS>
__device__ __forceinline__ void wg_load_a(u32 stage, const TmaMap* parts, int T, int m0, int kb, u32 bar) {
#pragma unroll
    for (int p = 0; p < PARTS; ++p) tma_load_2d(stage + p * WG_A_BYTES, parts, kb * WG_BK, p * T + m0, bar);
}

// The SiLU·up epilogue writing bf16 parts ([PARTS][T][out_cols] at `out`) for a tile's 64 output
// columns from n0: lane l holds, for rows r0 and r0 + 8 and each 8-column group j, the column
// pair 8j + 2 (l % 4) (gate in acc[4j..], up 32 floats on). Each part's pairs are transposed
// across the lane's quad, so that lane q stores whole groups q and q + 4 as 16 bytes.
template <int PARTS>
__device__ __forceinline__ void wg_store_silu_parts(const float (&acc)[64], bf16_t* __restrict__ out, int r0, int n0,
                                                    int T, int out_cols, int lane) {
    const size_t part = (size_t)T * out_cols;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = r0 + 8 * h;
#pragma unroll
        for (int blk = 0; blk < 8; blk += 4) {
            // m[p][jj]: part p of this lane's pair of group blk + jj.
            u32 m[3][4];
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
                const int j = blk + jj, u = 4 * (j + 8) + 2 * h;
                u32 parts[3];
                split_bf16x3_pair(silu(acc[4 * j + 2 * h]) * acc[u], silu(acc[4 * j + 2 * h + 1]) * acc[u + 1], parts);
#pragma unroll
                for (int p = 0; p < 3; ++p) m[p][jj] = parts[p];
            }
#pragma unroll
            for (int p = 0; p < PARTS; ++p) {
                quad_transpose(m[p], lane);
                if (row < T)
                    *reinterpret_cast<uint4*>(out + p * part + (size_t)row * out_cols + n0 + 8 * (blk + (lane & 3))) =
                        make_uint4(m[p][0], m[p][1], m[p][2], m[p][3]);
            }
        }
    }
}

// PARTS_OUT (with SILU): y is the PARTS bf16 parts of the output, [PARTS][T][N / 2], the next
// product's operand, instead of fp32 (no split pass between the two products).
// ROWS64 (T <= 64, EPI_NONE: the lm_head of a batched decode step): the tile's only 64 rows are
// read (the parts' map has 64-row boxes), and warpgroup g multiplies them by weight rows 64 g ..
// 64 g + 63 (m64n64k16), where the 128-row build multiplies 64 rows past T and re-reads twice the
// activations per weight byte.
template <int EPI, int PARTS, bool PARTS_OUT, bool ROWS64 = false>
__device__ __forceinline__ void gemm_wgmma(const TmaMap* parts, const TmaMap* w, const float* __restrict__ residual,
                                           float* __restrict__ y, int T, int K, int N, int col_blocks) {
    static_assert(!PARTS_OUT || EPI == EPI_SILU, "parts out with SiLU only");
    static_assert(!ROWS64 || (EPI == EPI_NONE && !PARTS_OUT), "the 64-row build stores only");
    constexpr int NACC = ROWS64 ? 32 : 64;
    // A stage's bytes in flight: the parts' boxes are half as tall in the 64-row build.
    constexpr u32 STAGE_TX = PARTS * (ROWS64 ? WG_A_BYTES / 2 : WG_A_BYTES) + WG_B_BYTES;
    constexpr int WG_STAGES = WgStages<PARTS>::COUNT, WG_STAGE_BYTES = WgStages<PARTS>::BYTES;
    constexpr int COLS = EPI == EPI_SILU ? WG_BN / 2 : WG_BN;  // output columns of a tile
    extern __shared__ unsigned char wg_smem[];
    __shared__ __align__(8) unsigned long long full[WG_STAGES], empty[WG_STAGES];
    const u32 base = ((u32)__cvta_generic_to_shared(wg_smem) + 1023u) & ~1023u;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int rounds = K / WG_BK, tiles = col_blocks * ((T + WG_BM - 1) / WG_BM);
    const u32 full0 = (u32)__cvta_generic_to_shared(full), empty0 = (u32)__cvta_generic_to_shared(empty);
    if (tid == 0) {
        for (int s = 0; s < WG_STAGES; ++s) {
            mbar_init(full0 + 8 * s, 1);                   // the producer, with the stage's bytes
            mbar_init(empty0 + 8 * s, WG_CONSUMERS / 32);  // each consumer warp, its products done
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    // Persistent: block b takes tiles b, b + grid, ... (tile = row block x col_blocks + column
    // block, so the blocks at work share rows of the activations), and the stages run on across
    // tiles: round r of the block's whole sequence uses stage r % WG_STAGES, whose barriers are
    // in phase (r / WG_STAGES) & 1. The producer thus fills the next tile's first stages while
    // the consumers run this tile's epilogue.
    if (tid >= WG_CONSUMERS) {
        if (tid == WG_CONSUMERS) {
            // The producer. The weights of the first rounds do not depend on earlier kernels.
            const int first_n0 = (int)(blockIdx.x % col_blocks) * COLS;
            for (int s = 0; s < WG_STAGES && s < rounds; ++s) {
                mbar_arrive_expect(full0 + 8 * s, STAGE_TX);
                wg_load_b<EPI, PARTS>(base + s * WG_STAGE_BYTES, w, N, first_n0, s, full0 + 8 * s);
            }
            pdl_wait();
            pdl_launch_dependents();
            int round = 0;
            for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
                const int n0 = (tile % col_blocks) * COLS, m0 = (tile / col_blocks) * WG_BM;
                for (int kb = 0; kb < rounds; ++kb, ++round) {
                    const int s = round % WG_STAGES;
                    const u32 stage = base + s * WG_STAGE_BYTES, full = full0 + 8 * s;
                    if (tile != (int)blockIdx.x || kb >= WG_STAGES) {  // not issued before the wait
                        if (round >= WG_STAGES) mbar_wait(empty0 + 8 * s, (u32)((round / WG_STAGES - 1) & 1));
                        mbar_arrive_expect(full, STAGE_TX);
                        wg_load_b<EPI, PARTS>(stage, w, N, n0, kb, full);
                    }
                    wg_load_a<PARTS>(stage, parts, T, m0, kb, full);
                }
            }
        }
        return;
    }

    // The consumers: warpgroup g takes rows 64g..64g+63 of each tile. Both accumulators are set
    // by their tile's first products (no instruction outside the wgmma pipeline may write them).
    const int g = warp >> 2;
    pdl_wait();
    float acc[NACC], acc_small[NACC];
    int round = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int n0 = (tile % col_blocks) * COLS, m0 = (tile / col_blocks) * WG_BM;
        for (int kb = 0; kb < rounds; ++kb, ++round) {
            const int s = round % WG_STAGES;
            const u32 stage = base + s * WG_STAGE_BYTES;
            mbar_wait(full0 + 8 * s, (u32)((round / WG_STAGES) & 1));
            wg_fence_acc(acc);
            wg_fence_acc(acc_small);
            wg_fence();
#pragma unroll
            for (int p = PARTS - 1; p >= 0; --p) {
#pragma unroll
                for (int kk = 0; kk < WG_BK / 16; ++kk) {
                    if constexpr (ROWS64) {
                        const u32 a = stage + p * WG_A_BYTES + kk * 32;
                        const u32 b = stage + PARTS * WG_A_BYTES + g * 64 * 128 + kk * 32;
                        if (p > 0) wg_mma_n64(acc_small, wg_desc(a), wg_desc(b), kb > 0 || p < PARTS - 1 || kk > 0);
                        else wg_mma_n64(acc, wg_desc(a), wg_desc(b), kb > 0 || kk > 0);
                    } else {
                        const u32 a = stage + p * WG_A_BYTES + g * 64 * 128 + kk * 32;
                        const u32 b = stage + PARTS * WG_A_BYTES + kk * 32;
                        if (p > 0) wg_mma(acc_small, wg_desc(a), wg_desc(b), kb > 0 || p < PARTS - 1 || kk > 0);
                        else wg_mma(acc, wg_desc(a), wg_desc(b), kb > 0 || kk > 0);
                    }
                }
            }
            wg_commit();
            wg_fence_acc(acc);
            wg_fence_acc(acc_small);
            // The previous round's products have completed: its stage goes back to the producer.
            wg_wait<1>();
            wg_fence_acc(acc);
            wg_fence_acc(acc_small);
            if (kb > 0 && lane == 0) mbar_arrive(empty0 + 8 * ((round - 1) % WG_STAGES));
        }
        wg_wait<0>();
        wg_fence_acc(acc);
        wg_fence_acc(acc_small);
        // The tile's last stage goes back too, before the epilogue.
        if (lane == 0) mbar_arrive(empty0 + 8 * ((round - 1) % WG_STAGES));
#pragma unroll
        for (int i = 0; i < NACC; ++i) acc[i] += acc_small[i];

        if constexpr (ROWS64) {
            // Warp w of warpgroup g: rows 16 w + lane / 4 (+ 8) of columns n0 + 64 g + 8 j + 2 (lane % 4) (+ 1).
            const int r0 = (warp & 3) * 16 + (lane >> 2), c0 = n0 + g * 64 + (lane & 3) * 2;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = r0 + 8 * h;
                    if (row < T)
                        *reinterpret_cast<float2*>(y + (size_t)row * N + c0 + 8 * j) =
                            make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
                }
            }
        } else {
        // Accumulator layout: warp w of the warpgroup holds rows 16w + lane/4 and + 8; for each
        // 8-column group j, columns 8j + 2 (lane % 4) and + 1 (acc[4j..4j+1] row 0, acc[4j+2..] row 8).
        const int r0 = m0 + g * 64 + (warp & 3) * 16 + (lane >> 2), cq = (lane & 3) * 2;
        const int out_cols = EPI == EPI_SILU ? N / 2 : N;
        if (PARTS_OUT) {
            wg_store_silu_parts<PARTS>(acc, reinterpret_cast<bf16_t*>(y), r0, n0, T, out_cols, lane);
            continue;
        }
        constexpr int GROUPS = EPI == EPI_SILU ? WG_BN / 16 : WG_BN / 8;
#pragma unroll
        for (int j = 0; j < GROUPS; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = r0 + 8 * h;
                if (row >= T) continue;
                const size_t o = (size_t)row * out_cols + n0 + 8 * j + cq;
                float2 v = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
                if (EPI == EPI_ADD) {
                    const float2 r = *reinterpret_cast<const float2*>(residual + o);
                    v.x += r.x;
                    v.y += r.y;
                } else if (EPI == EPI_SILU) {
                    const int u = 4 * (j + WG_BN / 16) + 2 * h;
                    v = make_float2(silu(v.x) * acc[u], silu(v.y) * acc[u + 1]);
                }
                *reinterpret_cast<float2*>(y + o) = v;
            }
        }
        }
    }
}

#define WG_ENTRY(name, EPI, PARTS, PARTS_OUT, ROWS64)                                                        \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)                                             \
        name(const __grid_constant__ TmaMap parts, const __grid_constant__ TmaMap w, const float* residual,  \
             float* y, int T, int K, int N, int col_blocks) {                                               \
        gemm_wgmma<EPI, PARTS, PARTS_OUT, ROWS64>(&parts, &w, residual, y, T, K, N, col_blocks);           \
    }

WG_ENTRY(wgmma_x3, EPI_NONE, 3, false, false)
WG_ENTRY(wgmma_x3_add, EPI_ADD, 3, false, false)
WG_ENTRY(wgmma_x3_silu_mul, EPI_SILU, 3, false, false)
WG_ENTRY(wgmma_x3_silu_mul_parts, EPI_SILU, 3, true, false)
WG_ENTRY(wgmma_x2, EPI_NONE, 2, false, false)
WG_ENTRY(wgmma_x2_add, EPI_ADD, 2, false, false)
WG_ENTRY(wgmma_x2_silu_mul, EPI_SILU, 2, false, false)
WG_ENTRY(wgmma_x2_silu_mul_parts, EPI_SILU, 2, true, false)
WG_ENTRY(wgmma_x3_rows64, EPI_NONE, 3, false, true)
WG_ENTRY(wgmma_x2_rows64, EPI_NONE, 2, false, true)

#else
#error "gemm_wgmma.cu uses wgmma: compile it for sm_90a"
#endif
