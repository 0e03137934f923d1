// The attention block: q/k-norm + RoPE + paged KV-cache write, and split-K ("flash-decoding")
// attention over the paged cache. Cache pools are [slots, kv_heads * head_dim] in fp32 or bf16
// (one entry point of each kernel per cache type, suffixed _kvf32 / _kvbf16); norm statistics,
// gains, RoPE angles (computed in double) and softmax are fp32 or wider.

#define MAX_G 8      // query heads per KV head handled by one block (Qwen3 dense models: 2..8)
#define MAX_DPL 8    // head_dim / 32, rounded up (head_dim <= 256)
#define ATTN_WARPS 4

__device__ __forceinline__ float kv_load(const float* p) { return *p; }
__device__ __forceinline__ float kv_load(const bf16_t* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ void kv_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void kv_store(bf16_t* p, float v) { *p = f32_to_bf16(v); }

// cos/sin of pos * theta^(-2i/d), argument and functions in double so long contexts keep precision.
__device__ __forceinline__ void rope_cs(u32 pos, int i, int d, double theta, float* c, float* s) {
    const double ang = (double)pos * pow(theta, -2.0 * i / d);
    double sd, cd;
    sincos(ang, &sd, &cd);
    *c = (float)cd;
    *s = (float)sd;
}

// Split-half RoPE on x [T, n * d]. grid = T, block = 128.
extern "C" __global__ void rope_f32(const float* __restrict__ x, const u32* __restrict__ positions,
                                    float* __restrict__ y, int cols, int d, double theta) {
    const int half = d / 2;
    const size_t row = (size_t)blockIdx.x * cols;
    const u32 pos = positions[blockIdx.x];
    for (int p = threadIdx.x; p < cols / 2; p += blockDim.x) {
        const int head = p / half, i = p % half;
        const size_t a = row + (size_t)head * d + i, b = a + half;
        float c, s;
        rope_cs(pos, i, d, theta, &c, &s);
        const float xa = x[a], xb = x[b];
        y[a] = xa * c - xb * s;
        y[b] = xb * c + xa * s;
    }
}

// k, v [T, W] fp32 -> cache pools at each token's slot. grid = T, block = 256.
template <typename KT>
__device__ void write_kv(const float* __restrict__ k, const float* __restrict__ v,
                         const u32* __restrict__ slots, KT* __restrict__ kc, KT* __restrict__ vc, int W) {
    const size_t src = (size_t)blockIdx.x * W, dst = (size_t)slots[blockIdx.x] * W;
    for (int i = threadIdx.x; i < W; i += blockDim.x) {
        kv_store(kc + dst + i, k[src + i]);
        kv_store(vc + dst + i, v[src + i]);
    }
}

// qkv [T, (H + 2 KV) d]: per-head RMSNorm (q_norm / k_norm over d) then RoPE for q and k heads,
// q to q_out [T, H d], k and v to the cache. One warp per head. grid = T, block = 32 * warps.
template <typename KT>
__device__ void qk_norm_rope_write_kv(
    const float* __restrict__ qkv, const float* __restrict__ q_norm, const float* __restrict__ k_norm,
    const u32* __restrict__ positions, const u32* __restrict__ slots, float* __restrict__ q_out,
    KT* __restrict__ kc, KT* __restrict__ vc, int H, int KV, int d, double theta, float eps) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int t = blockIdx.x, half = d / 2, heads = H + 2 * KV;
    const float* row = qkv + (size_t)t * heads * d;
    const u32 pos = positions[t];
    const size_t slot = (size_t)slots[t] * KV * d;
    for (int h = warp; h < heads; h += nwarps) {
        const float* src = row + (size_t)h * d;
        if (h >= H + KV) {  // v: copied as is
            KT* dst = vc + slot + (size_t)(h - H - KV) * d;
            for (int i = lane; i < d; i += 32) kv_store(dst + i, src[i]);
            continue;
        }
        float ss = 0.0f;
        for (int i = lane; i < d; i += 32) ss += src[i] * src[i];
        const float inv = rsqrtf(warp_sum(ss) / d + eps);
        const float* gain = h < H ? q_norm : k_norm;
        for (int i = lane; i < half; i += 32) {
            const float a = src[i] * inv * gain[i], b = src[i + half] * inv * gain[i + half];
            float c, s;
            rope_cs(pos, i, d, theta, &c, &s);
            const float ra = a * c - b * s, rb = b * c + a * s;
            if (h < H) {
                float* dst = q_out + (size_t)t * H * d + (size_t)h * d;
                dst[i] = ra;
                dst[i + half] = rb;
            } else {
                KT* dst = kc + slot + (size_t)(h - H) * d;
                kv_store(dst + i, ra);
                kv_store(dst + i + half, rb);
            }
        }
    }
}

