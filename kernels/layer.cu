// A whole decoder layer of a batch-1 decode step in one persistent kernel (sm_90+). Opt-in:
// correct, but measured slower than the per-op kernels (crates/cuda/src/layer.rs, docs/perf.md).
//
// At batch 1 every kernel of a layer reads 4-12 MB of weights, and separate kernels pay for each
// boundary: a launch, a ramp while the first loads come back, a tail while the last blocks
// finish. PDL hides part of that; what stays is the reason the step ran at a third of the copy
// bandwidth. Here one block per SM runs the layer's five phases with a grid-wide barrier between
// them, and the weights never wait for a barrier: each block owns fixed rows of the four
// matrices, known before the kernel starts, and streams them in order through a ring of
// shared-memory slots with bulk asynchronous copies (cp.async.bulk, the TMA's 1-D form, completing
// on an mbarrier). The ring's first slots are requested before pdl_wait(), so a layer's first
// weights load while the previous layer finishes; each slot is refilled with the block's next
// chunk as soon as the block has used it, so the memory system stays busy through the barriers.
//
// Phases (x the layer input [hidden], all fp32 activations, bf16 weights, fp32 accumulation):
//   1. qkv = rms_norm(x, input_norm) · Wqkvᵀ                              (rows of Wqkv)
//   2. per-head q/k RMSNorm + RoPE, the token's k/v into the paged cache, attention over the
//      cache split along the context (a block per (KV head, slice))     -> attn [H d] or partials
//      (combined by every block as it stages phase 3's input)
//   3. h = x + attn · Woᵀ                                                 (rows of Wo)
//   4. act = silu(rms_norm(h) · Wgateᵀ) * (rms_norm(h) · Wupᵀ)           (gate and up rows)
//   5. out = h + act · Wdownᵀ                                             (rows of Wdown)
// Each block stages a phase's input vector in shared memory (normalised by its own reduction)
// and computes its rows, a warp a row, from the ring.
//
// Every block must be resident at once (the grid barrier): the host launches one block per SM
// and at most the shared memory that lets one fit. The barrier counters are zero between
// launches: the last block to leave resets them, and the next launch touches them only after
// its pdl_wait(), when this grid has completed.

#define LAYER_WARPS 8
#define LAYER_THREADS (32 * LAYER_WARPS)
#define SLOT_BYTES 32768
#define LAYER_D 128  // head size: lane l holds dims [4 l, 4 l + 4)
#define LAYER_PART_STRIDE (LAYER_D + 4)  // an attention partial: o [d], max, sum, 2 pad (16-byte rows)

#define LAYER_EPI_SCALE 0  // y = dot * inv_rms
#define LAYER_EPI_ADD 1    // y = residual + dot
#define LAYER_EPI_SILU 2   // y = silu(gate * inv_rms) * (up * inv_rms)

// One of the layer's matrices: `rows` output rows of `k` bf16 weights (with `pair`, gate/up:
// output row r reads weight rows r and rows + r).
struct LayerMat {
    const bf16_t* w;
    int rows;
    int k;
    int pair;
};

// This block's share of the four matrices: rows [lo, lo + count) of each, carried by the ring in
// chunks of `per_chunk` rows (whole rows, at most SLOT_BYTES, 16-byte multiples since k % 8 == 0).
// Chunks are numbered through the four phases in order; chunk i uses slot i % slots.
struct LayerPlan {
    LayerMat mat[4];
    int lo[4], count[4], per_chunk[4], chunks[4];
    int total;
    int slots;  // ring slots of SLOT_BYTES
};

#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile(
            "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n}"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
// `bytes` (a multiple of 16) from global `src` to shared `dst` (both 16-byte aligned), counted
// against mbarrier `bar`'s expected transaction bytes.
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}

