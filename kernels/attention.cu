// The attention block: q/k-norm + RoPE + paged KV-cache write, and split-K ("flash-decoding")
// attention over the paged cache. Cache pools are [slots, kv_heads * head_dim] in fp32 or bf16
// (one entry point of each kernel per cache type, suffixed _kvf32 / _kvbf16); norm statistics,
// gains, RoPE and softmax are fp32 (RoPE angles are formed and reduced in double first).

#define ATTN_WARPS 4
// Most splits of a decode context (ContextSplit::decode's cap; a cluster of 16 is non-portable).
#define ATTN_MAX_SPLITS 16

// N consecutive cache elements as floats, one vector load (p aligned to N elements).
template <int N> __device__ __forceinline__ void kv_load_vec(const float* p, float* o) {
    if (N == 8) {
        const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
        o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
    } else if (N == 4) {
        const float4 a = *reinterpret_cast<const float4*>(p);
        o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
    } else if (N == 2) {
        const float2 a = *reinterpret_cast<const float2*>(p);
        o[0] = a.x; o[1] = a.y;
    } else {
        o[0] = *p;
    }
}
template <int N> __device__ __forceinline__ void kv_load_vec(const bf16_t* p, float* o) {
    if (N == 8) {
        unpack_bf16x8(*reinterpret_cast<const uint4*>(p), o);
    } else if (N == 4) {
        const uint2 a = *reinterpret_cast<const uint2*>(p);
        o[0] = bf16_lo(a.x); o[1] = bf16_hi(a.x); o[2] = bf16_lo(a.y); o[3] = bf16_hi(a.y);
    } else if (N == 2) {
        const u32 a = *reinterpret_cast<const u32*>(p);
        o[0] = bf16_lo(a); o[1] = bf16_hi(a);
    } else {
        o[0] = bf16_to_f32(*p);
    }
}

// Four consecutive cache elements held as loaded (16 bytes of fp32 or 8 of bf16), converted to
// floats only when used, so a load issued early does not stall at its conversion.
template <typename KT> struct KvRaw4;
template <> struct KvRaw4<float> {
    float4 v;
    __device__ __forceinline__ void zero() { v = make_float4(0.0f, 0.0f, 0.0f, 0.0f); }
    __device__ __forceinline__ void load(const float* p) { v = *reinterpret_cast<const float4*>(p); }
    // Four values as the cache stores them.
    __device__ __forceinline__ void set(const float* f) { v = make_float4(f[0], f[1], f[2], f[3]); }
    __device__ __forceinline__ void get(float* o) const { o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w; }
};
template <> struct KvRaw4<bf16_t> {
    uint2 v;
    __device__ __forceinline__ void zero() { v = make_uint2(0u, 0u); }
    __device__ __forceinline__ void load(const bf16_t* p) { v = *reinterpret_cast<const uint2*>(p); }
    __device__ __forceinline__ void set(const float* f) {
        v = make_uint2((u32)f32_to_bf16(f[0]) | ((u32)f32_to_bf16(f[1]) << 16),
                       (u32)f32_to_bf16(f[2]) | ((u32)f32_to_bf16(f[3]) << 16));
    }
    __device__ __forceinline__ void get(float* o) const {
        o[0] = bf16_lo(v.x); o[1] = bf16_hi(v.x); o[2] = bf16_lo(v.y); o[3] = bf16_hi(v.y);
    }
};

// cs[2i], cs[2i + 1] = cos, sin of pos * theta^(-2i / d) for i < d / 2, for the whole block.
__device__ __forceinline__ void rope_table(u32 pos, int d, double log2_theta, float* cs) {
    for (int i = threadIdx.x; i < d / 2; i += blockDim.x) rope_cs(pos, i, d, log2_theta, cs + 2 * i, cs + 2 * i + 1);
    __syncthreads();
}

// Split-half RoPE on x [T, n * d]. grid = T, block = 128, shared = d floats.
extern "C" __global__ void rope_f32(const float* __restrict__ x, const u32* __restrict__ positions,
                                    float* __restrict__ y, int cols, int d, double log2_theta) {
    extern __shared__ float cs[];
    pdl_begin();
    rope_table(positions[blockIdx.x], d, log2_theta, cs);
    const int half = d / 2;
    const size_t row = (size_t)blockIdx.x * cols;
    for (int p = threadIdx.x; p < cols / 2; p += blockDim.x) {
        const int head = p / half, i = p % half;
        const size_t a = row + (size_t)head * d + i, b = a + half;
        const float c = cs[2 * i], s = cs[2 * i + 1];
        const float xa = x[a], xb = x[b];
        y[a] = xa * c - xb * s;
        y[b] = xb * c + xa * s;
    }
}

// k, v [T, W] fp32 -> cache pools at each token's slot. grid = T, block = 256.
template <typename KT>
__device__ void write_kv(const float* __restrict__ k, const float* __restrict__ v,
                         const u32* __restrict__ slots, KT* __restrict__ kc, KT* __restrict__ vc, int W) {
    pdl_begin();
    const size_t src = (size_t)blockIdx.x * W, dst = (size_t)slots[blockIdx.x] * W;
    for (int i = threadIdx.x; i < W; i += blockDim.x) {
        kv_store(kc + dst + i, k[src + i]);
        kv_store(vc + dst + i, v[src + i]);
    }
}

// RoPE of the normalised pair (a, b) = dims (i, i + d / 2) of head h (< H: q; else a key) of
// token t, stored to q_out [T, H d] or to the cache at `slot`.
template <typename KT>
__device__ __forceinline__ void rope_store(float a, float b, float c, float s, float* __restrict__ q_out,
                                           KT* __restrict__ kc, size_t slot, int H, int d, int t, int h, int i) {
    const float ra = a * c - b * s, rb = b * c + a * s;
    if (h < H) {
        float* dst = q_out + (size_t)t * H * d + (size_t)h * d;
        dst[i] = ra;
        dst[i + d / 2] = rb;
    } else {
        KT* dst = kc + slot + (size_t)(h - H) * d;
        kv_store(dst + i, ra);
        kv_store(dst + i + d / 2, rb);
    }
}

// qkv [T, (H + 2 KV) d]: per-head RMSNorm (q_norm / k_norm over d) then RoPE for q and k heads,
// q to q_out [T, H d], k and v to the cache, d <= 256. Head h of token t by one warp, whose lane
// holds the RoPE factors cs[j], sn[j] of pair lane + 32 j.
template <typename KT>
__device__ __forceinline__ void qk_norm_rope_head(
    const float* __restrict__ qkv, const float* __restrict__ q_norm, const float* __restrict__ k_norm,
    size_t slot, float* __restrict__ q_out, KT* __restrict__ kc, KT* __restrict__ vc, int H, int KV, int d,
    float eps, int t, int h, int lane, const float (&cs)[4], const float (&sn)[4]) {
    const int heads = H + 2 * KV, half = d / 2;
    const float* src = qkv + (size_t)t * heads * d + (size_t)h * d;
    if (h >= H + KV) {  // v: copied as is
        KT* dst = vc + slot + (size_t)(h - H - KV) * d;
        for (int i = lane; i < d; i += 32) kv_store(dst + i, src[i]);
        return;
    }
    float ss = 0.0f;
    for (int i = lane; i < d; i += 32) ss += src[i] * src[i];
    const float inv = rsqrtf(warp_sum(ss) / d + eps);
    const float* gain = h < H ? q_norm : k_norm;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int i = lane + 32 * j;
        if (i >= half) break;
        rope_store(src[i] * inv * gain[i], src[i + half] * inv * gain[i + half], cs[j], sn[j], q_out, kc, slot, H, d,
                   t, h, i);
    }
}

