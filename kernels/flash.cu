// Prompt attention that keeps its scores on chip (FlashAttention-style), in fp32 FMAs: the same
// numbers as the fp32 SGEMM path it replaces (crates/cuda/src/lib.rs, `attention_flash`), without
// writing, re-reading and rewriting the [heads, rows, keys] score matrix, and with the causal mask
// skipping whole key tiles instead of whole 512-row chunks. Exactness is the point: bf16 tensor
// cores over split operands were as fast as the SGEMMs but their truncating accumulation moved the
// synthetic 0.6B's logits 3x further from the reference (docs/perf.md), so the products stay on
// the CUDA cores, register-tiled like an SGEMM.
//
// Two kernels per launch group of sequences (`desc` row s = row0, len, start_pos, key offset):
//   flash_gather_kv: each sequence's keys as kt [KV][d][Kp] (transposed, so a key tile is d
//     contiguous runs of 64 floats) and its values as vt [KV][Kp][d], fp32, zero past its keys;
//     from the paged cache (fp32 or bf16). Kp = the group's keys, each sequence's rounded up to 64.
//   flash_prefill_d{32,64,128}: a block per (KV head, sequence, tile of 128 query rows). The rows
//     are the sequence's tokens times the G query heads that share the KV head, token-major (row
//     = token * G + g), so a tile covers 128 / G consecutive tokens and needs keys only up to its
//     last token's position. Heaviest tiles (latest tokens) launch first.
// Per key tile of 64: S = Q Kᵀ (128 x 64, a thread 8 rows x 4 keys), online softmax per row (max
// and sum across the 16 threads that share a row), P to shared memory, O += P V (a thread 8 rows x
// DP/16 dims). K of the next tile streams in (cp.async) during P V, V of the next during the next
// S. exp2 with log2(e) folded into the scale, as in the other attention kernels.

#define FA_THREADS 256
#define FA_PSTRIDE (FA_ROWS + 4)

__device__ __forceinline__ void fa_copy16(float* dst, const float* src) {
#if __CUDA_ARCH__ >= 800
    const u32 d = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
#else
    *reinterpret_cast<float4*>(dst) = *reinterpret_cast<const float4*>(src);
#endif
}
__device__ __forceinline__ void fa_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Waits until at most `N` of this thread's committed copy groups are in flight.
template <int N> __device__ __forceinline__ void fa_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// grid = (ceil(max padded keys / 32), KV, sequences), block = 256; d <= 128.
template <typename KT>
__device__ void flash_gather_kv(const KT* __restrict__ kc, const KT* __restrict__ vc, const u32* __restrict__ tables,
                                int max_blocks, int block_size, const u32* __restrict__ desc, int koff0, int KV, int d,
                                int Kp, float* __restrict__ kt, float* __restrict__ vt) {
    pdl_begin();
    __shared__ float tile[32][129];
    const int s = blockIdx.z, kv = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j0 = blockIdx.x * 32;
    int keys, koff;
    if (!fa_seq_keys(desc, koff0, j0, keys, koff)) return;
    const u32* table = tables + (size_t)s * max_blocks;
    for (int jj = warp; jj < 32; jj += FA_THREADS / 32) {
        const int j = j0 + jj;
        float* vrow = vt + ((size_t)kv * Kp + koff + j) * d;
        if (j < keys) {
            const size_t src = cache_slot(table, block_size, j) * KV * d + (size_t)kv * d;
            for (int c = lane; c < d; c += 32) {
                tile[jj][c] = kv_load(kc + src + c);
                vrow[c] = kv_load(vc + src + c);
            }
        } else {
            for (int c = lane; c < d; c += 32) {
                tile[jj][c] = 0.0f;
                vrow[c] = 0.0f;
            }
        }
    }
    __syncthreads();
    for (int c = warp; c < d; c += FA_THREADS / 32) kt[((size_t)kv * d + c) * Kp + koff + j0 + lane] = tile[lane][c];
}