__device__ void layer_plan(LayerPlan& p, const bf16_t* w_qkv, const bf16_t* w_o, const bf16_t* w_gu,
                           const bf16_t* w_down, int hidden, int qkv_rows, int attn_width, int inter) {
    p.mat[0] = LayerMat{w_qkv, qkv_rows, hidden, 0};
    p.mat[1] = LayerMat{w_o, hidden, attn_width, 0};
    p.mat[2] = LayerMat{w_gu, inter, hidden, 1};
    p.mat[3] = LayerMat{w_down, hidden, inter, 0};
    p.total = 0;
    const long long b = blockIdx.x, g = gridDim.x;
#pragma unroll
    for (int ph = 0; ph < 4; ++ph) {
        const long long n = p.mat[ph].rows;
        p.lo[ph] = (int)(n * b / g);
        p.count[ph] = (int)(n * (b + 1) / g) - p.lo[ph];
        p.per_chunk[ph] = SLOT_BYTES / (p.mat[ph].k * 2 * (p.mat[ph].pair ? 2 : 1));
        p.chunks[ph] = (p.count[ph] + p.per_chunk[ph] - 1) / p.per_chunk[ph];
        p.total += p.chunks[ph];
    }
}

// Requests chunk i into its slot (thread 0 only; the slot's previous chunk has been used).
__device__ void layer_issue(const LayerPlan& p, int i, u32 ring, u32 bars) {
    int ph = 0, c = i;
    while (c >= p.chunks[ph]) {
        c -= p.chunks[ph];
        ++ph;
    }
    const LayerMat m = p.mat[ph];
    const int r0 = p.lo[ph] + c * p.per_chunk[ph];
    const int nr = min(p.per_chunk[ph], p.lo[ph] + p.count[ph] - r0);
    const u32 bytes = (u32)nr * (u32)m.k * 2u;
    const int slot = i % p.slots;
    const u32 bar = bars + 8u * slot, dst = ring + (u32)slot * SLOT_BYTES;
    // (The slot's last reads finished before the __syncthreads that precedes every refill.)
    mbar_expect_tx(bar, m.pair ? 2u * bytes : bytes);
    bulk_load(dst, m.w + (size_t)r0 * m.k, bytes, bar);
    if (m.pair) bulk_load(dst + bytes, m.w + ((size_t)m.rows + r0) * m.k, bytes, bar);
}

// Every block arrives, then waits for all `target` arrivals (the count only grows within a
// launch). The arrival is a release reduction (no round trip for a returned value), the wait an
// acquire poll. A wait past ~2 s means a block never arrived (a bug): trap rather than hang.
__device__ void grid_barrier(u32* count, u32 target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(count) : "memory");
        const long long t0 = clock64();
        u32 v;
        for (;;) {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(count) : "memory");
            if (v >= target) break;
            if (clock64() - t0 > 4000000000LL) __trap();
        }
    }
    __syncthreads();
}

// The residual rows [lo, lo + count) a block will add, staged into res_s around the staging of a
// phase's input so their latency overlaps it: residual_first requests this thread's first row
// (before the input's loads), residual_store stores it and the rest (after them).
__device__ __forceinline__ float residual_first(const float* res, int lo, int count) {
    return res != nullptr && (int)threadIdx.x < count ? __ldcg(res + lo + threadIdx.x) : 0.0f;
}
__device__ __forceinline__ void residual_store(float first, const float* res, int lo, int count, float* res_s) {
    if (res == nullptr) return;
    for (int i = threadIdx.x; i < count; i += LAYER_THREADS)
        res_s[i] = i == (int)threadIdx.x ? first : __ldcg(res + lo + i);
}

// xs[0, n) = src (times `gain` when given); returns 1 / rms(src) with a gain, else 1. With
// `res`, also res_s[0, res_count) = res[res_lo, ...): the residual rows this block will add, read
// now so their latency overlaps the staging. Ends with the block synchronised. Both were written
// by other blocks: read past L1.
__device__ float layer_stage(float* xs, const float* src, const float* gain, int n, float eps, float* red,
                             const float* res = nullptr, int res_lo = 0, int res_count = 0, float* res_s = nullptr) {
    const float r = residual_first(res, res_lo, res_count);
    float ss = 0.0f;
    for (int k = threadIdx.x * 4; k < n; k += LAYER_THREADS * 4) {
        float4 v = __ldcg(reinterpret_cast<const float4*>(src + k));
        if (gain != nullptr) {
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            const float4 g = *reinterpret_cast<const float4*>(gain + k);
            v.x *= g.x; v.y *= g.y; v.z *= g.z; v.w *= g.w;
        }
        *reinterpret_cast<float4*>(xs + k) = v;
    }
    residual_store(r, res, res_lo, res_count, res_s);
    if (gain == nullptr) {
        __syncthreads();
        return 1.0f;
    }
    return rsqrtf(block_sum(ss, red) / n + eps);
}