// Causal attention over the paged cache, split along the context. Block (t, kv, split) reads the
// keys and values of KV head `kv` in its slice of token t's context once, for all G query heads
// that share it (GQA), with an online softmax per warp, then merges its warps. With one split
// it writes the normalised output; otherwise unnormalised partials (o, max, sum) for
// attention_combine. Scores use exp2 with log2(e) folded into the scale.
// grid = (T, KV, splits), block = 32 * ATTN_WARPS.
template <typename KT>
__device__ void attention_paged(
    const float* __restrict__ q, const KT* __restrict__ kc, const KT* __restrict__ vc,
    const u32* __restrict__ positions, const u32* __restrict__ token_seq,
    const u32* __restrict__ block_tables, int max_blocks, int block_size, int H, int KV, int d,
    float scale_log2, int chunk, float* __restrict__ out, float* __restrict__ part_o,
    float* __restrict__ part_ml) {
    extern __shared__ float smem[];  // [ATTN_WARPS][G][d + 2]
    static_assert(sizeof(KT) <= 4, "cache element");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x, kv = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int G = H / KV, W = KV * d;
    const u32 pos = positions[t];
    const u32* table = block_tables + (size_t)token_seq[t] * max_blocks;
    const int begin = split * chunk;
    const int end = min((int)pos + 1, begin + chunk);

    float qr[MAX_G][MAX_DPL], o[MAX_G][MAX_DPL], m[MAX_G], l[MAX_G];
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < MAX_DPL; ++j) {
            const int dd = lane + 32 * j;
            qr[g][j] = (g < G && dd < d) ? q[(size_t)t * H * d + (size_t)(kv * G + g) * d + dd] * scale_log2 : 0.0f;
            o[g][j] = 0.0f;
        }
    }
    for (int key = begin + warp; key < end; key += ATTN_WARPS) {
        const size_t slot = (size_t)table[key / block_size] * block_size + key % block_size;
        const KT* kr = kc + slot * W + (size_t)kv * d;
        const KT* vr = vc + slot * W + (size_t)kv * d;
        float kf[MAX_DPL], vf[MAX_DPL];
#pragma unroll
        for (int j = 0; j < MAX_DPL; ++j) {
            const int dd = lane + 32 * j;
            kf[j] = dd < d ? kv_load(kr + dd) : 0.0f;
            vf[j] = dd < d ? kv_load(vr + dd) : 0.0f;
        }
#pragma unroll
        for (int g = 0; g < MAX_G; ++g) {
            if (g < G) {
                float s = 0.0f;
#pragma unroll
                for (int j = 0; j < MAX_DPL; ++j) s += qr[g][j] * kf[j];
                s = warp_sum(s);
                const float m_new = fmaxf(m[g], s);
                const float corr = exp2f(m[g] - m_new), p = exp2f(s - m_new);
                l[g] = l[g] * corr + p;
#pragma unroll
                for (int j = 0; j < MAX_DPL; ++j) o[g][j] = o[g][j] * corr + p * vf[j];
                m[g] = m_new;
            }
        }
    }
    // Merge the warps' partial softmaxes.
    const int stride = d + 2;
    float* mine = smem + (size_t)warp * G * stride;
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
        if (g < G) {
#pragma unroll
            for (int j = 0; j < MAX_DPL; ++j) {
                const int dd = lane + 32 * j;
                if (dd < d) mine[g * stride + dd] = o[g][j];
            }
            if (lane == 0) {
                mine[g * stride + d] = m[g];
                mine[g * stride + d + 1] = l[g];
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * d; idx += blockDim.x) {
        const int g = idx / d, dd = idx % d;
        float M = -INFINITY;
        for (int w = 0; w < ATTN_WARPS; ++w) M = fmaxf(M, smem[(w * G + g) * stride + d]);
        float L = 0.0f, O = 0.0f;
        if (M != -INFINITY) {
            for (int w = 0; w < ATTN_WARPS; ++w) {
                const float* p = smem + (w * G + g) * stride;
                const float f = exp2f(p[d] - M);
                L += p[d + 1] * f;
                O += p[dd] * f;
            }
        }
        const int h = kv * G + g;
        if (splits == 1) {
            out[(size_t)t * H * d + (size_t)h * d + dd] = O / L;
        } else {
            const size_t pi = ((size_t)t * H + h) * splits + split;
            part_o[pi * d + dd] = O;
            if (dd == 0) {
                part_ml[pi * 2] = M;
                part_ml[pi * 2 + 1] = L;
            }
        }
    }
}