// qk_norm_rope_head for every (token, head), a warp each: grid = ceil(T (H + 2 KV) / warps a
// block). The RoPE factors depend only on the position, so they are formed before pdl_wait(),
// while the QKV projection before this kernel finishes (decode steps).
template <typename KT>
__device__ void qk_norm_rope_write_kv(
    const float* __restrict__ qkv, const float* __restrict__ q_norm, const float* __restrict__ k_norm,
    const u32* __restrict__ positions, const u32* __restrict__ slots, float* __restrict__ q_out,
    KT* __restrict__ kc, KT* __restrict__ vc, int H, int KV, int d, double log2_theta, float eps, int T) {
    const int lane = threadIdx.x & 31, heads = H + 2 * KV, half = d / 2;
    const int item = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (item >= T * heads) return;
    const int t = item / heads, h = item % heads;
    float cs[4] = {}, sn[4] = {};
    if (h < H + KV) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (lane + 32 * j < half) rope_cs(positions[t], lane + 32 * j, d, log2_theta, &cs[j], &sn[j]);
    }
    pdl_begin();
    qk_norm_rope_head<KT>(qkv, q_norm, k_norm, (size_t)slots[t] * KV * d, q_out, kc, vc, H, KV, d, eps, t, h,
                          lane, cs, sn);
}

// q/k-norm + RoPE + cache write for prompts (as qk_norm_rope_head), a block of QKN_ROWS_WARPS
// warps per token, for head size D (built for Qwen3's 128; registers indexed at compile time).
// A warp per (token, head) formed the token's RoPE factors once per
// head (24 times at Qwen3-0.6B's shape, in double precision) and had four loads in flight; here
// the block forms them once into shared memory, and each warp takes its heads four at a time,
// their loads issued together. Lane l holds elements l + 32 j of a head, so RoPE's partners
// (half apart) sit in the same lane. grid = T, block = 32 x QKN_ROWS_WARPS.
#define QKN_ROWS_WARPS 4
template <typename KT, int D>
__device__ void qk_norm_rope_write_kv_rows(
    const float* __restrict__ qkv, const float* __restrict__ q_norm, const float* __restrict__ k_norm,
    const u32* __restrict__ positions, const u32* __restrict__ slots, float* __restrict__ q_out,
    KT* __restrict__ kc, KT* __restrict__ vc, int H, int KV, double log2_theta, float eps) {
    static_assert(D % 64 == 0 && D <= 256, "D");
    constexpr int GROUP = 4, NJ = D / 32, PAIRS = D / 64, d = D, half = D / 2;
    __shared__ __align__(8) float table[D];  // {cos, sin} of each pair
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x, heads = H + 2 * KV;
    rope_table(positions[t], d, log2_theta, table);
    pdl_begin();
    const size_t slot = (size_t)slots[t] * KV * d;
    const float* row = qkv + (size_t)t * heads * d;
    for (int h0 = warp * GROUP; h0 < heads; h0 += QKN_ROWS_WARPS * GROUP) {
        float v[GROUP][NJ];
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
#pragma unroll
            for (int j = 0; j < NJ; ++j)
                if (h0 + g < heads) v[g][j] = row[(size_t)(h0 + g) * d + lane + 32 * j];
        }
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            const int h = h0 + g;
            if (h >= heads) break;
            if (h >= H + KV) {  // v: copied as is
                KT* dst = vc + slot + (size_t)(h - H - KV) * d;
#pragma unroll
                for (int j = 0; j < NJ; ++j) kv_store(dst + lane + 32 * j, v[g][j]);
                continue;
            }
            float ss = 0.0f;
#pragma unroll
            for (int j = 0; j < NJ; ++j) ss += v[g][j] * v[g][j];
            const float inv = rsqrtf(warp_sum(ss) / d + eps);
            const float* gain = h < H ? q_norm : k_norm;
#pragma unroll
            for (int j = 0; j < PAIRS; ++j) {
                const int i = lane + 32 * j;
                const float2 cs = *reinterpret_cast<const float2*>(table + 2 * i);
                rope_store(v[g][j] * inv * gain[i], v[g][j + PAIRS] * inv * gain[i + half], cs.x, cs.y, q_out, kc, slot,
                           H, d, t, h, i);
            }
        }
    }
}

// The ATTN_WARPS warps' partial softmaxes for row g, dim dd, from `part` laid out [warp][row]
// [o (d), max, sum] with `rows` rows: the merged max M, sum L and unnormalised output O. A warp
// that saw no keys (max -inf) is skipped.
__device__ __forceinline__ void merge_warps(const float* part, int rows, int d, int g, int dd, float& M,
                                            float& L, float& O) {
    const int stride = d + 2;
    M = -INFINITY;
    for (int w = 0; w < ATTN_WARPS; ++w) M = fmaxf(M, part[(w * rows + g) * stride + d]);
    L = 0.0f;
    O = 0.0f;
    for (int w = 0; w < ATTN_WARPS; ++w) {
        const float* p = part + (w * rows + g) * stride;
        if (p[d] == -INFINITY) continue;
        const float f = exp2f(p[d] - M);
        L += p[d + 1] * f;
        O += p[dd] * f;
    }
}

// A warp's online-softmax state into its row of the block's merge area, [ATTN_WARPS][G][d + 2]
// as [o (d), max, sum] per query head (lane l holds dims [d0, d0 + N)), for merge_warps.
template <int GM, int N>
__device__ __forceinline__ void store_warp_partials(float* merge, int G, int d, int d0, const float (&o)[GM][N],
                                                    const float (&m)[GM], const float (&l)[GM]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, stride = d + 2;
    float* mine = merge + (size_t)warp * G * stride;
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        if (g < G) {
#pragma unroll
            for (int j = 0; j < N; ++j)
                if (d0 + j < d) mine[g * stride + d0 + j] = o[g][j];
            if (lane == 0) {
                mine[g * stride + d] = m[g];
                mine[g * stride + d + 1] = l[g];
            }
        }
    }
}

// The end of a block of split attention: merge the warps' partials in `merge` (after a barrier);
// with one active split write the normalised output, else write this split's partials (o, max,
// sum) and let the last of the `active` splits to arrive (a per-(t, kv) arrival counter, reset by
// that block) combine everyone's, so no second kernel is needed.
__device__ void finish_splits(const float* merge, int G, int d, int H, int KV, int t, int kv, int split, int active,
                              float* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,
                              u32* __restrict__ counters) {
    __shared__ int is_last;
    for (int idx = threadIdx.x; idx < G * d; idx += blockDim.x) {
        const int g = idx / d, dd = idx % d;
        float M, L, O;
        merge_warps(merge, G, d, g, dd, M, L, O);
        const int h = kv * G + g;
        if (active == 1) {
            out[(size_t)t * H * d + (size_t)h * d + dd] = O / L;
        } else {
            const size_t pi = ((size_t)t * H + h) * gridDim.z + split;
            part_o[pi * d + dd] = O;
            if (dd == 0) {
                part_ml[pi * 2] = M;
                part_ml[pi * 2 + 1] = L;
            }
        }
    }
    if (active == 1) return;
    // The last of the `active` splits to arrive combines everyone's partials.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        u32* counter = counters + (size_t)t * KV + kv;
        is_last = atomicAdd(counter, 1u) == (u32)active - 1;
        if (is_last) *counter = 0u;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int idx = threadIdx.x; idx < G * d; idx += blockDim.x) {
        const int g = idx / d, dd = idx % d, h = kv * G + g;
        const size_t base = ((size_t)t * H + h) * gridDim.z;
        float M = -INFINITY;
        for (int sp = 0; sp < active; ++sp) M = fmaxf(M, __ldcg(part_ml + (base + sp) * 2));
        float L = 0.0f, O = 0.0f;
        for (int sp = 0; sp < active; ++sp) {
            const float ms = __ldcg(part_ml + (base + sp) * 2);
            if (ms == -INFINITY) continue;
            const float f = exp2f(ms - M);
            L += __ldcg(part_ml + (base + sp) * 2 + 1) * f;
            O += __ldcg(part_o + (base + sp) * d + dd) * f;
        }
        out[(size_t)t * H * d + (size_t)h * d + dd] = O / L;
    }
}