__device__ __forceinline__ float dot8(uint4 v, float4 a, float4 b) {
    return a.x * bf16_lo(v.x) + a.y * bf16_hi(v.x) + a.z * bf16_lo(v.y) + a.w * bf16_hi(v.y) + b.x * bf16_lo(v.z) +
           b.y * bf16_hi(v.z) + b.z * bf16_lo(v.w) + b.w * bf16_hi(v.w);
}

// Two weight rows in shared memory (w1 may equal w0) against the staged vector, over the
// 8-element groups [j0, j1): the warp's sums, in every lane. Two groups a lane at a time, so four
// smem loads of each row are in flight together.
__device__ __forceinline__ void dot2_smem(const bf16_t* w0, const bf16_t* w1, const float* xs, int j0, int j1,
                                          int lane, float& s0, float& s1) {
    const uint4* v0 = reinterpret_cast<const uint4*>(w0);
    const uint4* v1 = reinterpret_cast<const uint4*>(w1);
    const float4* xv = reinterpret_cast<const float4*>(xs);
    float a0 = 0.0f, a1 = 0.0f, b0 = 0.0f, b1 = 0.0f;
    int j = j0 + lane;
    for (; j + 32 < j1; j += 64) {
        const uint4 p0 = v0[j], p1 = v0[j + 32], q0 = v1[j], q1 = v1[j + 32];
        const float4 x0 = xv[2 * j], x1 = xv[2 * j + 1], y0 = xv[2 * j + 64], y1 = xv[2 * j + 65];
        a0 += dot8(p0, x0, x1);
        a1 += dot8(p1, y0, y1);
        b0 += dot8(q0, x0, x1);
        b1 += dot8(q1, y0, y1);
    }
    if (j < j1) {
        const float4 x0 = xv[2 * j], x1 = xv[2 * j + 1];
        a0 += dot8(v0[j], x0, x1);
        b0 += dot8(v1[j], x0, x1);
    }
    s0 = a0 + a1;
    s1 = b0 + b1;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        s0 += __shfl_xor_sync(FULL_MASK, s0, o);
        s1 += __shfl_xor_sync(FULL_MASK, s1, o);
    }
}

// An output row from its product a (and b, the up product, with SILU); with ADD its residual is
// res_s[res_row].
template <int EPI>
__device__ __forceinline__ float layer_out(float a, float b, float inv, const float* res_s, int res_row) {
    if (EPI == LAYER_EPI_SILU) return silu(a * inv) * (b * inv);
    if (EPI == LAYER_EPI_ADD) return res_s[res_row] + a;
    return a * inv;
}