#define KV_ENTRIES(KT, SUFFIX)                                                                        \
    extern "C" __global__ void write_kv_##SUFFIX(const float* k, const float* v, const u32* slots, KT* kc,   \
                                                 KT* vc, int W) {                                           \
        write_kv<KT>(k, v, slots, kc, vc, W);                                                               \
    }                                                                                                       \
    extern "C" __global__ void qk_norm_rope_write_kv_##SUFFIX(                                              \
        const float* qkv, const float* q_norm, const float* k_norm, const u32* positions, const u32* slots, \
        float* q_out, KT* kc, KT* vc, int H, int KV, int d, double theta, float eps) {                      \
        qk_norm_rope_write_kv<KT>(qkv, q_norm, k_norm, positions, slots, q_out, kc, vc, H, KV, d, theta,   \
                                  eps);                                                                     \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS) attention_paged_##SUFFIX(                 \
        const float* q, const KT* kc, const KT* vc, const u32* positions, const u32* token_seq,            \
        const u32* block_tables, int max_blocks, int block_size, int H, int KV, int d, float scale_log2,    \
        int chunk, float* out, float* part_o, float* part_ml) {                                             \
        attention_paged<KT>(q, kc, vc, positions, token_seq, block_tables, max_blocks, block_size, H, KV, d, \
                            scale_log2, chunk, out, part_o, part_ml);                                       \
    }

KV_ENTRIES(float, kvf32)
KV_ENTRIES(bf16_t, kvbf16)

// out[t, h, :] = sum_s o_s 2^(m_s - M) / sum_s l_s 2^(m_s - M). grid = (T, H), block = 128.
extern "C" __global__ void attention_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                             float* __restrict__ out, int H, int d, int splits) {
    const int t = blockIdx.x, h = blockIdx.y;
    const size_t base = ((size_t)t * H + h) * splits;
    float M = -INFINITY;
    for (int s = 0; s < splits; ++s) M = fmaxf(M, part_ml[(base + s) * 2]);
    for (int dd = threadIdx.x; dd < d; dd += blockDim.x) {
        float L = 0.0f, O = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float ms = part_ml[(base + s) * 2];
            if (ms == -INFINITY) continue;
            const float f = exp2f(ms - M);
            L += part_ml[(base + s) * 2 + 1] * f;
            O += part_o[(base + s) * d + dd] * f;
        }
        out[(size_t)t * H * d + (size_t)h * d + dd] = O / L;
    }
}