// finish_splits for a launch whose splits of each (token, KV head) form one thread-block cluster
// (sm_90; the host's choice, QFUSE_CUDA_ATTN_CLUSTER): each block leaves its merged partials
// (o, max, sum) in its own shared memory, and after one cluster barrier block `rank` combines
// 1/n of the G x d outputs from every split's shared memory. No partials go through global
// memory, and no fence, arrival counter or re-read of them sits on the critical path (at batch 1
// those were most of the kernel's ~10.8 µs a layer, docs/perf.md). Every block of the cluster,
// idle splits included, passes both barriers; only the first `active` hold keys.
#if __CUDA_ARCH__ >= 900
template <int GM>
__device__ void finish_splits_cluster(const float* merge, int G, int d, int H, int t, int kv, int active,
                                      float* __restrict__ out) {
    __shared__ float part_o[GM * 128];  // [G][d]
    __shared__ float part_ml[GM * 2];   // [G] (max, sum)
    for (int idx = threadIdx.x; idx < G * d; idx += blockDim.x) {
        const int g = idx / d, dd = idx % d;
        float M, L, O;
        merge_warps(merge, G, d, g, dd, M, L, O);
        part_o[idx] = O;
        if (dd == 0) {
            part_ml[2 * g] = M;
            part_ml[2 * g + 1] = L;
        }
    }
    cluster_sync();
    const int n = (int)cluster_size(), rank = (int)cluster_rank();
    const int per = (G * d + n - 1) / n, last = min(G * d, (rank + 1) * per);
    const u32 o_addr = smem_addr(part_o), ml_addr = smem_addr(part_ml);
    for (int idx = rank * per + threadIdx.x; idx < last; idx += blockDim.x) {
        const int g = idx / d, dd = idx % d;
        // Every split's loads issued before any is used: one round trip.
        float ms[ATTN_MAX_SPLITS], ls[ATTN_MAX_SPLITS], os[ATTN_MAX_SPLITS];
#pragma unroll
        for (int j = 0; j < ATTN_MAX_SPLITS; ++j) {
            ms[j] = j < active ? ld_peer(ml_addr + 8u * g, j) : -INFINITY;
            ls[j] = j < active ? ld_peer(ml_addr + 8u * g + 4u, j) : 0.0f;
            os[j] = j < active ? ld_peer(o_addr + 4u * idx, j) : 0.0f;
        }
        float M = -INFINITY;
#pragma unroll
        for (int j = 0; j < ATTN_MAX_SPLITS; ++j) M = fmaxf(M, ms[j]);
        float L = 0.0f, O = 0.0f;
#pragma unroll
        for (int j = 0; j < ATTN_MAX_SPLITS; ++j) {
            if (ms[j] == -INFINITY) continue;
            const float f = exp2f(ms[j] - M);
            L += ls[j] * f;
            O += os[j] * f;
        }
        out[(size_t)t * H * d + (size_t)(kv * G + g) * d + dd] = O / L;
    }
    cluster_sync_relaxed();
}
#endif

// Causal attention over the paged cache, split along the context ("flash-decoding"). Block
// (t, kv, split) reads the keys and values of KV head `kv` in its slice of token t's context
// once, for all G query heads that share it (GQA). Warp w takes keys w, w + ATTN_WARPS, ... in
// batches of KB, all of a batch's K and V rows in flight together; lanes 0..KB-1 hold the batch's
// cache slots, looked up one batch ahead (the first before pdl_wait(): block tables are batch
// metadata, not kernel output). Online softmax per warp, then the warps merge in shared memory.
// Lane l owns head dims [l * DPL, (l + 1) * DPL). With one active split the block writes the
// normalised output; otherwise each split writes unnormalised partials (o, max, sum) and the
// last split to finish (a per-(t, kv) arrival counter, reset by that block) combines them, so no
// second kernel is needed. Scores use exp2 with log2(e) folded into the scale. GM and DPL are
// compile-time bounds on G and d / 32; KBM is the batch: 8 for decode (few tokens, latency-bound:
// more loads in flight), 2 for prefill (thousands of blocks: fewer registers, more warps).
// grid = (T, KV, splits), block = 32 * ATTN_WARPS, shared = ATTN_WARPS * G * (d + 2) floats.
template <typename KT, int GM, int DPL, int KBM>
__device__ void attention_paged(
    const float* __restrict__ q, const KT* __restrict__ kc, const KT* __restrict__ vc,
    const u32* __restrict__ positions, const u32* __restrict__ token_seq,
    const u32* __restrict__ block_tables, int max_blocks, int block_size, int H, int KV, int d,
    float scale_log2, int chunk, float* __restrict__ out, float* __restrict__ part_o,
    float* __restrict__ part_ml, u32* __restrict__ counters) {
    constexpr int KB = DPL <= 4 ? KBM : (KBM < 4 ? KBM : 4);  // K and V rows in registers
    extern __shared__ float smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x, kv = blockIdx.y, split = blockIdx.z;
    const int G = H / KV, W = KV * d, d0 = lane * DPL;
    const bool full = d == 32 * DPL;
    const u32 pos = positions[t];
    const u32* table = block_tables + (size_t)token_seq[t] * max_blocks;
    const int begin = split * chunk;
    const int end = min((int)pos + 1, begin + chunk);
    const int active = min((int)gridDim.z, ((int)pos + chunk) / chunk);
    auto slot_of = [&](int key) -> u32 {
        return key < end ? table[key / block_size] * (u32)block_size + (u32)(key % block_size) : 0u;
    };
    int key0 = begin + warp;
    u32 my_slot = lane < KB ? slot_of(key0 + lane * ATTN_WARPS) : 0u;
    pdl_begin();
    if (begin >= end) return;  // past the token's position: no keys, not counted in `active`

    float qr[GM][DPL], o[GM][DPL], m[GM], l[GM];
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
            const int dd = d0 + j;
            qr[g][j] = (g < G && dd < d) ? q[(size_t)t * H * d + (size_t)(kv * G + g) * d + dd] * scale_log2 : 0.0f;
            o[g][j] = 0.0f;
        }
    }
    auto load_row = [&](const KT* base, u32 slot, float* f) {
        const KT* r = base + (size_t)slot * W + (size_t)kv * d + d0;
        if (full) {
            kv_load_vec<DPL>(r, f);
        } else {
#pragma unroll
            for (int j = 0; j < DPL; ++j) f[j] = d0 + j < d ? kv_load(r + j) : 0.0f;
        }
    };
    for (; key0 < end; key0 += KB * ATTN_WARPS) {
        float kf[KB][DPL], vf[KB][DPL];
#pragma unroll
        for (int i = 0; i < KB; ++i) {
            const u32 slot = __shfl_sync(FULL_MASK, my_slot, i);
            if (key0 + i * ATTN_WARPS < end) {
                load_row(kc, slot, kf[i]);
                load_row(vc, slot, vf[i]);
            }
        }
        my_slot = lane < KB ? slot_of(key0 + (KB + lane) * ATTN_WARPS) : 0u;
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            if (g < G) {
                float s[KB];
                float m_new = m[g];
#pragma unroll
                for (int i = 0; i < KB; ++i) {
                    float p = 0.0f;
#pragma unroll
                    for (int j = 0; j < DPL; ++j) p += qr[g][j] * kf[i][j];
                    s[i] = key0 + i * ATTN_WARPS < end ? warp_sum(p) : -INFINITY;
                    m_new = fmaxf(m_new, s[i]);
                }
                const float corr = exp2f(m[g] - m_new);
                l[g] *= corr;
#pragma unroll
                for (int j = 0; j < DPL; ++j) o[g][j] *= corr;
#pragma unroll
                for (int i = 0; i < KB; ++i) {
                    if (key0 + i * ATTN_WARPS < end) {  // vf of a key past the end is unset
                        const float p = exp2f(s[i] - m_new);
                        l[g] += p;
#pragma unroll
                        for (int j = 0; j < DPL; ++j) o[g][j] += p * vf[i][j];
                    }
                }
                m[g] = m_new;
            }
        }
    }
    // Merge the warps' partial softmaxes (a warp without keys has m = -inf, l = 0).
    store_warp_partials<GM, DPL>(smem, G, d, d0, o, m, l);
    __syncthreads();
    finish_splits(smem, G, d, H, KV, t, kv, split, active, out, part_o, part_ml, counters);
}

