// Prompt attention on Hopper's warpgroup tensor-core instructions (wgmma; compiled for sm_90a and
// used on compute capability 9.0 for head sizes of 65-128, the default there): the numbers of
// flash.cu's fp16 build (flash_hh), with the products moved from mma.sync to wgmma so that the score and
// output tiles live in the tensor cores' accumulators and the operands are read from shared
// memory by the hardware, not staged through registers.
//
// Numerics as flash_hh: q and k rows scaled by powers of two that bring each row's largest
// element into [2^14, 2^15) and split into fp16 hi + lo (to ~2^-22 of the row's largest element);
// a score is lo·hi + hi·lo (one accumulator) plus hi·hi (another) times the rows' scales. Each
// value column of a 64-key tile scaled likewise and split; P (in [0, 1] after the max
// subtraction) split as it is; a tile's P·V (three products, fp32 accumulate over its 64 keys)
// takes the columns' scales back and joins the output in fp32 FMAs.
//
// Two kernels per launch group of sequences (flash.cu's descriptor and tiling):
//   flash_wg_gather_{kvf32,kvbf16}: a block per (64-key tile, KV head, sequence) writes the tile
//     as one contiguous FW_TILE_BYTES record, already in the shared-memory image the products
//     read: the key half (K hi, K lo: [64 keys][128 dims] fp16, K-major; the keys' scales, the
//     factor a score takes back) and the value half (Vᵀ hi, Vᵀ lo: [128 dims][64 keys]; the value
//     columns' scales), the parts in the 128-byte-swizzled layout of wgmma's descriptors.
//   flash_wg_prefill: a block per (KV head, sequence, 128 query rows; heaviest tiles first), two
//     warpgroups of 64 rows. The key tiles the block's rows see stream through two stages, each
//     half of a tile one bulk copy (the tensor-memory accelerator) completing its own mbarrier;
//     the last warp done with a half issues its next tile's copy (no producer warp: a ninth warp
//     would share a scheduler's registers with two consumer warps and cap every thread at 168
//     registers). A warpgroup stages its q rows once (scaled and split, swizzled), then per key
//     tile kt: S = Q Kᵀ as 24 m64n64k16 products issued together with tile kt - 1's P·V (12
//     m64n128k16 products, P's fp16 fragments from registers), kt's online softmax on the
//     accumulators while P·V multiplies, then O = O·alpha + O_tile·colscale for tile kt - 1.

#define FW_THREADS 256
#define FW_D 128
// One fp16 part of a key tile ([64][128]) or a value tile ([128][64]), bytes.
#define FW_PART 16384
// A gathered key tile: the key half (two parts, 64 key scales), then the value half (two parts,
// 128 column scales).
#define FW_KHALF 33024
#define FW_VHALF 33280
#define FW_TILE_BYTES 66304
// A stage holds one tile as two halves, each rounded up to whole 1 KiB swizzle-atom groups and
// loaded (and released) on its own.
#define FW_HALF_STAGE 33792
#define FW_STAGES 2
// Both warpgroups' q rows: [2 warpgroups][hi, lo][2 halves of d][64 rows][128 bytes].
#define FW_Q_BYTES 65536
// Dynamic shared memory: 1 KiB of alignment slack, q, the stages (crates/cuda/src/lib.rs).
#define FW_SMEM 201728
static_assert(FW_KHALF == 2 * FW_PART + FA_KEYS * 4 && FW_VHALF == 2 * FW_PART + FW_D * 4, "halves");
static_assert(FW_TILE_BYTES == FW_KHALF + FW_VHALF, "tile record");
static_assert(FW_HALF_STAGE % 1024 == 0 && FW_HALF_STAGE >= FW_VHALF && FW_HALF_STAGE >= FW_KHALF, "stage");
static_assert(FW_SMEM == 1024 + FW_Q_BYTES + FW_STAGES * 2 * FW_HALF_STAGE, "FW_SMEM");
static_assert(FA_KEYS == 64 && FA_ROWS == 128, "two warpgroups of 64 rows, 64-key tiles");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// S[64 x 64] = A[64 x 16] · B[64 x 16]ᵀ (+ S when `accumulate`), fp16 operands K-major in shared
// memory (descriptors), fp32 accumulators.
__device__ __forceinline__ void fw_mma_scores(float (&d)[32], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {" WG_ACC_REGS32 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : WG_ACC_OPS32(d)
                 : "l"(a), "l"(b), "r"(accumulate));
}