// Dynamic shared memory: Qt [DP][128], Kt [DP][64], V [64][DP + 4], Pt [64][128 + 4] floats.
// q and out are [T, H d]; d <= DP, d % 4 == 0. grid = (KV, sequences, most tiles of a sequence),
// block = 256.
template <int DP>
__device__ void flash_prefill(const float* __restrict__ q, const float* __restrict__ kt, const float* __restrict__ vt,
                              float* __restrict__ out, const u32* __restrict__ desc, int koff0, int H, int KV, int d,
                              int Kp, float scale_log2) {
    constexpr int DV = DP / 16;
    constexpr int VSTRIDE = DP + 4;
    extern __shared__ float4 fa_smem[];
    float* Qt = reinterpret_cast<float*>(fa_smem);
    float* Ks = Qt + DP * FA_ROWS;
    float* Vs = Ks + DP * FA_KEYS;
    float* Pt = Vs + FA_KEYS * VSTRIDE;
    pdl_begin();
    FaTile tile;
    if (!fa_tile(desc, koff0, H, KV, tile)) return;
    const auto [kv, G, row0, n, pos0, koff, rows, base, keys, ntiles] = tile;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const float* kbase = kt + (size_t)kv * d * Kp + koff;
    const float* vbase = vt + ((size_t)kv * Kp + koff) * d;
    const int quads = d / 4;

    auto load_k = [&](int k0) {
        for (int i = tid; i < d * (FA_KEYS / 4); i += FA_THREADS) {
            const int c = i / (FA_KEYS / 4), ch = i % (FA_KEYS / 4);
            fa_copy16(Ks + c * FA_KEYS + ch * 4, kbase + (size_t)c * Kp + k0 + ch * 4);
        }
    };
    auto load_v = [&](int k0) {
        for (int i = tid; i < FA_KEYS * quads; i += FA_THREADS) {
            const int j = i / quads, ch = i % quads;
            fa_copy16(Vs + j * VSTRIDE + ch * 4, vbase + (size_t)(k0 + j) * d + ch * 4);
        }
    };
    load_k(0);
    fa_commit();
    load_v(0);
    fa_commit();
    // Q transposed, lanes over rows (conflict-free stores). Rows past the sequence repeat its
    // last row, so every row has finite scores; they are not written.
    for (int i = tid; i < FA_ROWS * quads; i += FA_THREADS) {
        const int sr = i % FA_ROWS, ch = i / FA_ROWS;
        const int row = min(base + sr, rows - 1), t = row / G, g = row % G;
        const float4 v = *reinterpret_cast<const float4*>(q + (size_t)(row0 + t) * H * d + (size_t)(kv * G + g) * d + ch * 4);
        Qt[(ch * 4 + 0) * FA_ROWS + sr] = v.x;
        Qt[(ch * 4 + 1) * FA_ROWS + sr] = v.y;
        Qt[(ch * 4 + 2) * FA_ROWS + sr] = v.z;
        Qt[(ch * 4 + 3) * FA_ROWS + sr] = v.w;
    }

    int lim[8];  // the last key each of this thread's rows may see (its token's position)
    float m[8], l[8], o[8][DV];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        lim[i] = pos0 + min(base + ty * 8 + i, rows - 1) / G;
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int e = 0; e < DV; ++e) o[i][e] = 0.0f;
    }

    for (int kt_i = 0; kt_i < ntiles; ++kt_i) {
        const int k0 = kt_i * FA_KEYS;
        fa_wait<1>();  // this tile's K (its V may still be in flight)
        __syncthreads();
        float sc[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) sc[i][j] = 0.0f;
#pragma unroll 4
        for (int c = 0; c < d; ++c) {
            const float4 qa = *reinterpret_cast<const float4*>(Qt + c * FA_ROWS + ty * 8);
            const float4 qb = *reinterpret_cast<const float4*>(Qt + c * FA_ROWS + ty * 8 + 4);
            const float4 kk = *reinterpret_cast<const float4*>(Ks + c * FA_KEYS + tx * 4);
            const float qv[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
            const float kv4[4] = {kk.x, kk.y, kk.z, kk.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) sc[i][j] = fmaf(qv[i], kv4[j], sc[i][j]);
        }
        // Online softmax; a row's 64 keys are spread over the 16 threads of a half-warp.
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (k0 + tx * 4 + j > lim[i]) sc[i][j] = -INFINITY;
                mx = fmaxf(mx, sc[i][j]);
            }
#pragma unroll
            for (int w = 1; w < 16; w <<= 1) mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, w));
            // Key 0 is in the first tile and visible to every row, so mnew is finite.
            const float mnew = fmaxf(m[i], mx);
            const float alpha = exp2f((m[i] - mnew) * scale_log2);
            float rs = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                sc[i][j] = exp2f((sc[i][j] - mnew) * scale_log2);
                rs += sc[i][j];
            }
#pragma unroll
            for (int w = 1; w < 16; w <<= 1) rs += __shfl_xor_sync(FULL_MASK, rs, w);
            l[i] = l[i] * alpha + rs;
            m[i] = mnew;
#pragma unroll
            for (int e = 0; e < DV; ++e) o[i][e] *= alpha;
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float* dst = Pt + (tx * 4 + j) * FA_PSTRIDE + ty * 8;
            *reinterpret_cast<float4*>(dst) = make_float4(sc[0][j], sc[1][j], sc[2][j], sc[3][j]);
            *reinterpret_cast<float4*>(dst + 4) = make_float4(sc[4][j], sc[5][j], sc[6][j], sc[7][j]);
        }
        fa_wait<0>();  // this tile's V
        __syncthreads();  // P and V visible; every thread is done with K
        if (kt_i + 1 < ntiles) load_k(k0 + FA_KEYS);
        fa_commit();
        const int kend = min(FA_KEYS, keys - k0);  // later keys are masked for every row