// Phase `ph`'s rows from the ring (its chunks start at number i0); returns the next chunk's
// number. Each used slot is refilled with the chunk p.slots ahead. With 8+ rows in a chunk a warp
// takes two rows at once (a row and its up row with SILU); with fewer (long rows: a slot holds
// few) each row's k range is split over 8 / rows warps, whose sums meet in `part` (16 floats).
// With ADD the residual comes from res_s (staged, by row - lo). `waited` (when tracing) sums the
// time spent waiting for slots.
template <int EPI>
__device__ int layer_rows(const LayerPlan& p, int ph, int i0, const unsigned char* ring, u32 ring_s, u32 bars,
                          const float* xs, float inv, const float* res_s, float* y, float* part,
                          unsigned long long* waited) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int k = p.mat[ph].k, k8 = k / 8, lo = p.lo[ph];
    for (int c = 0; c < p.chunks[ph]; ++c) {
        const int i = i0 + c, slot = i % p.slots;
        const unsigned long long w0 = waited != nullptr ? globaltimer_ns() : 0ull;
        mbar_wait(bars + 8u * slot, (u32)(i / p.slots) & 1u);
        if (waited != nullptr) *waited += globaltimer_ns() - w0;
        const int r0 = lo + c * p.per_chunk[ph];
        const int nr = min(p.per_chunk[ph], lo + p.count[ph] - r0);
        const bf16_t* base = reinterpret_cast<const bf16_t*>(ring + (size_t)slot * SLOT_BYTES);
        // Warps per row: the most (a power of two) with nr * spr <= LAYER_WARPS.
        const int spr = nr >= 5 ? 1 : (nr >= 3 ? 2 : (nr == 2 ? 4 : 8));
        if (spr == 1) {
            const int step = EPI == LAYER_EPI_SILU ? LAYER_WARPS : 2 * LAYER_WARPS;
            for (int r = warp; r < nr; r += step) {
                // The second row: up with SILU, else the row a warp-count on (or r again).
                const int r2 = EPI == LAYER_EPI_SILU ? nr + r : (r + LAYER_WARPS < nr ? r + LAYER_WARPS : r);
                float a, b;
                dot2_smem(base + (size_t)r * k, base + (size_t)r2 * k, xs, 0, k8, lane, a, b);
                if (lane == 0) {
                    y[r0 + r] = layer_out<EPI>(a, b, inv, res_s, r0 + r - lo);
                    if (EPI != LAYER_EPI_SILU && r2 > r)
                        y[r0 + r2] = layer_out<EPI>(b, 0.0f, inv, res_s, r0 + r2 - lo);
                }
            }
        } else {
            const int r = warp / spr, sl = warp % spr;
            float a = 0.0f, b = 0.0f;
            if (r < nr) {
                const int r2 = EPI == LAYER_EPI_SILU ? nr + r : r;
                dot2_smem(base + (size_t)r * k, base + (size_t)r2 * k, xs, k8 * sl / spr, k8 * (sl + 1) / spr,
                          lane, a, b);
            }
            if (lane == 0) {
                part[2 * warp] = a;
                part[2 * warp + 1] = b;
            }
            __syncthreads();
            if (r < nr && sl == 0 && lane == 0) {
                float sa = 0.0f, sb = 0.0f;
                for (int q = 0; q < spr; ++q) {
                    sa += part[2 * (warp + q)];
                    sb += part[2 * (warp + q) + 1];
                }
                y[r0 + r] = layer_out<EPI>(sa, sb, inv, res_s, r0 + r - lo);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0 && i + p.slots < p.total) layer_issue(p, i + p.slots, ring_s, bars);
    }
    return i0 + p.chunks[ph];
}

// Per-head RMSNorm (gain `gain`) and split-half RoPE (cos/sin table `cs`) of one head of 128
// values at `src`: lane l's four outputs, dims [4 l, 4 l + 4). Lane l and l ^ 16 hold the pairs
// (i, i + 64) RoPE rotates together.
__device__ __forceinline__ void norm_rope4(const float* src, const float* gain, const float* cs, float eps,
                                           int lane, float out[4]) {
    const float4 x = __ldcg(reinterpret_cast<const float4*>(src + 4 * lane));
    const float4 g = *reinterpret_cast<const float4*>(gain + 4 * lane);
    const float inv = rsqrtf(warp_sum(x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w) / LAYER_D + eps);
    const float y[4] = {x.x * inv * g.x, x.y * inv * g.y, x.z * inv * g.z, x.w * inv * g.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float partner = __shfl_xor_sync(FULL_MASK, y[j], 16);
        const int i = (4 * lane + j) & (LAYER_D / 2 - 1);
        const float c = cs[2 * i], s = cs[2 * i + 1];
        out[j] = lane < 16 ? y[j] * c - partner * s : y[j] * c + partner * s;
    }
}

// This block's share of phase 2: keys [begin, end) of KV head kv, slice `split` of S (at most
// smax). The context splits into at most gridDim.x / KV slices of a multiple of 8 keys (at least
// 32); block b takes slice b % S of KV head b / S, blocks past KV * S have no share. Every block
// derives the same S from the position.
struct AttnSlice {
    int kv, split, S, smax, begin, end;
    bool active;
};

__device__ AttnSlice attn_slice(u32 pos, int KV) {
    AttnSlice a;
    const int ctx = (int)pos + 1;
    a.smax = max(1, (int)gridDim.x / KV);
    const int chunk = max(32, ((ctx + a.smax - 1) / a.smax + 7) & ~7);
    a.S = (ctx + chunk - 1) / chunk;
    a.active = (int)blockIdx.x < KV * a.S;
    a.kv = blockIdx.x / a.S;
    a.split = blockIdx.x % a.S;
    a.begin = a.split * chunk;
    a.end = min(ctx, a.begin + chunk);
    return a;
}