#define ATTN_ENTRY(KT, SUFFIX, GM, DPL, KBM)                                                               \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS) attention_paged_##SUFFIX##_g##GM##_d##DPL##_k##KBM( \
        const float* q, const KT* kc, const KT* vc, const u32* positions, const u32* token_seq,            \
        const u32* block_tables, int max_blocks, int block_size, int H, int KV, int d, float scale_log2,    \
        int chunk, float* out, float* part_o, float* part_ml, u32* counters) {                              \
        attention_paged<KT, GM, DPL, KBM>(q, kc, vc, positions, token_seq, block_tables, max_blocks, block_size, \
                                     H, KV, d, scale_log2, chunk, out, part_o, part_ml, counters);          \
    }

#define ATTN_KBS(KT, SUFFIX, GM, DPL) ATTN_ENTRY(KT, SUFFIX, GM, DPL, 2) ATTN_ENTRY(KT, SUFFIX, GM, DPL, 8)
#define ATTN_DPLS(KT, SUFFIX, GM) \
    ATTN_KBS(KT, SUFFIX, GM, 1) ATTN_KBS(KT, SUFFIX, GM, 2) ATTN_KBS(KT, SUFFIX, GM, 4) ATTN_KBS(KT, SUFFIX, GM, 8)

#define KV_ENTRIES(KT, SUFFIX)                                                                              \
    extern "C" __global__ void write_kv_##SUFFIX(const float* k, const float* v, const u32* slots, KT* kc,   \
                                                 KT* vc, int W) {                                           \
        write_kv<KT>(k, v, slots, kc, vc, W);                                                               \
    }                                                                                                       \
    extern "C" __global__ void qk_norm_rope_write_kv_##SUFFIX(                                              \
        const float* qkv, const float* q_norm, const float* k_norm, const u32* positions, const u32* slots, \
        float* q_out, KT* kc, KT* vc, int H, int KV, int d, double log2_theta, float eps, int T) {          \
        qk_norm_rope_write_kv<KT>(qkv, q_norm, k_norm, positions, slots, q_out, kc, vc, H, KV, d,          \
                                  log2_theta, eps, T);                                                      \
    }                                                                                                       \
    extern "C" __global__ void qk_norm_rope_write_kv_rows_d128_##SUFFIX(                                    \
        const float* qkv, const float* q_norm, const float* k_norm, const u32* positions, const u32* slots, \
        float* q_out, KT* kc, KT* vc, int H, int KV, double log2_theta, float eps) {                        \
        qk_norm_rope_write_kv_rows<KT, 128>(qkv, q_norm, k_norm, positions, slots, q_out, kc, vc, H, KV,   \
                                            log2_theta, eps);                                               \
    }                                                                                                       \
    ATTN_DPLS(KT, SUFFIX, 1) ATTN_DPLS(KT, SUFFIX, 2) ATTN_DPLS(KT, SUFFIX, 4) ATTN_DPLS(KT, SUFFIX, 8)

KV_ENTRIES(float, kvf32)
KV_ENTRIES(bf16_t, kvbf16)

// Of 8 values per lane, v[r] summed over the warp's 32 lanes lands in every lane with
// (lane & 7) == r: three halving exchanges (4 + 2 + 1 shuffles) leave each lane one row's sum
// over its 8-lane group, two more finish it. 9 shuffles for 8 dot products, where a warp_sum per
// product takes 40.
__device__ __forceinline__ float transpose_sum8(const float* v, int lane) {
    const bool b2 = lane & 4, b1 = lane & 2, b0 = lane & 1;
    float w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
        w[i] = (b2 ? v[4 + i] : v[i]) + __shfl_xor_sync(FULL_MASK, b2 ? v[i] : v[4 + i], 4);
    float x[2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
        x[i] = (b1 ? w[2 + i] : w[i]) + __shfl_xor_sync(FULL_MASK, b1 ? w[i] : w[2 + i], 2);
    float y = (b0 ? x[1] : x[0]) + __shfl_xor_sync(FULL_MASK, b0 ? x[0] : x[1], 1);
    y += __shfl_xor_sync(FULL_MASK, y, 8);
    return y + __shfl_xor_sync(FULL_MASK, y, 16);
}

// One group's online-softmax update of a head in the decode attention: sc is this lane's score
// (of one of the group's keys, which lie on the lanes 1, 2 and `far` apart), `valid` whether that
// key exists. Updates the running max m and sum l, sets `corr` (how much earlier outputs shrink)
// and returns the lane's probability.
__device__ __forceinline__ float online_softmax_group(float sc, bool valid, int far, float& m, float& l,
                                                      float& corr) {
    if (!valid) sc = -INFINITY;
    float mx = fmaxf(sc, __shfl_xor_sync(FULL_MASK, sc, 1));
    mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
    mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, far));
    const float m_new = fmaxf(m, mx);
    corr = exp2f(m - m_new);
    const float p = valid ? exp2f(sc - m_new) : 0.0f;
    float ps = p + __shfl_xor_sync(FULL_MASK, p, 1);
    ps += __shfl_xor_sync(FULL_MASK, ps, 2);
    ps += __shfl_xor_sync(FULL_MASK, ps, far);
    l = l * corr + ps;
    m = m_new;
    return p;
}