#pragma unroll 4
        for (int j = 0; j < kend; ++j) {
            const float4 pa = *reinterpret_cast<const float4*>(Pt + j * FA_PSTRIDE + ty * 8);
            const float4 pb = *reinterpret_cast<const float4*>(Pt + j * FA_PSTRIDE + ty * 8 + 4);
            const float p[8] = {pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w};
            float v[DV];
            if constexpr (DV % 4 == 0) {
#pragma unroll
                for (int e = 0; e < DV; e += 4) {
                    const float4 vv = *reinterpret_cast<const float4*>(Vs + j * VSTRIDE + tx * DV + e);
                    v[e] = vv.x;
                    v[e + 1] = vv.y;
                    v[e + 2] = vv.z;
                    v[e + 3] = vv.w;
                }
            } else {
#pragma unroll
                for (int e = 0; e < DV; e += 2) {
                    const float2 vv = *reinterpret_cast<const float2*>(Vs + j * VSTRIDE + tx * DV + e);
                    v[e] = vv.x;
                    v[e + 1] = vv.y;
                }
            }
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int e = 0; e < DV; ++e) o[i][e] = fmaf(p[i], v[e], o[i][e]);
        }
        __syncthreads();  // every thread is done with P and V
        if (kt_i + 1 < ntiles) load_v(k0 + FA_KEYS);
        fa_commit();
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int row = base + ty * 8 + i;
        if (row >= rows) continue;
        const int t = row / G, g = row % G;
        float* dst = out + (size_t)(row0 + t) * H * d + (size_t)(kv * G + g) * d;
#pragma unroll
        for (int e = 0; e < DV; ++e)
            if (tx * DV + e < d) dst[tx * DV + e] = o[i][e] / l[i];
    }
}

#define FLASH_GATHER_ENTRY(KT, SUFFIX)                                                                            \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_gather_kv_##SUFFIX(                             \
        const KT* kc, const KT* vc, const u32* tables, int max_blocks, int block_size, const u32* desc, int koff0,  \
        int KV, int d, int Kp, float* kt, float* vt) {                                                             \
        flash_gather_kv<KT>(kc, vc, tables, max_blocks, block_size, desc, koff0, KV, d, Kp, kt, vt);             \
    }
FLASH_GATHER_ENTRY(float, kvf32)
FLASH_GATHER_ENTRY(bf16_t, kvbf16)

#define FLASH_ENTRY(DP)                                                                                            \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 1) flash_prefill_d##DP(                              \
        const float* q, const float* kt, const float* vt, float* out, const u32* desc, int koff0, int H, int KV,  \
        int d, int Kp, float scale_log2) {                                                                         \
        flash_prefill<DP>(q, kt, vt, out, desc, koff0, H, KV, d, Kp, scale_log2);                                 \
    }
FLASH_ENTRY(32)
FLASH_ENTRY(64)
FLASH_ENTRY(128)

// ---------------------------------------------------------------------------------------------
// The same attention on the tensor cores, fp32-accurate by 3xTF32: every operand x is split into
// big = tf32(x) and small = tf32(x - big) (x to ~2^-22), and each product is big·big + big·small +
// small·big (mma.m16n8k8 tf32, fp32 accumulate), the dropped small·small being ~2^-22 of it. The
// tensor cores truncate as they accumulate, so no sum runs long inside them: the scores of a key
// tile are collected from 32-wide slices of the head dimension, and P·V of each key tile starts
// from zero and joins the running output as O = O·alpha + tile (fp32 FMAs, round to nearest).
//
// Layouts (chosen so every fragment is one conflict-free shared-memory load):
//   keys, per key: for each 8-wide slice of d, lane t's {big, small} of dims t and t + 4
//     (flash_tc_gather_kv writes them, tf32-rounded, [KV][Kp][2 DP]);
//   values, per 8-key block: for each dim, lane t's {big, small} of keys 2t and 2t + 1, the A
//     operand's column t taking key 2t and column t + 4 key 2t + 1 (a sum's order is free; this
//     one lets the score fragments be P's A fragments as they are) ([KV][Kp / 8][DP][16]);
//   q in shared memory as fp32 with each 8-wide slice ordered t, t + 4 (one 8-byte load for a0,
//     a2), split as used.
// Block = 8 warps over 128 query rows (warp w rows 16w..16w + 15), 64-key tiles; K of the next
// tile streams in during P·V, V during the next scores, as in flash_prefill.

__device__ __forceinline__ u32 tf32_bits(float x) {
    u32 r;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
#else
    r = __float_as_uint(x) & 0xffffe000u;
#endif
    return r;
}

__device__ __forceinline__ void tf32_split(float x, u32& big, u32& small) {
    big = tf32_bits(x);
    small = tf32_bits(x - __uint_as_float(big));
}