// O[64 x 128] = A[64 x 16] · B[128 x 16]ᵀ (+ O when `accumulate`): A from registers (fp16 pairs
// in the m16n8k16 A-fragment layout, per warp its 16 rows), B K-major in shared memory.
__device__ __forceinline__ void fw_mma_values(float (&d)[64], const u32 (&a)[4], unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {" WG_ACC_REGS64
                 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
                 : WG_ACC_OPS64(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void st_shared_v2(u32 addr, u32 a, u32 b) {
    asm volatile("st.shared.v2.b32 [%0], {%1, %2};" ::"r"(addr), "r"(a), "r"(b) : "memory");
}

// The eight fp16 (hi, lo) parts of eight values times `sc`, packed in pairs (first in the low
// half): one 16-byte chunk of each part.
__device__ __forceinline__ void fw_split8(const float (&v)[8], float sc, uint4& hi, uint4& lo) {
    half2_split(v[0] * sc, v[1] * sc, hi.x, lo.x);
    half2_split(v[2] * sc, v[3] * sc, hi.y, lo.y);
    half2_split(v[4] * sc, v[5] * sc, hi.z, lo.z);
    half2_split(v[6] * sc, v[7] * sc, hi.w, lo.w);
}

// grid = (max padded keys / 64, KV, sequences), block = 256: one key tile of one KV head, as the
// record the header describes. Keys and dims past the sequence's and d are zeros (scale 1).
template <typename KT>
__device__ void flash_wg_gather(const KT* __restrict__ kc, const KT* __restrict__ vc, const u32* __restrict__ tables,
                                int max_blocks, int block_size, const u32* __restrict__ desc, int koff0, int KV, int d,
                                int Kp, unsigned char* __restrict__ tiles) {
    pdl_begin();
    __shared__ float x[FA_KEYS][FW_D + 1];
    __shared__ float colmax[8][FW_D];
    __shared__ float scale[FW_D];
    const int kv = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int j0 = blockIdx.x * FA_KEYS;
    int keys, koff;
    if (!fa_seq_keys(desc, koff0, j0, keys, koff)) return;
    const u32* table = tables + (size_t)blockIdx.z * max_blocks;
    unsigned char* dst = tiles + ((size_t)kv * (Kp / FA_KEYS) + (koff + j0) / FA_KEYS) * FW_TILE_BYTES;
    float* kscale = reinterpret_cast<float*>(dst + 2 * FW_PART);
    float* vscale = reinterpret_cast<float*>(dst + FW_KHALF + 2 * FW_PART);
    // Warp w's keys w, w + 8, ... (their slots in the pools) and, per pool, their elements lane,
    // lane + 32, ... into registers, every load issued before any is used (a block's 64 keys
    // otherwise cost 16 dependent round trips).
    size_t src[FA_KEYS / 8];
#pragma unroll
    for (int i = 0; i < FA_KEYS / 8; ++i) {
        const int j = j0 + warp + 8 * i;
        src[i] = j < keys ? cache_slot(table, block_size, j) * KV * d + (size_t)kv * d : 0;
    }
    float v[FA_KEYS / 8][FW_D / 32];
    auto load = [&](const KT* pool) {
#pragma unroll
        for (int i = 0; i < FA_KEYS / 8; ++i)
#pragma unroll
            for (int u = 0; u < FW_D / 32; ++u) {
                const int c = lane + 32 * u;
                v[i][u] = j0 + warp + 8 * i < keys && c < d ? kv_load(pool + src[i] + c) : 0.0f;
            }
    };

    // Keys: each row's scale from its largest magnitude.
    load(kc);
#pragma unroll
    for (int i = 0; i < FA_KEYS / 8; ++i) {
        const int key = warp + 8 * i;
        float m = 0.0f;
#pragma unroll
        for (int u = 0; u < FW_D / 32; ++u) {
            x[key][lane + 32 * u] = v[i][u];
            m = fmaxf(m, fabsf(v[i][u]));
        }
        m = warp_max(m);
        if (lane == 0) {
            const float sc = fp16_row_scale(m);
            scale[key] = sc;
            kscale[key] = 1.0f / sc;
        }
    }
    load(vc);  // in flight while the keys are split
    __syncthreads();
    // A thread a (key, 8-dim chunk): chunk c of half c / 8 of the key's row.
    for (int i = tid; i < FA_KEYS * (FW_D / 8); i += 256) {
        const int r = i / (FW_D / 8), ch = i % (FW_D / 8);
        float f[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = x[r][ch * 8 + e];
        uint4 hi, lo;
        fw_split8(f, scale[r], hi, lo);
        const u32 off = (ch / 8) * (FA_KEYS * 128) + wg_swizzle(r, ch % 8);
        *reinterpret_cast<uint4*>(dst + off) = hi;
        *reinterpret_cast<uint4*>(dst + FW_PART + off) = lo;
    }
    __syncthreads();
    // Values: each column's scale from its largest magnitude over the tile's keys.
    float cm[FW_D / 32] = {};
#pragma unroll
    for (int i = 0; i < FA_KEYS / 8; ++i)
#pragma unroll
        for (int u = 0; u < FW_D / 32; ++u) {
            x[warp + 8 * i][lane + 32 * u] = v[i][u];
            cm[u] = fmaxf(cm[u], fabsf(v[i][u]));
        }
#pragma unroll
    for (int u = 0; u < FW_D / 32; ++u) colmax[warp][lane + 32 * u] = cm[u];
    __syncthreads();
    if (tid < FW_D) {
        float m = 0.0f;
        for (int w = 0; w < 8; ++w) m = fmaxf(m, colmax[w][tid]);
        const float sc = fp16_row_scale(m);
        scale[tid] = sc;
        vscale[tid] = 1.0f / sc;
    }
    __syncthreads();
    // Vᵀ: a thread a (dim, 8-key chunk).
    for (int i = tid; i < FW_D * (FA_KEYS / 8); i += 256) {
        const int c = i / (FA_KEYS / 8), ch = i % (FA_KEYS / 8);
        float f[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = x[ch * 8 + e][c];
        uint4 hi, lo;
        fw_split8(f, scale[c], hi, lo);
        const u32 off = wg_swizzle(c, ch);
        *reinterpret_cast<uint4*>(dst + FW_KHALF + off) = hi;
        *reinterpret_cast<uint4*>(dst + FW_KHALF + FW_PART + off) = lo;
    }
}

// grid = (KV, sequences, most row tiles of a sequence), block = FW_THREADS, FW_SMEM bytes of
// dynamic shared memory. `tiles` as flash_wg_gather wrote them for this launch group.
// A warpgroup issues tile kt's scores and tile kt - 1's P·V together and runs kt's softmax while
// P·V multiplies (FlashAttention-3's intra-warpgroup overlap; waiting on each tile's products in
// turn made the kernel 8% slower).
__device__ void flash_wg_prefill(const float* __restrict__ q, const unsigned char* __restrict__ tiles,
                                 float* __restrict__ out, const u32* __restrict__ desc, int koff0, int H, int KV,
                                 int d, int Kp, float scale_log2) {
    extern __shared__ unsigned char fw_smem[];
    // Per stage: [0] the key half's barrier, [1] the value half's; likewise the release counts.
    __shared__ __align__(8) unsigned long long full[FW_STAGES][2];
    __shared__ u32 released[FW_STAGES][2];
    __shared__ float qscale[FA_ROWS];
    const u32 smem = (u32)__cvta_generic_to_shared(fw_smem);
    const u32 qbase = (smem + 1023u) & ~1023u, stage0 = qbase + FW_Q_BYTES;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    FaTile tile;
    if (!fa_tile(desc, koff0, H, KV, tile)) return;
    // (Named, not a structured binding: the lambdas below capture them.)
    const int kv = tile.kv, G = tile.G, row0 = tile.row0, pos0 = tile.pos0, koff = tile.koff, rows = tile.rows,
              base = tile.base, ntiles = tile.key_tiles;
    const u32 full0 = (u32)__cvta_generic_to_shared(full);
    if (tid == 0) {
        for (int s = 0; s < FW_STAGES; ++s)
            for (int h = 0; h < 2; ++h) {
                mbar_init(full0 + 16 * s + 8 * h, 1);  // one arrival, with the half's bytes
                released[s][h] = 0;
            }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    pdl_begin();
    // Half h (0 keys, 1 values) of key tile kt into its stage kt % FW_STAGES, completing that
    // barrier's phase kt / FW_STAGES.
    const unsigned char* src = tiles + ((size_t)kv * (Kp / FA_KEYS) + koff / FA_KEYS) * FW_TILE_BYTES;
    auto half_at = [&](int kt, int h) -> u32 { return stage0 + ((kt % FW_STAGES) * 2 + h) * FW_HALF_STAGE; };
    auto bar_at = [&](int kt, int h) -> u32 { return full0 + 16 * (kt % FW_STAGES) + 8 * h; };
    auto load_half = [&](int kt, int h) {
        const u32 bytes = h ? FW_VHALF : FW_KHALF;
        mbar_arrive_expect(bar_at(kt, h), bytes);
        bulk_load(half_at(kt, h), src + (size_t)kt * FW_TILE_BYTES + h * FW_KHALF, bytes, bar_at(kt, h));
    };
    auto wait_half = [&](int kt, int h) { mbar_wait(bar_at(kt, h), (u32)((kt / FW_STAGES) & 1)); };
    // Every lane of the warp is done with half h of tile kt (the values it read from it used):
    // the warp releases it, and the block's last warp to do so refills it with tile kt + FW_STAGES.
    auto release_half = [&](int kt, int h) {
        __syncwarp();
        if (lane == 0) {
            // Release (this warp's reads before the count), acquire (the other warps' before the
            // refill).
            u32 done;
            asm volatile("atom.acq_rel.cta.shared::cta.add.u32 %0, [%1], 1;"
                         : "=r"(done)
                         : "r"((u32)__cvta_generic_to_shared(&released[kt % FW_STAGES][h]))
                         : "memory");
            if (done % (FW_THREADS / 32) == FW_THREADS / 32 - 1 && kt + FW_STAGES < ntiles) {
                fence_proxy_async();
                load_half(kt + FW_STAGES, h);
            }
        }
    };
    if (tid == 0)
        for (int kt = 0; kt < FW_STAGES && kt < ntiles; ++kt) {
            load_half(kt, 0);
            load_half(kt, 1);
        }

    // Warpgroup wg takes the tile's rows 64 wg ..; its warp wl holds rows 16 wl + g and
    // + 8 of them in every accumulator (lane = 4 g + t; columns 8 j + 2 t, + 1 at [4 j], [4 j + 1],
    // row + 8 at [4 j + 2], [4 j + 3]).
    const int wg = warp >> 2, wl = warp & 3, g = lane >> 2, t = lane & 3;
    const u32 qw = qbase + wg * (FW_Q_BYTES / 2);
    // Each warp stages its own 16 rows (rows past the sequence repeat its last: finite scores,
    // never stored): lane l's dims 4 l .. 4 l + 3 are half l / 16 of the row, 16-byte chunk
    // (l % 16) / 2, its 8-byte half l % 2.
    for (int i = 0; i < 16; ++i) {
        const int r = wl * 16 + i;
        const int row = min(base + wg * 64 + r, rows - 1), tok = row / G, gq = row % G;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (lane * 4 < d)
            v = *reinterpret_cast<const float4*>(q + (size_t)(row0 + tok) * H * d + (size_t)(kv * G + gq) * d + lane * 4);
        const float sc = fp16_row_scale(warp_max(fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)))));
        u32 h0, l0, h1, l1;
        half2_split(v.x * sc, v.y * sc, h0, l0);
        half2_split(v.z * sc, v.w * sc, h1, l1);
        const u32 off = (lane / 16) * (64 * 128) + wg_swizzle(r, (lane % 16) / 2) + (lane & 1) * 8;
        st_shared_v2(qw + off, h0, h1);
        st_shared_v2(qw + FW_Q_BYTES / 4 + off, l0, l1);
        if (lane == 0) qscale[wg * 64 + r] = 1.0f / sc;
    }
    fence_proxy_async();
    named_barrier(1 + wg, 128);

    const int ra = wg * 64 + wl * 16 + g, rb = ra + 8;  // this thread's rows in the tile
    const int lim0 = pos0 + min(base + ra, rows - 1) / G, lim1 = pos0 + min(base + rb, rows - 1) / G;
    const float qs0 = qscale[ra], qs1 = qscale[rb];
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;

    // S = Q Kᵀ of tile kt over the 8 k16 steps of d, committed as one group: the small products
    // in one accumulator, hi·hi in another (the tensor cores truncate relative to the
    // accumulator as they add).
    auto issue_scores = [&](int kt, float (&sc)[32], float (&small)[32]) {
        const u32 st = half_at(kt, 0);
        wg_fence_acc(sc);
        wg_fence_acc(small);
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < FW_D / 16; ++ks) {
            const u32 off = (ks / 4) * (64 * 128) + (ks % 4) * 32;
            const unsigned long long qh = wg_desc(qw + off), ql = wg_desc(qw + FW_Q_BYTES / 4 + off);
            const unsigned long long kh = wg_desc(st + off), kl = wg_desc(st + FW_PART + off);
            fw_mma_scores(small, ql, kh, ks > 0);
            fw_mma_scores(small, qh, kl, 1);
            fw_mma_scores(sc, qh, kh, ks > 0);
        }
        wg_commit();
    };
    // The online softmax of tile kt's scores (complete): the rows' scales and the mask, then
    // fa_softmax_step (sc becomes P; al0, al1 the factors the output so far takes).
    auto softmax = [&](int kt, float (&sc)[32], const float (&small)[32], float& al0, float& al1) {
        const float* kscale = reinterpret_cast<const float*>(fw_smem + (half_at(kt, 0) - smem) + 2 * FW_PART);
        const int k0 = kt * FA_KEYS;
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float2 ks = *reinterpret_cast<const float2*>(kscale + 8 * j + 2 * t);
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int key = k0 + 8 * j + 2 * t + u;
                const float kf = u ? ks.y : ks.x;
                float& s0 = sc[4 * j + u];
                float& s1 = sc[4 * j + 2 + u];
                s0 = key > lim0 ? -INFINITY : (s0 + small[4 * j + u]) * (qs0 * kf);
                s1 = key > lim1 ? -INFINITY : (s1 + small[4 * j + 2 + u]) * (qs1 * kf);
                mx0 = fmaxf(mx0, s0);
                mx1 = fmaxf(mx1, s1);
            }
        }
        fa_softmax_step<32>(sc, mx0, mx1, scale_log2, m0, m1, l0, l1, al0, al1);
    };
    // P's A fragments for the 4 k16 steps of keys: the score pairs of n-tiles 2 j and 2 j + 1 as
    // they are, in the order a0 (row g, keys 2 t..), a1 (row g + 8), a2 (row g, keys 2 t + 8..),
    // a3 (sc[8 j + 0..1], [+ 2..3], [+ 4..5], [+ 6..7]), split into hi and lo.
    auto split_p = [&](const float (&sc)[32], u32 (&ph)[4][4], u32 (&pl)[4][4]) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int f = 0; f < 4; ++f) half2_split(sc[8 * j + 2 * f], sc[8 * j + 2 * f + 1], ph[j][f], pl[j][f]);
    };
    // ot = P V of tile kt (its value half waited for), committed as one group.
    auto issue_values = [&](int kt, const u32 (&ph)[4][4], const u32 (&pl)[4][4], float (&ot)[64]) {
        const u32 st = half_at(kt, 1);
        wg_fence_acc(ot);
        wg_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const unsigned long long vh = wg_desc(st + j * 32), vl = wg_desc(st + FW_PART + j * 32);
            fw_mma_values(ot, pl[j], vh, j > 0);
            fw_mma_values(ot, ph[j], vl, 1);
            fw_mma_values(ot, ph[j], vh, 1);
        }
        wg_commit();
    };
    // o = o·al + ot·(tile kt's column scales).
    auto accumulate = [&](int kt, const float (&ot)[64], float al0, float al1) {
        const float* vscale = reinterpret_cast<const float*>(fw_smem + (half_at(kt, 1) - smem) + 2 * FW_PART);
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            const float2 vs = *reinterpret_cast<const float2*>(vscale + 8 * e + 2 * t);
            o[4 * e] = fmaf(o[4 * e], al0, ot[4 * e] * vs.x);
            o[4 * e + 1] = fmaf(o[4 * e + 1], al0, ot[4 * e + 1] * vs.y);
            o[4 * e + 2] = fmaf(o[4 * e + 2], al1, ot[4 * e + 2] * vs.x);
            o[4 * e + 3] = fmaf(o[4 * e + 3], al1, ot[4 * e + 3] * vs.y);
        }
    };

    // Tile 0's scores and softmax; then per tile kt: kt's scores and kt - 1's P·V issued
    // together, kt's softmax while P·V multiplies, kt - 1 joins the output.
    u32 ph[4][4], pl[4][4];
    float al0, al1;
    {
        float sc[32], small[32];
        wait_half(0, 0);
        issue_scores(0, sc, small);
        wg_wait<0>();
        wg_fence_acc(sc);
        wg_fence_acc(small);
        softmax(0, sc, small, al0, al1);
        release_half(0, 0);
        split_p(sc, ph, pl);
    }
    for (int kt = 1; kt < ntiles; ++kt) {
        float sc[32], small[32], ot[64];
        wait_half(kt, 0);
        issue_scores(kt, sc, small);
        wait_half(kt - 1, 1);
        issue_values(kt - 1, ph, pl, ot);
        wg_wait<1>();
        wg_fence_acc(sc);
        wg_fence_acc(small);
        float nal0, nal1;
        softmax(kt, sc, small, nal0, nal1);
        release_half(kt, 0);
        wg_wait<0>();
        wg_fence_acc(ot);
        accumulate(kt - 1, ot, al0, al1);
        release_half(kt - 1, 1);
        split_p(sc, ph, pl);
        al0 = nal0;
        al1 = nal1;
    }
    float ot[64];
    wait_half(ntiles - 1, 1);
    issue_values(ntiles - 1, ph, pl, ot);
    wg_wait<0>();
    wg_fence_acc(ot);
    accumulate(ntiles - 1, ot, al0, al1);
    release_half(ntiles - 1, 1);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = base + (h ? rb : ra);
        if (row >= rows) continue;
        const int tok = row / G, gq = row % G;
        const float inv = 1.0f / (h ? l1 : l0);
        float* dst = out + (size_t)(row0 + tok) * H * d + (size_t)(kv * G + gq) * d;
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            const int c = 8 * e + 2 * t;
            if (c < d) *reinterpret_cast<float2*>(dst + c) = make_float2(o[4 * e + 2 * h] * inv, o[4 * e + 2 * h + 1] * inv);
        }
    }
}

#define FW_GATHER_ENTRY(SUFFIX, KT)                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) flash_wg_gather_##SUFFIX(                                     \
        const KT* kc, const KT* vc, const u32* tables, int max_blocks, int block_size, const u32* desc, int koff0,  \
        int KV, int d, int Kp, unsigned char* tiles) {                                                              \
        flash_wg_gather<KT>(kc, vc, tables, max_blocks, block_size, desc, koff0, KV, d, Kp, tiles);                 \
    }
FW_GATHER_ENTRY(kvf32, float)
FW_GATHER_ENTRY(kvbf16, bf16_t)

extern "C" __global__ void __launch_bounds__(FW_THREADS, 1)
    flash_wg_prefill_d128(const float* q, const unsigned char* tiles, float* out, const u32* desc, int koff0, int H,
                          int KV, int d, int Kp, float scale_log2) {
    flash_wg_prefill(q, tiles, out, desc, koff0, H, KV, d, Kp, scale_log2);
}

#else
#error "flash_wgmma.cu uses wgmma: compile it for sm_90a"
#endif