// What both decode attention builds (attention_many, attention_many_w16) share: the block's
// token, KV head and context slice, its keys' cache slots and, with QKN, lane l's RoPE factors
// (dims d0..d0+3 pair with the lane half / 4 away), formed while the kernel before finishes.
struct ManyBlock {
    int lane, warp, t, kv, G, W, d, d0, keys, begin, end, active, last, partner, block_size;
    bool has_dims, first_half;
    const u32* table;
    float cs[4], sn[4];

    template <bool QKN>
    __device__ __forceinline__ void init(const u32* __restrict__ positions, const u32* __restrict__ token_seq,
                                         const u32* __restrict__ block_tables, int max_blocks, int bs, int H,
                                         int KV, int dim, int chunk, double log2_theta) {
        lane = threadIdx.x & 31;
        warp = threadIdx.x >> 5;
        t = blockIdx.x;
        kv = blockIdx.y;
        G = H / KV;
        d = dim;
        W = KV * d;
        d0 = lane * 4;
        has_dims = d0 < d;
        keys = (int)positions[t] + 1;
        begin = (int)blockIdx.z * chunk;
        end = min(keys, begin + chunk);
        active = min((int)gridDim.z, (keys + chunk - 1) / chunk);
        table = block_tables + (size_t)token_seq[t] * max_blocks;
        block_size = bs;
        const int half = d / 2;
        last = keys - 1;
        first_half = d0 < half;
        partner = first_half ? lane + half / 4 : lane - half / 4;
        if constexpr (QKN) {
#pragma unroll
            for (int c = 0; c < 4; ++c)
                rope_cs((u32)last, (first_half ? d0 : d0 - half) + c, d, log2_theta, &cs[c], &sn[c]);
        }
    }

    // The cache slot of `key` (0 past the slice).
    __device__ __forceinline__ u32 slot_of(int key) const {
        return key < end ? table[key / block_size] * (u32)block_size + (u32)(key % block_size) : 0u;
    }

    // QKN: RMSNorm of a head's values x (lane l's four dims) with `gain`, then RoPE into res
    // (every lane calls it: it shuffles).
    __device__ __forceinline__ void norm_rope(float* x, const float* gain, float* res, float eps) const {
        float ss = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; ++c) ss += x[c] * x[c];
        const float inv = rsqrtf(warp_sum(ss) / d + eps);
#pragma unroll
        for (int c = 0; c < 4; ++c) x[c] *= inv * gain[c];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const float other = __shfl_sync(FULL_MASK, x[c], partner);
            res[c] = first_half ? x[c] * cs[c] - other * sn[c] : x[c] * cs[c] + other * sn[c];
        }
    }
};

// The decode attention's prologue loads, every one issued before any is used (one round trip,
// not one per head): lane l's four dims of the block's query heads (the QKV projection's with
// QKN), and with `own_key` the token's key and value rows and both gains.
template <int GM, bool QKN>
__device__ __forceinline__ void many_prologue_loads(const ManyBlock& b, const float* __restrict__ q,
                                                    const float* __restrict__ q_norm,
                                                    const float* __restrict__ k_norm, int H, int KV, bool own_key,
                                                    float (&qx)[GM][4], float (&kx)[4], float (&vx)[4],
                                                    float (&gq)[4], float (&gk)[4]) {
    const int d = b.d, d0 = b.d0;
    const size_t q_row = (size_t)b.t * (QKN ? H + 2 * KV : H) * d;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
#pragma unroll
        for (int g = 0; g < GM; ++g)
            qx[g][c] = g < b.G && b.has_dims ? q[q_row + (size_t)(b.kv * b.G + g) * d + d0 + c] : 0.0f;
        const bool kvx = own_key && b.has_dims;
        kx[c] = kvx ? q[q_row + (size_t)(H + b.kv) * d + d0 + c] : 0.0f;
        vx[c] = kvx ? q[q_row + (size_t)(H + KV + b.kv) * d + d0 + c] : 0.0f;
        gq[c] = QKN && b.has_dims ? q_norm[d0 + c] : 0.0f;
        gk[c] = own_key && b.has_dims ? k_norm[d0 + c] : 0.0f;
    }
}

// QKN: warp 0 writes the token's own key and value (lane l's four dims) to its cache slot. No
// block reads that slot from the cache, so the write needs no ordering within the kernel.
template <typename KT>
__device__ __forceinline__ void many_store_own_key(const ManyBlock& b, const u32* __restrict__ slots, KT* kc_out,
                                                   KT* vc_out, const float (&kn)[4], const float (&vn)[4]) {
    if (b.warp == 0 && b.has_dims) {
        const size_t row = (size_t)slots[b.t] * b.W + (size_t)b.kv * b.d + b.d0;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            kv_store(kc_out + row + c, kn[c]);
            kv_store(vc_out + row + c, vn[c]);
        }
    }
}

// The end of a decode attention block: its warps' partials (N dims a lane from e0) merged in
// shared memory, then the context's splits combined in the cluster or by the last to finish.
template <int GM, int N>
__device__ __forceinline__ void many_finish(float* smem, const ManyBlock& b, int e0, const float (&o)[GM][N],
                                            const float (&m)[GM], const float (&l)[GM], bool clustered, int H,
                                            int KV, float* __restrict__ out, float* __restrict__ part_o,
                                            float* __restrict__ part_ml, u32* __restrict__ counters) {
    store_warp_partials<GM, N>(smem, b.G, b.d, e0, o, m, l);
    __syncthreads();
#if __CUDA_ARCH__ >= 900
    if (clustered) {
        finish_splits_cluster<GM>(smem, b.G, b.d, H, b.t, b.kv, b.active, out);
        return;
    }
#endif
    finish_splits(smem, b.G, b.d, H, KV, b.t, b.kv, (int)blockIdx.z, b.active, out, part_o, part_ml, counters);
}