// c += a · b for one m16n8 tile, fp32 accumulate: NAME issues INSTR (an mma.sync of 4 A and 2 B
// registers). Not volatile: the compiler may interleave independent products (a chain of
// dependent mma instructions into one accumulator stalls on each one's latency).
#if __CUDA_ARCH__ >= 800
#define FA_MMA(NAME, INSTR)                                                                          \
    __device__ __forceinline__ void NAME(float c[4], const u32 a[4], u32 b0, u32 b1) {               \
        asm(INSTR " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                         \
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                        \
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                        \
    }
#else
#define FA_MMA(NAME, INSTR) \
    __device__ __forceinline__ void NAME(float c[4], const u32 a[4], u32 b0, u32 b1) { __trap(); }
#endif
FA_MMA(mma_tf32, "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32")
FA_MMA(mma_f16, "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32")

// c[i] += a · b[i] for N n-tiles, a and each b given as (big, small) tf32 parts (b as {b0 big,
// b0 small, b1 big, b1 small}): three products each, the small ones first, issued product by
// product across the n-tiles so that no two in a row share an accumulator.
template <int N>
__device__ __forceinline__ void mma_3xtf32(float (*c)[4], const u32 ab[4], const u32 as[4], const float4* b) {
#pragma unroll
    for (int i = 0; i < N; ++i) mma_tf32(c[i], as, __float_as_uint(b[i].x), __float_as_uint(b[i].z));
#pragma unroll
    for (int i = 0; i < N; ++i) mma_tf32(c[i], ab, __float_as_uint(b[i].y), __float_as_uint(b[i].w));
#pragma unroll
    for (int i = 0; i < N; ++i) mma_tf32(c[i], ab, __float_as_uint(b[i].x), __float_as_uint(b[i].z));
}

// The H16 build's scores use fp16 tensor cores (twice tf32's rate, half its operand bytes): q and
// k rows are scaled by powers of two that bring each row's largest element into [2^14, 2^15)
// (fp16's normal range, whatever the norm gains), split into hi = fp16(x) and lo = fp16(x - hi)
// (x to ~2^-22 of its row's largest element), and each score is the three products' sum times
// the two rows' scales (exact). Values have no norm to bound them: the H16 build keeps P·V in
// 3xTF32; the HH build (the default where flash_wgmma.cu does not run) scales each column of a
// 64-key tile instead (flash_hh_gather_v), so its P·V runs on fp16 too, P (in [0, 1]) split as
// it is, and each tile's sum takes the columns' scales back.

// c[i] += a · b[i] for N n-tiles from fp16 (hi, lo) parts (b as {b0 hi, b1 hi, b0 lo, b1 lo}):
// lo·hi, hi·lo, then hi·hi, product by product across the n-tiles.
template <int N>
__device__ __forceinline__ void mma_3xf16(float (*c)[4], const u32 ah[4], const u32 al[4], const uint4* b) {
#pragma unroll
    for (int i = 0; i < N; ++i) mma_f16(c[i], al, b[i].x, b[i].y);
#pragma unroll
    for (int i = 0; i < N; ++i) mma_f16(c[i], ah, b[i].z, b[i].w);
#pragma unroll
    for (int i = 0; i < N; ++i) mma_f16(c[i], ah, b[i].x, b[i].y);
}

// grid = (max padded keys / 8, KV, sequences), block = 256: one 8-key block of one KV head.
// H16: keys as scaled fp16 parts, [KV][Kp][DP] words (for each 16-wide slice of d, lane t's
// {hi(2t, 2t+1), hi(2t+8, 2t+9), lo(2t, 2t+1), lo(2t+8, 2t+9)}), then each key's scale
// ([KV][Kp] floats, the factor its scores take back).
template <typename KT, int DP, int MODE>
__device__ void flash_tc_gather_kv(const KT* __restrict__ kc, const KT* __restrict__ vc, const u32* __restrict__ tables,
                                   int max_blocks, int block_size, const u32* __restrict__ desc, int koff0, int KV,
                                   int d, int Kp, float* __restrict__ ks, float* __restrict__ vs) {
    pdl_begin();
    __shared__ float kt[8][DP], vt[8][DP];
    const int s = blockIdx.z, kv = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j0 = blockIdx.x * 8;
    int keys, koff;
    if (!fa_seq_keys(desc, koff0, j0, keys, koff)) return;
    constexpr bool H16 = MODE >= 1;
    const u32* table = tables + (size_t)s * max_blocks;
    {
        const int j = j0 + warp;  // 8 warps, a key each
        const size_t src = j < keys
            ? cache_slot(table, block_size, j) * KV * d + (size_t)kv * d
            : 0;
        for (int c = lane; c < DP; c += 32) {
            const bool in = j < keys && c < d;
            kt[warp][c] = in ? kv_load(kc + src + c) : 0.0f;
            vt[warp][c] = in ? kv_load(vc + src + c) : 0.0f;
        }
    }
    __syncthreads();
    if constexpr (H16) {
        __shared__ float kscale[8];
        {
            float m = 0.0f;
            for (int c = lane; c < DP; c += 32) m = fmaxf(m, fabsf(kt[warp][c]));
            m = warp_max(m);
            if (lane == 0) {
                const float sc = fp16_row_scale(m);
                kscale[warp] = sc;
                ks[(size_t)KV * Kp * DP + (size_t)kv * Kp + koff + j0 + warp] = 1.0f / sc;
            }
        }
        __syncthreads();
        u32* kdst = reinterpret_cast<u32*>(ks) + ((size_t)kv * Kp + koff + j0) * DP;
        for (int i = threadIdx.x; i < 8 * (DP / 4); i += FA_THREADS) {
            const int key = i / (DP / 4), r = i % (DP / 4), c = (r / 4) * 16 + (r % 4) * 2;
            const float sc = kscale[key];
            uint4 w;
            half2_split(kt[key][c] * sc, kt[key][c + 1] * sc, w.x, w.z);
            half2_split(kt[key][c + 8] * sc, kt[key][c + 9] * sc, w.y, w.w);
            *reinterpret_cast<uint4*>(kdst + key * DP + r * 4) = w;
        }
    } else {
        float* kdst = ks + ((size_t)kv * Kp + koff + j0) * 2 * DP;
        for (int i = threadIdx.x; i < 8 * DP; i += FA_THREADS) {
            const int key = i / DP, c = i % DP;
            u32 big, small;
            tf32_split(kt[key][c], big, small);
            const int pos = (c / 8) * 16 + (c % 4) * 4 + ((c % 8) / 4) * 2;
            *reinterpret_cast<float2*>(kdst + key * 2 * DP + pos) =
                make_float2(__uint_as_float(big), __uint_as_float(small));
        }
    }
    if constexpr (MODE == 2) return;  // values: flash_hh_gather_v
    float* vdst = vs + ((size_t)kv * Kp + koff + j0) * 2 * DP;
    for (int i = threadIdx.x; i < 4 * DP; i += FA_THREADS) {
        const int c = i / 4, t = i % 4;
        u32 b0, s0, b1, s1;
        tf32_split(vt[2 * t][c], b0, s0);
        tf32_split(vt[2 * t + 1][c], b1, s1);
        *reinterpret_cast<float4*>(vdst + c * 16 + t * 4) =
            make_float4(__uint_as_float(b0), __uint_as_float(s0), __uint_as_float(b1), __uint_as_float(s1));
    }
}

// flash_hh's values: grid = (max padded keys / 64, KV, sequences), block = 256: one key tile of
// one KV head. Each column of the tile is scaled by the power of two that brings its largest
// magnitude into [2^14, 2^15) (kept as the factor to take back, [KV][Kp / 64][DP] after the
// parts) and split into two fp16 parts; per 16 keys and dim, lane t's {hi(2t, 2t+1),
// hi(2t+8, 2t+9), lo(...), lo(...)} ([KV][Kp][DP] words).
template <typename KT, int DP>
__device__ void flash_hh_gather_v(const KT* __restrict__ vc, const u32* __restrict__ tables, int max_blocks,
                                  int block_size, const u32* __restrict__ desc, int koff0, int KV, int d, int Kp,
                                  float* __restrict__ vs) {
    pdl_begin();
    __shared__ float vt[FA_KEYS][DP];
    __shared__ float colmax[8][DP];
    __shared__ float colscale[DP];
    const int s = blockIdx.z, kv = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j0 = blockIdx.x * FA_KEYS;
    int keys, koff;
    if (!fa_seq_keys(desc, koff0, j0, keys, koff)) return;
    const u32* table = tables + (size_t)s * max_blocks;
    for (int c = lane; c < DP; c += 32) colmax[warp][c] = 0.0f;
    for (int key = warp; key < FA_KEYS; key += 8) {
        const int j = j0 + key;
        const size_t src = j < keys ? cache_slot(table, block_size, j) * KV * d + (size_t)kv * d : 0;
        for (int c = lane; c < DP; c += 32) {
            const float v = j < keys && c < d ? kv_load(vc + src + c) : 0.0f;
            vt[key][c] = v;
            colmax[warp][c] = fmaxf(colmax[warp][c], fabsf(v));
        }
    }
    __syncthreads();
    if (threadIdx.x < DP) {
        float m = 0.0f;
        for (int w = 0; w < 8; ++w) m = fmaxf(m, colmax[w][threadIdx.x]);
        const float sc = fp16_row_scale(m);
        colscale[threadIdx.x] = sc;
        vs[(size_t)KV * Kp * DP + ((size_t)kv * (Kp / FA_KEYS) + (koff + j0) / FA_KEYS) * DP + threadIdx.x] = 1.0f / sc;
    }
    __syncthreads();
    u32* vdst = reinterpret_cast<u32*>(vs) + ((size_t)kv * Kp + koff + j0) * DP;
    for (int i = threadIdx.x; i < (FA_KEYS / 16) * DP * 4; i += FA_THREADS) {
        const int t = i % 4, c = (i / 4) % DP, b = i / (4 * DP), k = b * 16 + 2 * t;
        const float sc = colscale[c];
        uint4 w;
        half2_split(vt[k][c] * sc, vt[k + 1][c] * sc, w.x, w.z);
        half2_split(vt[k + 8][c] * sc, vt[k + 9][c] * sc, w.y, w.w);
        *reinterpret_cast<uint4*>(vdst + (size_t)b * 16 * DP + (c * 4 + t) * 4) = w;
    }
}

// Dynamic shared memory: q [128][DP + 8], K [64][2 DP + 16], V [64 / 8][DP][16] floats; H16: K
// [64][DP + 16] words, then the key scales [64] and the q rows' scales [128].
// grid = (KV, sequences, most tiles of a sequence), block = 256.
template <int DP, int MODE>
__device__ void flash_tc_prefill(const float* __restrict__ q, const float* __restrict__ ksplit,
                                 const float* __restrict__ vsplit, float* __restrict__ out, const u32* __restrict__ desc,
                                 int koff0, int H, int KV, int d, int Kp, float scale_log2) {
    constexpr bool H16 = MODE >= 1, HPV = MODE == 2;
    constexpr int QS = DP + 8;       // ≡ 8 (mod 32): a half-warp's 8-byte loads of 4 rows miss each other
    // ≡ 16 (mod 32): a quarter-warp's 16-byte loads of 2 keys likewise
    constexpr int KS = H16 ? DP + 16 : 2 * DP + 16;
    constexpr int NT = FA_KEYS / 8;  // key n-tiles of the scores; k-steps of P·V
    constexpr int DT = DP / 8;       // k-steps of the scores; d n-tiles of the output
    extern __shared__ float4 fa_smem[];
    float* Qs = reinterpret_cast<float*>(fa_smem);
    float* Ks = Qs + FA_ROWS * QS;
    float* Vs = Ks + FA_KEYS * KS;
    float* kscale = Vs + FA_KEYS * 2 * DP;  // H16 only
    float* qscale = kscale + FA_KEYS;
    pdl_begin();
    FaTile tile;
    if (!fa_tile(desc, koff0, H, KV, tile)) return;
    const auto [kv, G, row0, n, pos0, koff, rows, base, keys, ntiles] = tile;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const float* kbase = ksplit + ((size_t)kv * Kp + koff) * (H16 ? DP : 2 * DP);
    const float* kscale_base = ksplit + (size_t)KV * Kp * DP + (size_t)kv * Kp + koff;  // H16 only
    const float* vbase = vsplit + ((size_t)kv * Kp + koff) * (HPV ? DP : 2 * DP);
    // HPV: each key tile's value-column scales, [KV][Kp / 64][DP] after the parts.
    const float* vscale_base = vsplit + (size_t)KV * Kp * DP + ((size_t)kv * (Kp / FA_KEYS) + koff / FA_KEYS) * DP;
    float* vscale = Vs + FA_KEYS * DP;  // HPV only

    auto load_k = [&](int k0) {
        if constexpr (H16) {
            for (int i = tid; i < FA_KEYS * (DP / 4); i += FA_THREADS) {
                const int key = i / (DP / 4), ch = i % (DP / 4);
                fa_copy16(Ks + key * KS + ch * 4, kbase + (size_t)(k0 + key) * DP + ch * 4);
            }
            if (tid < FA_KEYS / 4) fa_copy16(kscale + tid * 4, kscale_base + k0 + tid * 4);
        } else {
            for (int i = tid; i < FA_KEYS * (DP / 2); i += FA_THREADS) {
                const int key = i / (DP / 2), ch = i % (DP / 2);
                fa_copy16(Ks + key * KS + ch * 4, kbase + (size_t)(k0 + key) * 2 * DP + ch * 4);
            }
        }
    };
    auto load_v = [&](int k0) {
        if constexpr (HPV) {
            for (int i = tid; i < FA_KEYS * (DP / 4); i += FA_THREADS)
                fa_copy16(Vs + i * 4, vbase + (size_t)k0 * DP + i * 4);
            if (tid < DP / 4) fa_copy16(vscale + tid * 4, vscale_base + (size_t)(k0 / FA_KEYS) * DP + tid * 4);
        } else {
            for (int i = tid; i < FA_KEYS * (DP / 2); i += FA_THREADS)
                fa_copy16(Vs + i * 4, vbase + (size_t)k0 * 2 * DP + i * 4);
        }
    };
    load_k(0);
    fa_commit();
    load_v(0);
    fa_commit();
    // q rows, each 8-wide slice of d stored t, t + 4 (dims past d zero). Rows past the sequence
    // repeat its last row (finite scores, never written).
    for (int i = tid; i < FA_ROWS * (DP / 4); i += FA_THREADS) {
        const int sr = i / (DP / 4), ch = i % (DP / 4);
        const int row = min(base + sr, rows - 1), tok = row / G, gq = row % G;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (ch * 4 < d)
            v = *reinterpret_cast<const float4*>(q + (size_t)(row0 + tok) * H * d + (size_t)(kv * G + gq) * d + ch * 4);
        if constexpr (H16) {
            *reinterpret_cast<float4*>(Qs + sr * QS + ch * 4) = v;
        } else {
            float* dst = Qs + sr * QS + (ch / 2) * 8 + (ch % 2);
            dst[0] = v.x;
            dst[2] = v.y;
            dst[4] = v.z;
            dst[6] = v.w;
        }
    }
    if constexpr (H16) {
        // Each q row scaled into fp16's range (its scale kept to take back from the scores).
        // Warp w scales its own 16 rows.
        __syncthreads();
        for (int i = 0; i < 16; ++i) {
            float* row = Qs + (warp * 16 + i) * QS;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (lane * 4 < DP) v = *reinterpret_cast<const float4*>(row + lane * 4);
            const float m = warp_max(fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
            const float sc = fp16_row_scale(m);
            if (lane * 4 < DP) *reinterpret_cast<float4*>(row + lane * 4) = make_float4(v.x * sc, v.y * sc, v.z * sc, v.w * sc);
            if (lane == 0) qscale[warp * 16 + i] = 1.0f / sc;
        }
    }
    const int r0 = warp * 16 + g, r1 = r0 + 8;  // this thread's rows in the tile
    const int lim0 = pos0 + min(base + r0, rows - 1) / G, lim1 = pos0 + min(base + r1, rows - 1) / G;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    float o[DT][4];
#pragma unroll
    for (int e = 0; e < DT; ++e) o[e][0] = o[e][1] = o[e][2] = o[e][3] = 0.0f;

    for (int kt_i = 0; kt_i < ntiles; ++kt_i) {
        const int k0 = kt_i * FA_KEYS;
        fa_wait<1>();
        __syncthreads();
        float sc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
        if constexpr (H16) {
            // 32-wide slices of d (two k16 steps) into fresh registers, as below.
#pragma unroll
            for (int kc = 0; kc < DP / 16; kc += 2) {
                float part[NT][4];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) part[nt][0] = part[nt][1] = part[nt][2] = part[nt][3] = 0.0f;
#pragma unroll
                for (int ks = kc; ks < kc + 2; ++ks) {
                    const float* qa = Qs + r0 * QS + ks * 16 + t * 2;
                    const float* qb = Qs + r1 * QS + ks * 16 + t * 2;
                    const float2 a0 = *reinterpret_cast<const float2*>(qa);
                    const float2 a1 = *reinterpret_cast<const float2*>(qb);
                    const float2 a2 = *reinterpret_cast<const float2*>(qa + 8);
                    const float2 a3 = *reinterpret_cast<const float2*>(qb + 8);
                    u32 ah[4], al[4];
                    half2_split(a0.x, a0.y, ah[0], al[0]);
                    half2_split(a1.x, a1.y, ah[1], al[1]);
                    half2_split(a2.x, a2.y, ah[2], al[2]);
                    half2_split(a3.x, a3.y, ah[3], al[3]);
                    uint4 kb[NT];
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
                        kb[nt] = *reinterpret_cast<const uint4*>(Ks + (nt * 8 + g) * KS + ks * 16 + t * 4);
                    mma_3xf16<NT>(part, ah, al, kb);
                }
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) sc[nt][i] += part[nt][i];
            }
            const float qs0 = qscale[r0], qs1 = qscale[r1];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const float2 kscl = *reinterpret_cast<const float2*>(kscale + nt * 8 + 2 * t);
                sc[nt][0] *= qs0 * kscl.x;
                sc[nt][1] *= qs0 * kscl.y;
                sc[nt][2] *= qs1 * kscl.x;
                sc[nt][3] *= qs1 * kscl.y;
            }
        } else {
#pragma unroll
            for (int kc = 0; kc < DT; kc += 4) {
                float part[NT][4];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) part[nt][0] = part[nt][1] = part[nt][2] = part[nt][3] = 0.0f;
#pragma unroll
                for (int ks = kc; ks < kc + 4; ++ks) {
                    const float2 qa = *reinterpret_cast<const float2*>(Qs + r0 * QS + ks * 8 + t * 2);
                    const float2 qb = *reinterpret_cast<const float2*>(Qs + r1 * QS + ks * 8 + t * 2);
                    u32 ab[4], as[4];
                    tf32_split(qa.x, ab[0], as[0]);
                    tf32_split(qb.x, ab[1], as[1]);
                    tf32_split(qa.y, ab[2], as[2]);
                    tf32_split(qb.y, ab[3], as[3]);
                    float4 kb[NT];
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
                        kb[nt] = *reinterpret_cast<const float4*>(Ks + (nt * 8 + g) * KS + ks * 16 + t * 4);
                    mma_3xtf32<NT>(part, ab, as, kb);
                }
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) sc[nt][i] += part[nt][i];
            }
        }
        // Online softmax: row r0 holds sc[.][0..1], row r1 sc[.][2..3]; a row's keys are spread
        // over the four lanes of a quad.
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int key = k0 + nt * 8 + 2 * t + u;
                if (key > lim0) sc[nt][u] = -INFINITY;
                if (key > lim1) sc[nt][2 + u] = -INFINITY;
                mx0 = fmaxf(mx0, sc[nt][u]);
                mx1 = fmaxf(mx1, sc[nt][2 + u]);
            }
        float al0, al1;
        fa_softmax_step<4 * NT>(&sc[0][0], mx0, mx1, scale_log2, m0, m1, l0, l1, al0, al1);
        fa_wait<0>();
        __syncthreads();  // V visible; every warp is done with K
        if (kt_i + 1 < ntiles) load_k(k0 + FA_KEYS);
        fa_commit();
        // P·V in groups of up to 8 output n-tiles (registers), each group's tile sum from zero.
        constexpr int EG = DT < 8 ? DT : 8;
