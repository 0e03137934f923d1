// Prompt-sized products (more than 64 rows) on Hopper's warpgroup tensor-core instructions
// (wgmma; compiled for sm_90a and used only on compute capability 9.0, elsewhere cuBLAS runs
// them): y = epilogue(sum over p of X_p Wᵀ), where X_p are the three bf16 parts (hi, mid, lo) of
// the fp32 activations that the split kernel wrote, [3][T][K], and W [N][K] is bf16. It replaces
// a cuBLAS GEMM over the stacked parts, which wrote three [T][N] partial outputs, and the sum
// kernel that read them back: here the three parts accumulate in the same registers and the
// epilogue (residual add, SiLU·up) runs on them before the one store.
//
// Block: 128 rows x BN columns (BN = 128 or 256), two warpgroups of 64 rows. K advances in rounds
// of 64; a round's tiles (three A parts of 128 x 64 and B of BN x 64, bf16) land in shared memory
// by cp.async, in the 128-byte-swizzled K-major layout that wgmma reads through descriptors, with
// WG_STAGES(BN) rounds in flight. Per round each warpgroup issues 3 parts x 4 k-steps of
// m64nBNk16 into one accumulator. The weights' first rounds are requested before the PDL wait.
// With SILU the block's first BN/2 rows of B are gate rows n0.. and the rest the matching up rows
// N/2 + n0.., so one thread holds both accumulators of each of its outputs.

#define WG_BM 128
#define WG_BK 64
#define WG_THREADS 256
#define WG_EPI_STORE 0
#define WG_EPI_ADD 1
#define WG_EPI_SILU 2
// Dynamic shared memory per build: stages x (3 A tiles + the B tile) + 1 KiB to align the
// swizzle atoms (crates/cuda/src/lib.rs reads these two numbers).
#define WG_SMEM_N128 197632
#define WG_SMEM_N256 164864

template <int BN> struct WgShape {
    static constexpr int STAGES = BN == 256 ? 2 : 3;
    static constexpr int A_BYTES = WG_BM * WG_BK * 2;
    static constexpr int B_BYTES = BN * WG_BK * 2;
    static constexpr int STAGE_BYTES = 3 * A_BYTES + B_BYTES;
    static constexpr int SMEM = STAGES * STAGE_BYTES + 1024;
};
static_assert(WgShape<128>::SMEM == WG_SMEM_N128, "WG_SMEM_N128");
static_assert(WgShape<256>::SMEM == WG_SMEM_N256, "WG_SMEM_N256");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ void wg_copy16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void wg_copy_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_copy_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Byte offset of 16-byte chunk c of row r in a K-major tile of 64-element (128-byte) rows under
// the 128-byte swizzle: each row's chunks are permuted by the row's place in its 8-row atom.
__device__ __forceinline__ u32 wg_swizzle(int r, int c) { return (u32)(r * 128 + ((c ^ (r & 7)) << 4)); }