// Asks L2 for the cached keys and values this block's attention share will read (positions
// before the new token: no kernel of this step writes them), so phase 2 finds them on chip.
template <typename KT>
__device__ void prefetch_slice(const AttnSlice& a, const KT* kc, const KT* vc, const u32* table, int bs, u32 pos,
                               int KV) {
    if (!a.active) return;
    constexpr int lines = LAYER_D * (int)sizeof(KT) / 128;  // 128-byte lines per head row
    const int keys = min(a.end, (int)pos) - a.begin;
    for (int i = threadIdx.x; i < keys * 2 * lines; i += LAYER_THREADS) {
        const int key = a.begin + i / (2 * lines), part = i % (2 * lines);
        const size_t row = ((size_t)table[key / bs] * bs + key % bs) * KV * LAYER_D + (size_t)a.kv * LAYER_D;
        const KT* p = (part < lines ? kc : vc) + row + (part % lines) * (128 / sizeof(KT));
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
    }
}

// Phase 2 (see the top of the file) on this block's slice `a`, for G = H / KV <= GM query heads
// per KV head. One slice writes attn; several write partials to `part`, [H][smax]
// [LAYER_PART_STRIDE] (o, max, sum), which stage_attention combines. `scratch` holds GM d +
// LAYER_WARPS G (d + 2) floats.
template <typename KT, int GM>
__device__ void layer_attention(const AttnSlice& a, const float* qkv, const float* q_norm, const float* k_norm,
                                KT* kc, KT* vc, const u32* table, int bs, u32 pos, int H, int KV, float qk_eps,
                                float scale_log2, const float* cs, float* scratch, float* attn, float* part) {
    constexpr int d = LAYER_D;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int G = H / KV, ctx = (int)pos + 1;
    if (!a.active) return;
    const int kv = a.kv, split = a.split, S = a.S, smax = a.smax, begin = a.begin, end = a.end;
    const bool has_new = end == ctx;  // this slice ends at the new token
    const size_t W = (size_t)KV * d;
    float* qs = scratch;                       // [G][d], scaled for exp2
    float* merge = scratch + GM * d;     // [warps][G][d + 2]
    // Warp w takes keys begin + 4 w .. + 3, then 32 further on; all four K and V rows in flight.
    // The first group's cached rows (keys before the new token: nothing this step writes) are
    // requested before q is formed, so their latency overlaps the prologue.
    float kf[4][4], vf[4][4];
    int key0 = begin + 4 * warp;
    auto load_key = [&](int k0, int i) {
        const int key = k0 + i;
        const size_t row = ((size_t)table[key / bs] * bs + key % bs) * W + (size_t)kv * d + 4 * lane;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            kf[i][j] = kv_load(kc + row + j);
            vf[i][j] = kv_load(vc + row + j);
        }
    };
#pragma unroll
    for (int i = 0; i < 4; ++i)
        if (key0 + i < end && key0 + i != (int)pos) load_key(key0, i);
    for (int task = warp; task < G + 2; task += LAYER_WARPS) {
        float v[4];
        if (task < G) {
            const int h = kv * G + task;
            norm_rope4(qkv + (size_t)h * d, q_norm, cs, qk_eps, lane, v);
#pragma unroll
            for (int j = 0; j < 4; ++j) qs[task * d + 4 * lane + j] = v[j] * scale_log2;
        } else if (has_new) {
            const size_t row = ((size_t)table[pos / bs] * bs + pos % bs) * W + (size_t)kv * d + 4 * lane;
            if (task == G) {
                norm_rope4(qkv + (size_t)(H + kv) * d, k_norm, cs, qk_eps, lane, v);
#pragma unroll
                for (int j = 0; j < 4; ++j) kv_store(kc + row + j, v[j]);
            } else {
                const float4 x = __ldcg(reinterpret_cast<const float4*>(qkv + (size_t)(H + KV + kv) * d + 4 * lane));
                kv_store(vc + row, x.x);
                kv_store(vc + row + 1, x.y);
                kv_store(vc + row + 2, x.z);
                kv_store(vc + row + 3, x.w);
            }
        }
    }
    __syncthreads();  // q staged; the new key and value in the cache, visible to the block