#pragma unroll
        for (int e0 = 0; e0 < DT; e0 += EG) {
            float ot[EG][4];
#pragma unroll
            for (int e = 0; e < EG; ++e) ot[e][0] = ot[e][1] = ot[e][2] = ot[e][3] = 0.0f;
            if constexpr (HPV) {
                // k16 steps of 16 keys: the score fragments of n-tiles 2j and 2j + 1 are P's A
                // fragment as they are; values per 16 keys and dim, lane t's {hi(2t, 2t+1),
                // hi(2t+8, 2t+9), lo(...), lo(...)}, scaled per column (taken back below).
#pragma unroll
                for (int j = 0; j < NT / 2; ++j) {
                    u32 ph[4], pl[4];
                    half2_split(sc[2 * j][0], sc[2 * j][1], ph[0], pl[0]);
                    half2_split(sc[2 * j][2], sc[2 * j][3], ph[1], pl[1]);
                    half2_split(sc[2 * j + 1][0], sc[2 * j + 1][1], ph[2], pl[2]);
                    half2_split(sc[2 * j + 1][2], sc[2 * j + 1][3], ph[3], pl[3]);
                    uint4 vb[EG];
#pragma unroll
                    for (int e = 0; e < EG; ++e)
                        vb[e] = *reinterpret_cast<const uint4*>(Vs + (j * DP + (e0 + e) * 8 + g) * 16 + t * 4);
                    mma_3xf16<EG>(ot, ph, pl, vb);
                }
#pragma unroll
                for (int e = 0; e < EG; ++e) {
                    const float2 vsc = *reinterpret_cast<const float2*>(vscale + (e0 + e) * 8 + 2 * t);
                    ot[e][0] *= vsc.x;
                    ot[e][1] *= vsc.y;
                    ot[e][2] *= vsc.x;
                    ot[e][3] *= vsc.y;
                }
            } else {
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    u32 pb[4], ps[4];
                    tf32_split(sc[j][0], pb[0], ps[0]);
                    tf32_split(sc[j][2], pb[1], ps[1]);
                    tf32_split(sc[j][1], pb[2], ps[2]);
                    tf32_split(sc[j][3], pb[3], ps[3]);
                    float4 vb[EG];
#pragma unroll
                    for (int e = 0; e < EG; ++e)
                        vb[e] = *reinterpret_cast<const float4*>(Vs + j * DP * 16 + ((e0 + e) * 8 + g) * 16 + t * 4);
                    mma_3xtf32<EG>(ot, pb, ps, vb);
                }
            }