// Attention for many one-token sequences at once (batched decode, T > 8 rows): a block per
// (token, KV head, context slice). A warp takes 8 keys at a time and loads their K and V rows
// together, each row coalesced (lane l holds dims [4 l, 4 l + 4)); the 8 x G scores come out of
// transpose_sum8 (lane l holds key l & 7's), so a key costs about one shuffle per head, not a
// 5-shuffle warp_sum. The next group's rows are loaded while this one is used. (The first version gave each lane a whole key row: its K loads touched 32
// rows per instruction and Nsight measured 1.8x the cache's bytes moved from DRAM.) Online
// softmax per 8 keys, warps merged in shared memory, slices combined by the last block to finish
// (finish_splits). d % 4 == 0, d <= 128. grid = (T, KV, splits), block = 32 * ATTN_WARPS,
// shared = ATTN_WARPS GM (d + 2) floats.
// QKN (qk_norm_rope_attention): q is the QKV projection [T, (H + 2 KV) d] and the kernel does
// the attention prologue itself: every warp forms its heads' q (per-head RMSNorm with q_norm,
// RoPE); the block whose slice holds the token's own key forms that key (k_norm, RoPE) and its
// value in registers, uses them for that key instead of reading the cache, and its warp 0
// writes both to the token's cache slot. No block reads that slot from the cache, so the write
// needs no ordering within the kernel. d % 8 == 0 (RoPE partners sit half / 4 lanes apart).
template <typename KT, int GM, bool QKN>
__device__ void attention_many(
    const float* __restrict__ q, const KT* __restrict__ kc, const KT* __restrict__ vc,
    const u32* __restrict__ positions, const u32* __restrict__ token_seq,
    const u32* __restrict__ block_tables, int max_blocks, int block_size, int H, int KV, int d,
    float scale_log2, int chunk, float* __restrict__ out, float* __restrict__ part_o,
    float* __restrict__ part_ml, u32* __restrict__ counters, const float* __restrict__ q_norm,
    const float* __restrict__ k_norm, const u32* __restrict__ slots, KT* kc_out, KT* vc_out,
    double log2_theta, float eps, int early_rows) {
    extern __shared__ float smem[];  // [ATTN_WARPS][G][d + 2]
    ManyBlock b;
    b.init<QKN>(positions, token_seq, block_tables, max_blocks, block_size, H, KV, d, chunk, log2_theta);
    const int lane = b.lane, r = lane & 7, G = b.G, W = b.W, d0 = b.d0, kv = b.kv;
    const int end = b.end, last = b.last;
    const bool has_dims = b.has_dims;
    int kb = b.begin + b.warp * 8;
    u32 my_slot = b.slot_of(kb + r);  // lane l: the slot of key kb + (l & 7)
    // QKN: the token's own key and value, formed below by the block whose slice holds them.
    float kn[4] = {0.0f, 0.0f, 0.0f, 0.0f}, vn[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // For a bf16 cache, double-buffered: a group's K and V rows are loaded (raw, unconverted)
    // one iteration before they are used, so each warp keeps two groups of 8-byte loads in
    // flight (single-buffered, Nsight measured 1.5 TB/s against fp32's 3.6). An fp32 cache's
    // 16-byte loads keep one group (double-buffering them takes 187 registers a thread).
    constexpr bool DOUBLE = sizeof(KT) == 2;
    constexpr int STEP = ATTN_WARPS * 8;
    KvRaw4<KT> kraw[8], vraw[8];
    auto load_group = [&](int k0) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const u32 sj = __shfl_sync(FULL_MASK, my_slot, j);
            kraw[j].zero();
            vraw[j].zero();
            if (QKN && k0 + j == last && has_dims) {
                kraw[j].set(kn);  // rounded as the cache holds it
                vraw[j].set(vn);
            } else if (k0 + j < end && has_dims) {
                const size_t row = (size_t)sj * W + (size_t)kv * d + d0;
                kraw[j].load(kc + row);
                vraw[j].load(vc + row);
            }
        }
    };
    // The first group's K and V rows are requested before q is formed, so their latency overlaps
    // the prologue. With QKN they are requested even before waiting for the QKV projection: the
    // cache rows of earlier tokens do not depend on it (they were written by kernels that
    // completed before the projection passed its own wait, which this launch follows), and the
    // token's own row is never read from the cache.
    // Without QKN the kernel before this one writes the new keys, so the loads wait for it.
    // (Requesting the earlier tokens' rows before that wait too, the token's own after it, was
    // no faster at batch 1 and 8% slower at a 2,048-token context on the H200: docs/perf.md.)
    // early_rows = 0 (QKN only, a measurement choice): the first group after the wait instead,
    // so its loads do not run beside the QKV projection this launch overlaps.
    const int kb0 = kb;
    const bool rows_before_wait = QKN && early_rows;
    if (rows_before_wait) {
        load_group(kb);
        my_slot = b.slot_of(kb + STEP + r);
    }
    pdl_begin();
    // A split past the token's position has no keys and is not counted in `active`; launched
    // as a cluster it still takes part in the combine's barriers (with nothing to offer).
#if __CUDA_ARCH__ >= 900
    const bool clustered = cluster_size() > 1;
#else
    const bool clustered = false;
#endif
    if (b.begin >= end && !clustered) return;
    if (!rows_before_wait) {
        load_group(kb);
        my_slot = b.slot_of(kb + STEP + r);
    }
    const bool own_key = QKN && b.begin < end && end == b.keys;
    float qx[GM][4], kx[4], vx[4], gq[4], gk[4];
    many_prologue_loads<GM, QKN>(b, q, q_norm, k_norm, H, KV, own_key, qx, kx, vx, gq, gk);
    float qr[GM][4], o[GM][4], m[GM], l[GM];
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        float qh[4] = {qx[g][0], qx[g][1], qx[g][2], qx[g][3]};
        if (QKN && g < G) b.norm_rope(qx[g], gq, qh, eps);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            qr[g][c] = qh[c] * scale_log2;
            o[g][c] = 0.0f;
        }
    }
    if (own_key) {
        b.norm_rope(kx, gk, kn, eps);
#pragma unroll
        for (int c = 0; c < 4; ++c) vn[c] = vx[c];
        many_store_own_key<KT>(b, slots, kc_out, vc_out, kn, vn);
        // The first group was requested before the key existed: put it in place.
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (kb0 + j == last && has_dims) {
                kraw[j].set(kn);
                vraw[j].set(vn);
            }
        }
    }
    for (; kb < end; kb += STEP) {
        const int n = min(8, end - kb);
        if (!DOUBLE && kb != kb0) {
            load_group(kb);
            my_slot = b.slot_of(kb + STEP + r);
        }
        float kf[8][4], vf[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            kraw[j].get(kf[j]);
            vraw[j].get(vf[j]);
        }
        if (DOUBLE) {
            load_group(kb + STEP);
            my_slot = b.slot_of(kb + 2 * STEP + r);
        }
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            if (g < G) {
                float v[8];
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    v[j] = qr[g][0] * kf[j][0] + qr[g][1] * kf[j][1] + qr[g][2] * kf[j][2] + qr[g][3] * kf[j][3];
                const float sc = transpose_sum8(v, lane);  // every lane: it shuffles
                float corr;
                const float p = online_softmax_group(sc, r < n, 4, m[g], l[g], corr);
#pragma unroll
                for (int c = 0; c < 4; ++c) o[g][c] *= corr;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const float pj = __shfl_sync(FULL_MASK, p, j);
#pragma unroll
                    for (int c = 0; c < 4; ++c) o[g][c] += pj * vf[j][c];
                }
            }
        }
    }
    many_finish<GM, 4>(smem, b, d0, o, m, l, clustered, H, KV, out, part_o, part_ml, counters);
}

// Eight floats as four packed bf16 pairs (rounded to nearest even, as the cache holds them).
__device__ __forceinline__ uint4 pack_bf16x8(const float (&f)[8]) {
    return make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]),
                      pack_bf16x2(f[6], f[7]));
}