#pragma unroll
    for (int i = 0; i < 4; ++i)
        if (key0 + i == (int)pos && key0 + i < end) load_key(key0, i);

    float qr[GM][4], o[GM][4], m[GM], l[GM];
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            qr[g][j] = g < G ? qs[g * d + 4 * lane + j] : 0.0f;
            o[g][j] = 0.0f;
        }
    }
    for (; key0 < end; key0 += 4 * LAYER_WARPS) {
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            if (g < G) {
                float s[4], m_new = m[g];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    float dot = 0.0f;
#pragma unroll
                    for (int j = 0; j < 4; ++j) dot += qr[g][j] * kf[i][j];
                    s[i] = key0 + i < end ? warp_sum(dot) : -INFINITY;
                    m_new = fmaxf(m_new, s[i]);
                }
                const float corr = exp2f(m[g] - m_new);
                l[g] *= corr;
#pragma unroll
                for (int j = 0; j < 4; ++j) o[g][j] *= corr;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    if (key0 + i < end) {
                        const float pw = exp2f(s[i] - m_new);
                        l[g] += pw;
#pragma unroll
                        for (int j = 0; j < 4; ++j) o[g][j] += pw * vf[i][j];
                    }
                }
                m[g] = m_new;
            }
        }
        // The next group's rows (all cached before the new token, or it, written above).
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (key0 + 4 * LAYER_WARPS + i < end) load_key(key0 + 4 * LAYER_WARPS, i);
    }
    // The warps' partial softmaxes (a warp without keys has max -inf, sum 0) merged per dim.
    const int stride = d + 2;
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        if (g < G) {
            float* mine = merge + (size_t)(warp * G + g) * stride;
#pragma unroll
            for (int j = 0; j < 4; ++j) mine[4 * lane + j] = o[g][j];
            if (lane == 0) {
                mine[d] = m[g];
                mine[d + 1] = l[g];
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * d; idx += LAYER_THREADS) {
        const int g = idx / d, dd = idx % d, h = kv * G + g;
        float M = -INFINITY, L = 0.0f, O = 0.0f;
        for (int w = 0; w < LAYER_WARPS; ++w) M = fmaxf(M, merge[(w * G + g) * stride + d]);
        for (int w = 0; w < LAYER_WARPS; ++w) {
            const float* pw = merge + (w * G + g) * stride;
            if (pw[d] == -INFINITY) continue;
            const float f = exp2f(pw[d] - M);
            L += pw[d + 1] * f;
            O += pw[dd] * f;
        }
        if (S == 1) {
            attn[(size_t)h * d + dd] = O / L;
        } else {
            float* pp = part + ((size_t)h * smax + split) * LAYER_PART_STRIDE;
            pp[dd] = O;
            if (dd == 0) {
                pp[d] = M;
                pp[d + 1] = L;
            }
        }
    }
}

// Phase 3's input: the attention output, from `attn` (one slice) or combined here from the S
// slices' partials (each block does it for itself: one L2 pass instead of a last-slice combine
// and its arrival round trips before the barrier); and, as layer_stage, the block's residual
// rows. Ends with the block synchronised.
__device__ void stage_attention(float* xs, const float* attn, const float* part, int S, int smax, int width,
                                const float* res, int res_lo, int res_count, float* res_s) {
    const float r = residual_first(res, res_lo, res_count);
    for (int i = threadIdx.x * 4; i < width; i += LAYER_THREADS * 4) {
        float4 v;
        if (S == 1) {
            v = __ldcg(reinterpret_cast<const float4*>(attn + i));
        } else {
            const int h = i / LAYER_D, dd = i % LAYER_D;
            const float* ph = part + (size_t)h * smax * LAYER_PART_STRIDE;
            float M = -INFINITY;
            for (int sp = 0; sp < S; ++sp) M = fmaxf(M, __ldcg(ph + (size_t)sp * LAYER_PART_STRIDE + LAYER_D));
            float L = 0.0f;
            v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            for (int sp = 0; sp < S; ++sp) {
                const float* pp = ph + (size_t)sp * LAYER_PART_STRIDE;
                const float ms = __ldcg(pp + LAYER_D);
                if (ms == -INFINITY) continue;
                const float f = exp2f(ms - M);
                L += __ldcg(pp + LAYER_D + 1) * f;
                const float4 o = __ldcg(reinterpret_cast<const float4*>(pp + dd));
                v.x += o.x * f; v.y += o.y * f; v.z += o.z * f; v.w += o.w * f;
            }
            v.x /= L; v.y /= L; v.z /= L; v.w /= L;
        }
        *reinterpret_cast<float4*>(xs + i) = v;
    }
    residual_store(r, res, res_lo, res_count, res_s);
    __syncthreads();
}
#endif