#pragma unroll
            for (int e = 0; e < EG; ++e) {
                o[e0 + e][0] = fmaf(o[e0 + e][0], al0, ot[e][0]);
                o[e0 + e][1] = fmaf(o[e0 + e][1], al0, ot[e][1]);
                o[e0 + e][2] = fmaf(o[e0 + e][2], al1, ot[e][2]);
                o[e0 + e][3] = fmaf(o[e0 + e][3], al1, ot[e][3]);
            }
        }
        __syncthreads();  // every warp is done with V
        if (kt_i + 1 < ntiles) load_v(k0 + FA_KEYS);
        fa_commit();
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = base + (h ? r1 : r0);
        if (row >= rows) continue;
        const int tok = row / G, gq = row % G;
        const float l = h ? l1 : l0;
        float* dst = out + (size_t)(row0 + tok) * H * d + (size_t)(kv * G + gq) * d;
#pragma unroll
        for (int e = 0; e < DT; ++e)
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int c = e * 8 + 2 * t + u;
                if (c < d) dst[c] = o[e][2 * h + u] / l;
            }
    }
}

// Builds: flash_tc_* (3xTF32), flash_h_* (fp16 scores) and flash_hh_* (fp16 scores and P·V,
// the values gathered by flash_hh_gather_v), each for both cache types.
#define FLASH_TC_GATHER_ENTRY(NAME, KT, SUFFIX, DP, MODE)                                                            \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) NAME##_gather_kv_##SUFFIX##_d##DP(                      \
        const KT* kc, const KT* vc, const u32* tables, int max_blocks, int block_size, const u32* desc, int koff0,   \
        int KV, int d, int Kp, float* ks, float* vs) {                                                               \
        flash_tc_gather_kv<KT, DP, MODE>(kc, vc, tables, max_blocks, block_size, desc, koff0, KV, d, Kp, ks, vs);  \
    }