// attention_many for a bf16 cache with every row read in 16-byte loads (d % 8 == 0, d <= 128,
// G <= 2). Lane l of a warp takes dims 8 (l & 15) .. + 7 of keys kb + (l >> 4) + 2 i, i < 4, of
// each group of 8: half a warp reads a row. Against the 8-byte layout (a lane's 4 dims of all 8
// keys) a group costs each lane 8 loads instead of 16, each head's scores a 5-shuffle transpose
// instead of 9 and its probabilities 4 broadcasts instead of 8: that kernel was issue-bound at
// batch 64 (Nsight: SM 62% busy, DRAM 47%, 2.9 TB/s). The two halves' partial outputs are added
// once at the end. q, and with QKN the token's own key and value, are formed in the 4-dims-a-lane
// layout (their RoPE pairs lanes) and then moved to this one by shuffles; the rest is
// attention_many's (double-buffered groups, online softmax per group, warps merged in shared
// memory, splits combined by finish_splits or a cluster).
template <int GM, bool QKN>
__device__ void attention_many_w16(
    const float* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
    const u32* __restrict__ positions, const u32* __restrict__ token_seq,
    const u32* __restrict__ block_tables, int max_blocks, int block_size, int H, int KV, int d,
    float scale_log2, int chunk, float* __restrict__ out, float* __restrict__ part_o,
    float* __restrict__ part_ml, u32* __restrict__ counters, const float* __restrict__ q_norm,
    const float* __restrict__ k_norm, const u32* __restrict__ slots, bf16_t* kc_out, bf16_t* vc_out,
    double log2_theta, float eps, int early_rows) {
    extern __shared__ float smem[];  // [ATTN_WARPS][G][d + 2]
    ManyBlock b;
    b.init<QKN>(positions, token_seq, block_tables, max_blocks, block_size, H, KV, d, chunk, log2_theta);
    const int lane = b.lane, hw = lane >> 4, m16 = lane & 15;
    const int G = b.G, W = b.W, kv = b.kv, e0 = m16 * 8, end = b.end, last = b.last;
    const bool has8 = e0 < d;
    int kb = b.begin + b.warp * 8;
    u32 my_slot = b.slot_of(kb + (lane & 7));  // lane l: the slot of key kb + (l & 7)
    // QKN: the token's own key and value in this layout, formed below by the block whose slice
    // holds them.
    uint4 kn8 = make_uint4(0u, 0u, 0u, 0u), vn8 = kn8;
    constexpr int STEP = ATTN_WARPS * 8;
    uint4 kraw[4], vraw[4];
    auto load_group = [&](int k0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int j = hw + 2 * i;
            const u32 sj = __shfl_sync(FULL_MASK, my_slot, j);
            kraw[i] = make_uint4(0u, 0u, 0u, 0u);
            vraw[i] = kraw[i];
            if (QKN && k0 + j == last && has8) {
                kraw[i] = kn8;
                vraw[i] = vn8;
            } else if (k0 + j < end && has8) {
                const size_t row = (size_t)sj * W + (size_t)kv * d + e0;
                kraw[i] = *reinterpret_cast<const uint4*>(kc + row);
                vraw[i] = *reinterpret_cast<const uint4*>(vc + row);
            }
        }
    };
    // As in attention_many: with QKN the first group is requested before the wait (early_rows).
    const int kb0 = kb;
    const bool rows_before_wait = QKN && early_rows;
    if (rows_before_wait) {
        load_group(kb);
        my_slot = b.slot_of(kb + STEP + (lane & 7));
    }
    pdl_begin();
#if __CUDA_ARCH__ >= 900
    const bool clustered = cluster_size() > 1;
#else
    const bool clustered = false;
#endif
    if (b.begin >= end && !clustered) return;
    if (!rows_before_wait) {
        load_group(kb);
        my_slot = b.slot_of(kb + STEP + (lane & 7));
    }
    // Four values a lane (lane l: dims 4 l ..) to eight (lane l: dims 8 (l & 15) ..).
    auto widen = [&](const float* x4, float* x8) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            x8[c] = __shfl_sync(FULL_MASK, x4[c], 2 * m16);
            x8[4 + c] = __shfl_sync(FULL_MASK, x4[c], 2 * m16 + 1);
        }
    };
    const bool own_key = QKN && b.begin < end && end == b.keys;
    float qx[GM][4], kx[4], vx[4], gq[4], gk[4];
    many_prologue_loads<GM, QKN>(b, q, q_norm, k_norm, H, KV, own_key, qx, kx, vx, gq, gk);
    float qr[GM][8], o[GM][8], m[GM], l[GM];
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        float qh[4] = {qx[g][0], qx[g][1], qx[g][2], qx[g][3]};
        if (QKN && g < G) b.norm_rope(qx[g], gq, qh, eps);
        widen(qh, qr[g]);
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            qr[g][c] *= scale_log2;
            o[g][c] = 0.0f;
        }
    }
    if (own_key) {
        float kn[4], k8[8], v8[8];
        b.norm_rope(kx, gk, kn, eps);
        many_store_own_key<bf16_t>(b, slots, kc_out, vc_out, kn, vx);
        widen(kn, k8);
        widen(vx, v8);
        kn8 = pack_bf16x8(k8);
        vn8 = pack_bf16x8(v8);
        // The first group was requested before the key existed: put it in place.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (kb0 + hw + 2 * i == last && has8) {
                kraw[i] = kn8;
                vraw[i] = vn8;
            }
        }
    }
    // This lane's score, after the transpose: key hw + 2 (m16 & 3) of the group.
    const int j_mine = hw + 2 * (m16 & 3);
    const bool b1 = m16 & 2, b0 = m16 & 1;
    for (; kb < end; kb += STEP) {
        const int n = min(8, end - kb);
        float kf[4][8], vf[4][8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            unpack_bf16x8(kraw[i], kf[i]);
            unpack_bf16x8(vraw[i], vf[i]);
        }
        load_group(kb + STEP);
        my_slot = b.slot_of(kb + 2 * STEP + (lane & 7));
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            if (g < G) {
                float v[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    v[i] = 0.0f;
#pragma unroll
                    for (int c = 0; c < 8; ++c) v[i] += qr[g][c] * kf[i][c];
                }
                // Transpose-sum over the half-warp: two halving exchanges leave each lane key
                // m16 & 3's sum over its 4-lane group, two more finish it.
                float w[2];
#pragma unroll
                for (int x = 0; x < 2; ++x)
                    w[x] = (b1 ? v[2 + x] : v[x]) + __shfl_xor_sync(FULL_MASK, b1 ? v[x] : v[2 + x], 2);
                float sc = (b0 ? w[1] : w[0]) + __shfl_xor_sync(FULL_MASK, b0 ? w[0] : w[1], 1);
                sc += __shfl_xor_sync(FULL_MASK, sc, 4);
                sc += __shfl_xor_sync(FULL_MASK, sc, 8);
                float corr;
                const float p = online_softmax_group(sc, j_mine < n, 16, m[g], l[g], corr);
#pragma unroll
                for (int c = 0; c < 8; ++c) o[g][c] *= corr;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float pi = __shfl_sync(FULL_MASK, p, hw * 16 + i);
#pragma unroll
                    for (int c = 0; c < 8; ++c) o[g][c] += pi * vf[i][c];
                }
            }
        }
    }
    // The halves read different keys under the same running max: add their outputs.
#pragma unroll
    for (int g = 0; g < GM; ++g)
#pragma unroll
        for (int c = 0; c < 8; ++c) o[g][c] += __shfl_xor_sync(FULL_MASK, o[g][c], 16);
    many_finish<GM, 8>(smem, b, e0, o, m, l, clustered, H, KV, out, part_o, part_ml, counters);
}