// The layer (see the top of the file) for one sequence's one new token at positions[0], its
// cache blocks block_tables[0..]. Scratch (qkv, attn, h, act) and out are distinct buffers; x
// is read, never written. `counters` holds 2 zeros (the grid barrier's arrivals and exits), left
// zero; `part` [H][gridDim.x / KV][LAYER_PART_STRIDE] attention partials. Dynamic shared memory:
// ring_slots * SLOT_BYTES, then `scratch_floats` (the largest staged vector, or the attention's q
// and merge area), 128 floats of RoPE table, 32 of reduction scratch (16 for block sums, 16 for
// split rows), `res_floats` (even, at least the rows of a hidden-wide matrix one block owns) of
// residual rows, ring_slots mbarriers.
// grid = one block per SM, block = LAYER_THREADS.
template <typename KT, int GM>
__device__ void decoder_layer_t1(const float* __restrict__ x, const bf16_t* w_qkv, const bf16_t* w_o,
                                 const bf16_t* w_gu, const bf16_t* w_down, const float* in_norm,
                                 const float* post_norm, const float* q_norm, const float* k_norm, KT* kc, KT* vc,
                                 const u32* positions, const u32* block_tables, int block_size, float* qkv,
                                 float* attn, float* h, float* act, float* out, float* part, u32* counters,
                                 int hidden, int inter, int H, int KV, int ring_slots, int scratch_floats,
                                 int res_floats, float eps,
                                 float qk_eps,
                                 double log2_theta, float scale_log2, int trigger, unsigned long long* trace) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) unsigned char layer_smem[];
    const unsigned char* ring = layer_smem;
    float* scratch = reinterpret_cast<float*>(layer_smem + (size_t)ring_slots * SLOT_BYTES);
    float* cs = scratch + scratch_floats;
    float* red = cs + LAYER_D;
    float* res_s = red + 32;  // [res_floats]
    unsigned long long* bar_mem = reinterpret_cast<unsigned long long*>(res_s + res_floats);
    const u32 ring_s = smem_addr(layer_smem), bars = smem_addr(bar_mem);
    const int attn_width = H * LAYER_D;

    const unsigned long long t_start = globaltimer_ns();
    // The plan in shared memory: every thread reads it in every phase (indexed by phase, it
    // would live in local memory per thread).
    __shared__ LayerPlan plan;
    const LayerPlan& p = plan;
    if (threadIdx.x == 0) {
        layer_plan(plan, w_qkv, w_o, w_gu, w_down, hidden, attn_width + 2 * KV * LAYER_D, attn_width, inter);
        plan.slots = ring_slots;
        for (int s = 0; s < ring_slots; ++s) mbar_init(bars + 8u * s, 1u);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    // Weights and batch metadata are no earlier kernel's output: start before the wait.
    if (threadIdx.x == 0)
        for (int i = 0; i < min(ring_slots, p.total); ++i) layer_issue(p, i, ring_s, bars);
    const u32 pos = positions[0];
    const AttnSlice slice = attn_slice(pos, KV);
    prefetch_slice<KT>(slice, kc, vc, block_tables, block_size, pos, KV);
    for (int i = threadIdx.x; i < LAYER_D / 2; i += LAYER_THREADS)
        rope_cs(pos, i, LAYER_D, log2_theta, cs + 2 * i, cs + 2 * i + 1);
    pdl_wait();
    // The next kernel may launch (and request its first weights) from phase `trigger` on:
    // 0 at once, 1 before gate/up, 2 before down, 3 at the end.
    if (trigger == 0) pdl_launch_dependents();
    u32* sync = counters;
    const u32 G = gridDim.x;

    // With `trace`, thread 0 of every block adds its phases' durations (ns) to trace[0..10),
    // its ring waits to trace[11], and 1 to trace[12] (QFUSE_CUDA_LAYER_TRACE).
    unsigned long long stamp[11], waited = 0;
    unsigned long long* wait_sum = trace != nullptr ? &waited : nullptr;
    stamp[0] = t_start;
    stamp[1] = globaltimer_ns();
    float inv = layer_stage(scratch, x, in_norm, hidden, eps, red);
    int i = layer_rows<LAYER_EPI_SCALE>(p, 0, 0, ring, ring_s, bars, scratch, inv, nullptr, qkv, red + 16, wait_sum);
    stamp[2] = globaltimer_ns();
    grid_barrier(sync, G);
    stamp[3] = globaltimer_ns();

    layer_attention<KT, GM>(slice, qkv, q_norm, k_norm, kc, vc, block_tables, block_size, pos, H, KV, qk_eps,
                            scale_log2, cs, scratch, attn, part);
    stamp[4] = globaltimer_ns();
    grid_barrier(sync, 2 * G);
    stamp[5] = globaltimer_ns();

    stage_attention(scratch, attn, part, slice.S, slice.smax, attn_width, x, p.lo[1], p.count[1], res_s);
    i = layer_rows<LAYER_EPI_ADD>(p, 1, i, ring, ring_s, bars, scratch, 1.0f, res_s, h, red + 16, wait_sum);
    stamp[6] = globaltimer_ns();
    grid_barrier(sync, 3 * G);
    stamp[7] = globaltimer_ns();

    if (trigger == 1) pdl_launch_dependents();
    inv = layer_stage(scratch, h, post_norm, hidden, eps, red);
    i = layer_rows<LAYER_EPI_SILU>(p, 2, i, ring, ring_s, bars, scratch, inv, nullptr, act, red + 16, wait_sum);
    stamp[8] = globaltimer_ns();
    grid_barrier(sync, 4 * G);
    stamp[9] = globaltimer_ns();

    if (trigger == 2) pdl_launch_dependents();
    layer_stage(scratch, act, nullptr, inter, eps, red, h, p.lo[3], p.count[3], res_s);
    layer_rows<LAYER_EPI_ADD>(p, 3, i, ring, ring_s, bars, scratch, 1.0f, res_s, out, red + 16, wait_sum);
    if (trigger == 3) pdl_launch_dependents();
    stamp[10] = globaltimer_ns();

    // The last block out resets the barrier for the next launch.
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(sync + 1, 1u) == G - 1) {
            sync[0] = 0u;
            sync[1] = 0u;
        }
        if (trace != nullptr) {
            for (int k = 0; k < 10; ++k) atomicAdd(trace + k, stamp[k + 1] - stamp[k]);
            atomicAdd(trace + 11, waited);
            atomicAdd(trace + 12, 1ull);
        }
    }