#define FLASH_TC_ENTRY(NAME, DP, MODE)                                                                              \
    FLASH_TC_GATHER_ENTRY(NAME, float, kvf32, DP, MODE)                                                             \
    FLASH_TC_GATHER_ENTRY(NAME, bf16_t, kvbf16, DP, MODE)                                                           \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 1) NAME##_prefill_d##DP(                              \
        const float* q, const float* ks, const float* vs, float* out, const u32* desc, int koff0, int H, int KV,     \
        int d, int Kp, float scale_log2) {                                                                           \
        flash_tc_prefill<DP, MODE>(q, ks, vs, out, desc, koff0, H, KV, d, Kp, scale_log2);                          \
    }
FLASH_TC_ENTRY(flash_tc, 32, 0)
FLASH_TC_ENTRY(flash_tc, 64, 0)
FLASH_TC_ENTRY(flash_tc, 128, 0)
FLASH_TC_ENTRY(flash_h, 32, 1)
FLASH_TC_ENTRY(flash_h, 64, 1)
FLASH_TC_ENTRY(flash_h, 128, 1)
FLASH_TC_ENTRY(flash_hh, 32, 2)
FLASH_TC_ENTRY(flash_hh, 64, 2)
FLASH_TC_ENTRY(flash_hh, 128, 2)

#define FLASH_HH_GATHER_V_ENTRY(KT, SUFFIX, DP)                                                                     \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_hh_gather_v_##SUFFIX##_d##DP(                      \
        const KT* vc, const u32* tables, int max_blocks, int block_size, const u32* desc, int koff0, int KV, int d,   \
        int Kp, float* vs) {                                                                                         \
        flash_hh_gather_v<KT, DP>(vc, tables, max_blocks, block_size, desc, koff0, KV, d, Kp, vs);                  \
    }
#define FLASH_HH_GATHER_V_ENTRIES(DP)               \
    FLASH_HH_GATHER_V_ENTRY(float, kvf32, DP)       \
    FLASH_HH_GATHER_V_ENTRY(bf16_t, kvbf16, DP)
FLASH_HH_GATHER_V_ENTRIES(32)
FLASH_HH_GATHER_V_ENTRIES(64)
FLASH_HH_GATHER_V_ENTRIES(128)