#define W16_ENTRY(GM)                                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS, 4) attention_many_w16_kvbf16_g##GM(  \
        const float* q, const bf16_t* kc, const bf16_t* vc, const u32* positions, const u32* token_seq,     \
        const u32* block_tables, int max_blocks, int block_size, int H, int KV, int d, float scale_log2,    \
        int chunk, float* out, float* part_o, float* part_ml, u32* counters) {                              \
        attention_many_w16<GM, false>(q, kc, vc, positions, token_seq, block_tables, max_blocks,          \
                                      block_size, H, KV, d, scale_log2, chunk, out, part_o, part_ml,      \
                                      counters, nullptr, nullptr, nullptr, nullptr, nullptr, 0.0, 0.0f,  \
                                      0);                                                                 \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS, 4) attention_many_qkn_w16_kvbf16_g##GM( \
        const float* qkv, bf16_t* kc, bf16_t* vc, const u32* positions, const u32* token_seq,             \
        const u32* block_tables, int max_blocks, int block_size, int H, int KV, int d, float scale_log2,    \
        int chunk, float* out, float* part_o, float* part_ml, u32* counters, const float* q_norm,          \
        const float* k_norm, const u32* slots, double log2_theta, float eps, int early_rows) {             \
        attention_many_w16<GM, true>(qkv, kc, vc, positions, token_seq, block_tables, max_blocks,         \
                                     block_size, H, KV, d, scale_log2, chunk, out, part_o, part_ml,       \
                                     counters, q_norm, k_norm, slots, kc, vc, log2_theta, eps,            \
                                     early_rows);                                                         \
    }
// (G = 4 spills at 128 registers: it keeps the 8-byte layout.)
W16_ENTRY(1)
W16_ENTRY(2)

#define MANY_ENTRY(KT, SUFFIX, GM)                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS) attention_many_##SUFFIX##_g##GM(     \
        const float* q, const KT* kc, const KT* vc, const u32* positions, const u32* token_seq,            \
        const u32* block_tables, int max_blocks, int block_size, int H, int KV, int d, float scale_log2,    \
        int chunk, float* out, float* part_o, float* part_ml, u32* counters) {                              \
        attention_many<KT, GM, false>(q, kc, vc, positions, token_seq, block_tables, max_blocks,          \
                                      block_size, H, KV, d, scale_log2, chunk, out, part_o, part_ml,      \
                                      counters, nullptr, nullptr, nullptr, nullptr, nullptr, 0.0, 0.0f,  \
                                      0);                                                                 \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS) attention_many_qkn_##SUFFIX##_g##GM( \
        const float* qkv, KT* kc, KT* vc, const u32* positions, const u32* token_seq,                     \
        const u32* block_tables, int max_blocks, int block_size, int H, int KV, int d, float scale_log2,    \
        int chunk, float* out, float* part_o, float* part_ml, u32* counters, const float* q_norm,          \
        const float* k_norm, const u32* slots, double log2_theta, float eps, int early_rows) {             \
        attention_many<KT, GM, true>(qkv, kc, vc, positions, token_seq, block_tables, max_blocks,         \
                                     block_size, H, KV, d, scale_log2, chunk, out, part_o, part_ml,       \
                                     counters, q_norm, k_norm, slots, kc, vc, log2_theta, eps,            \
                                     early_rows);                                                         \
    }
#define MANY_ENTRIES(KT, SUFFIX)                                                     \
    MANY_ENTRY(KT, SUFFIX, 1) MANY_ENTRY(KT, SUFFIX, 2) MANY_ENTRY(KT, SUFFIX, 4) \
    MANY_ENTRY(KT, SUFFIX, 8)
MANY_ENTRIES(float, kvf32)
MANY_ENTRIES(bf16_t, kvbf16)

// Long prompts: attention as fp32 cuBLAS GEMMs around a softmax kernel, one sequence and one
// chunk of its query rows at a time (crates/cuda/src/lib.rs, `attention_gemm`): scores [G n, sk]
// = q [G n, d] · k [sk, d]ᵀ per KV head (its G query heads' rows stacked), then p · v. fp32
// SGEMMs, not bf16 tensor cores over split operands: that version (three bf16 parts of q, k, p
// and v, the six products of order <= 2) was as fast but let the tensor cores' truncating
// accumulation through, and the synthetic 0.6B's logits moved 3x further from the reference.

// Query rows [row0, row0 + rows) of q [T, H * d] -> qs [H][rows][d] (head h = kv * G + g, so each
// KV head's G query heads are consecutive rows of one matrix). grid = (rows, H), block = 128.
extern "C" __global__ void attention_gemm_gather_q(const float* __restrict__ q, float* __restrict__ qs, int row0,
                                                   int rows, int H, int d) {
    pdl_begin();
    const int r = blockIdx.x, h = blockIdx.y;
    const float* src = q + (size_t)(row0 + r) * H * d + (size_t)h * d;
    float* dst = qs + ((size_t)h * rows + r) * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
}

// Keys and values at positions [0, S) of one sequence (its block table) -> ks, vs [KV][S][d] fp32.
// grid = (S, KV), block = 128.
template <typename KT>
__device__ void attention_gemm_gather_kv(const KT* __restrict__ kc, const KT* __restrict__ vc,
                                         const u32* __restrict__ table, int block_size, int S, int KV, int d,
                                         float* __restrict__ ks, float* __restrict__ vs) {
    pdl_begin();
    const int j = blockIdx.x, kv = blockIdx.y;
    const size_t slot = cache_slot(table, block_size, j);
    const size_t src = slot * KV * d + (size_t)kv * d, dst = ((size_t)kv * S + j) * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        ks[dst + c] = kv_load(kc + src + c);
        vs[dst + c] = kv_load(vc + src + c);
    }
}

// Scores s [H][rows][ldp] (unscaled) -> in place, exp(scale (s - max)) over keys [0, pos0 + r] of
// row r (causal; zero for later keys up to sk), and the row's sum into sums [H][rows]: the
// division by it waits for the output rows (attention_gemm_scatter), which saves a pass over the
// scores. grid = (rows, H), block = 256.
extern "C" __global__ void attention_gemm_softmax(float* __restrict__ s, float* __restrict__ sums, int rows, int sk,
                                                  int ldp, int pos0, float scale_log2) {
    pdl_begin();
    __shared__ float scratch[32];
    const int r = blockIdx.x, h = blockIdx.y;
    float* row = s + ((size_t)h * rows + r) * ldp;
    const int n = min(pos0 + r + 1, sk);
    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m, scratch);
    float l = 0.0f;
    for (int j = threadIdx.x; j < sk; j += blockDim.x) {
        const float e = j < n ? exp2f((row[j] - m) * scale_log2) : 0.0f;
        row[j] = e;
        l += e;
    }
    l = block_sum(l, scratch);
    if (threadIdx.x == 0) sums[(size_t)h * rows + r] = l;
}

// o [H][rows][d] (unnormalised) / sums [H][rows] -> out rows [tok0, tok0 + rows) of [T, H * d].
// grid = (rows, H), block = 128.
extern "C" __global__ void attention_gemm_scatter(const float* __restrict__ o, const float* __restrict__ sums,
                                                  float* __restrict__ out, int tok0, int rows, int H, int d) {
    pdl_begin();
    const int r = blockIdx.x, h = blockIdx.y;
    const float* src = o + ((size_t)h * rows + r) * d;
    const float l = sums[(size_t)h * rows + r];
    float* dst = out + (size_t)(tok0 + r) * H * d + (size_t)h * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c] / l;
}

#define GATHER_ENTRY(KT, SUFFIX)                                                                           \
    extern "C" __global__ void attention_gemm_gather_kv_##SUFFIX(const KT* kc, const KT* vc, const u32* table, \
                                                                int block_size, int S, int KV, int d,          \
                                                                float* ks, float* vs) {                        \
        attention_gemm_gather_kv<KT>(kc, vc, table, block_size, S, KV, d, ks, vs);                              \
    }
GATHER_ENTRY(float, kvf32)
GATHER_ENTRY(bf16_t, kvbf16)