#else
    pdl_begin();  // never launched below sm_90 (the host checks)
#endif
}

#define LAYER_ENTRY(KT, SUFFIX, GM)                                                                                  \
    extern "C" __global__ void __launch_bounds__(LAYER_THREADS, 2) decoder_layer_t1_##SUFFIX##_g##GM(                    \
        const float* x, const bf16_t* w_qkv, const bf16_t* w_o, const bf16_t* w_gu, const bf16_t* w_down,         \
        const float* in_norm, const float* post_norm, const float* q_norm, const float* k_norm, KT* kc, KT* vc,   \
        const u32* positions, const u32* block_tables, int block_size, float* qkv, float* attn, float* h,         \
        float* act, float* out, float* part, u32* counters, int hidden, int inter, int H, int KV,                 \
        int ring_slots, int scratch_floats, int res_floats, float eps, float qk_eps, double log2_theta,            \
        float scale_log2,                                                                                          \
        int trigger, unsigned long long* trace) {                                                                  \
        decoder_layer_t1<KT, GM>(x, w_qkv, w_o, w_gu, w_down, in_norm, post_norm, q_norm, k_norm, kc, vc, positions, \
                             block_tables, block_size, qkv, attn, h, act, out, part, counters, hidden, inter, H,   \
                             KV, ring_slots, scratch_floats, res_floats, eps, qk_eps, log2_theta, scale_log2, trigger, trace);  \
    }

#define LAYER_ENTRIES(KT, SUFFIX) LAYER_ENTRY(KT, SUFFIX, 2) LAYER_ENTRY(KT, SUFFIX, 4) LAYER_ENTRY(KT, SUFFIX, 8)
LAYER_ENTRIES(float, kvf32)
LAYER_ENTRIES(bf16_t, kvbf16)