// The shared-memory matrix descriptor of a K-major, 128-byte-swizzled tile starting at `addr`
// (an atom-aligned tile, plus 32 bytes per k16 step): stride 1024 bytes between 8-row atoms;
// the leading offset is unused by this layout.
__device__ __forceinline__ unsigned long long wg_desc(u32 addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
           (1ull << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator reads or writes across the asynchronous products.
template <int R> __device__ __forceinline__ void wg_fence_acc(float (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D[64 x N] = A[64 x 16] · B[N x 16]ᵀ (+ D when `accumulate`; N = 128 or 256, by the
// accumulator's size), both operands K-major in shared memory.
__device__ __forceinline__ void wg_mma(float (&d)[64], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void wg_mma(float (&d)[128], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "setp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(a), "l"(b), "r"(accumulate));
}

// Round kb's weight tile: BN rows of 64 k, 16 bytes a copy, each thread a fixed chunk column.
template <int BN, int EPI>
__device__ __forceinline__ void wg_load_b(u32 stage, const bf16_t* __restrict__ w, int K, int N, int n0, int kb,
                                          int tid) {
    const int c = tid & 7;
#pragma unroll
    for (int i = 0; i < BN / 32; ++i) {
        const int r = (tid >> 3) + 32 * i;
        const int n = EPI == WG_EPI_SILU ? (r < BN / 2 ? n0 + r : N / 2 + n0 + r - BN / 2) : n0 + r;
        wg_copy16(stage + 3 * WgShape<BN>::A_BYTES + wg_swizzle(r, c), w + (size_t)n * K + kb * WG_BK + c * 8);
    }
}

// Round kb's three activation tiles (rows past T repeat row T - 1; their outputs are not stored).
template <int BN>
__device__ __forceinline__ void wg_load_a(u32 stage, const bf16_t* __restrict__ parts, int T, int K, int m0, int kb,
                                          int tid) {
    const int c = tid & 7;
#pragma unroll
    for (int i = 0; i < 12; ++i) {
        const int p = i / 4, r = (tid >> 3) + 32 * (i % 4);
        const int row = min(m0 + r, T - 1);
        wg_copy16(stage + p * WgShape<BN>::A_BYTES + wg_swizzle(r, c),
                  parts + ((size_t)p * T + row) * K + kb * WG_BK + c * 8);
    }
}

template <int BN, int EPI, bool SPLIT>
__device__ __forceinline__ void gemm_wgmma(const bf16_t* __restrict__ parts, const bf16_t* __restrict__ w,
                                           const float* __restrict__ residual, float* __restrict__ y, int T,
                                           int K, int N) {
    typedef WgShape<BN> S;
    extern __shared__ unsigned char wg_smem[];
    const u32 base = ((u32)__cvta_generic_to_shared(wg_smem) + 1023u) & ~1023u;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = warp >> 2;
    const int n0 = blockIdx.x * (EPI == WG_EPI_SILU ? BN / 2 : BN), m0 = blockIdx.y * WG_BM;
    const int rounds = K / WG_BK;

#pragma unroll
    for (int s = 0; s < S::STAGES - 1; ++s)
        if (s < rounds) wg_load_b<BN, EPI>(base + s * S::STAGE_BYTES, w, K, N, n0, s, tid);
    pdl_wait();
    pdl_launch_dependents();
#pragma unroll
    for (int s = 0; s < S::STAGES - 1; ++s) {
        if (s < rounds) wg_load_a<BN>(base + s * S::STAGE_BYTES, parts, T, K, m0, s, tid);
        wg_copy_commit();
    }

    // Set by their first products (no instruction outside the wgmma pipeline may write them).
    // SPLIT keeps the hi part's products in acc and the mid and lo parts' in acc_small: the
    // tensor cores truncate as they accumulate, relative to the accumulator's magnitude, so the
    // small parts summed on their own keep their bits (as cuBLAS's separate GEMMs do).
    float acc[BN / 2];
    float acc_small[SPLIT ? BN / 2 : 1];

    for (int kb = 0; kb < rounds; ++kb) {
        const u32 stage = base + (kb % S::STAGES) * S::STAGE_BYTES;
        wg_copy_wait<S::STAGES - 2>();
        // cp.async wrote through the generic proxy; wgmma reads through the async proxy.
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        wg_fence_acc(acc);
        wg_fence_acc(acc_small);
        wg_fence();
#pragma unroll
        for (int p = 2; p >= 0; --p) {
#pragma unroll
            for (int kk = 0; kk < WG_BK / 16; ++kk) {
                const u32 a = stage + p * S::A_BYTES + g * 64 * 128 + kk * 32;
                const u32 b = stage + 3 * S::A_BYTES + kk * 32;
                if constexpr (SPLIT) {
                    if (p > 0) wg_mma(acc_small, wg_desc(a), wg_desc(b), kb > 0 || p < 2 || kk > 0);
                    else wg_mma(acc, wg_desc(a), wg_desc(b), kb > 0 || kk > 0);
                } else {
                    wg_mma(acc, wg_desc(a), wg_desc(b), kb > 0 || p < 2 || kk > 0);
                }
            }
        }
        wg_commit();
        wg_fence_acc(acc);
        wg_fence_acc(acc_small);
        // Round kb - 1's products are done (in both warpgroups, after the barrier): its stage is free.
        wg_wait<1>();
        wg_fence_acc(acc);
        wg_fence_acc(acc_small);
        __syncthreads();
        const int next = kb + S::STAGES - 1;
        if (next < rounds) {
            const u32 ns = base + (next % S::STAGES) * S::STAGE_BYTES;
            wg_load_b<BN, EPI>(ns, w, K, N, n0, next, tid);
            wg_load_a<BN>(ns, parts, T, K, m0, next, tid);
        }
        wg_copy_commit();
    }
    wg_wait<0>();
    wg_fence_acc(acc);
    wg_fence_acc(acc_small);
    if constexpr (SPLIT) {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) acc[i] += acc_small[i];
    }

    // Accumulator layout: warp w of the warpgroup holds rows 16w + lane/4 and + 8; for each
    // 8-column group j, columns 8j + 2 (lane % 4) and + 1 (acc[4j..4j+1] row 0, acc[4j+2..] row 8).
    const int r0 = m0 + g * 64 + (warp & 3) * 16 + (lane >> 2), cq = (lane & 3) * 2;
    const int out_cols = EPI == WG_EPI_SILU ? N / 2 : N;
    constexpr int GROUPS = EPI == WG_EPI_SILU ? BN / 16 : BN / 8;
#pragma unroll
    for (int j = 0; j < GROUPS; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = r0 + 8 * h;
            if (row >= T) continue;
            const size_t o = (size_t)row * out_cols + n0 + 8 * j + cq;
            float2 v = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
            if (EPI == WG_EPI_ADD) {
                const float2 r = *reinterpret_cast<const float2*>(residual + o);
                v.x += r.x;
                v.y += r.y;
            } else if (EPI == WG_EPI_SILU) {
                const int u = 4 * (j + BN / 16) + 2 * h;
                v = make_float2(silu(v.x) * acc[u], silu(v.y) * acc[u + 1]);
            }
            *reinterpret_cast<float2*>(y + o) = v;
        }
    }
}

// Builds: _split_n128 (two accumulators), _n128 and _n256 (one).
#define WG_ENTRY(name, SUFFIX, BN, EPI, SPLIT)                                                               \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)                                             \
        name##SUFFIX(const bf16_t* parts, const bf16_t* w, const float* residual, float* y, int T, int K, int N) { \
        gemm_wgmma<BN, EPI, SPLIT>(parts, w, residual, y, T, K, N);                                        \
    }
#define WG_ENTRIES(name, EPI)                          \
    WG_ENTRY(name, _split_n128, 128, EPI, true)        \
    WG_ENTRY(name, _n128, 128, EPI, false)             \
    WG_ENTRY(name, _n256, 256, EPI, false)

WG_ENTRIES(wgmma_x3, WG_EPI_STORE)
WG_ENTRIES(wgmma_x3_add, WG_EPI_ADD)
WG_ENTRIES(wgmma_x3_silu_mul, WG_EPI_SILU)

#else
#error "gemm_wgmma.cu uses wgmma: compile it for sm_90a"
#endif
