// Products of 9-64 rows (batched decode steps, short prompts) on the tensor cores, in one kernel
// from the fp32 activations: y = epilogue(prologue(x) w^T) with bf16 weights w [N, K].
//   prologue: x as it is, or (NORM) rms_norm(x) * g, the fp32 statistic summed by the blocks
//             that read each row's slices and combined across them;
//   epilogue: EPI_NONE y = x w^T; EPI_ADD y = residual + x w^T; EPI_SILU y[:, n] =
//             silu(x w_n^T) * (x w_{n + N/2}^T), N/2 columns.
// Each activation is split into three bf16 parts (hi + mid + lo, fp32-exact together) as the
// block stages it, so the tensor cores see the activations' full 24-bit mantissas; the three
// products share one fp32 accumulator (each add rounds relative to the running sum either way).
// The weights are read once. The `_p2` entry points (PARTS = 2, the host's default for them;
// QFUSE_CUDA_X3_TWO_PARTS=0 turns them off) multiply hi + mid only, each activation to ~2^-17 of
// itself, for two thirds of the products: the residual-adding and SiLU products, whose inputs
// the synthetic 0.6B's logits tolerate at that precision where QKV's they do not (docs/perf.md,
// 21st and 22nd sessions).
//
// Block: 8 warps over 128 weight rows (with EPI_SILU 64 gate rows and the matching 64 up rows)
// and one slice of K; warp w takes rows 32 (w & 1) .. + 32 of x (two m16 tiles; one, or none,
// where the rest lie wholly past T) and 32 weight rows (four n8 tiles). The S slices of a tile form a thread-block cluster (sm_90): each block
// leaves its partial tile (and, with NORM, its rows' partial sums of squares) in shared memory
// and, after a cluster barrier, reduces 1/S of the tile over all S blocks (distributed shared
// memory, always in slice order, so results do not depend on timing) and applies the epilogue.
//
// Pipeline: the block's whole weight slice is requested with cp.async at once, before the PDL
// wait (weights never depend on an earlier kernel), as one commit group per 64-k round. Then the
// activations go round by round through two shared buffers: a round's fp32 rows are loaded into
// registers while the round before is multiplied, split into parts and stored; each round waits
// only for its own weights. Every DRAM byte is in flight from the start, and the multiplies of
// round r overlap the arrival of rounds r + 1...
//
// mma.sync m16n8k16 (bf16 in, fp32 accumulate). The dot product is indifferent to the order of k,
// so each lane reads 16 contiguous bytes (8 k) of its weight row per 32-k chunk from shared
// memory, and the chunk's two mma k-steps take words (0, 1) and (2, 3) of that load; the
// activations were staged in the same k order, each lane's A operand of a k-step as one 16-byte
// unit, so no shuffles are needed.
// Registers are capped at 128 (X3_MIN_BLOCKS = 2) so that two blocks share an SM where their
// shared memory allows (slices of up to 8 chunks): twice the warps to hide the fragment loads'
// latency, and room for twice the clusters.
// grid = (tiles, S), cluster = (1, S), block = 256, dynamic shared memory x3::smem_bytes(kc);
// T <= 64, K % 32 == 0, K / 32 = S * kc.

// X3_WGMMA (the same file compiled for sm_90a as gemm_x3_wg.cu, entry points suffixed _wg): the
// products run on warpgroup tensor-core instructions instead of mma.sync. Each warpgroup
// multiplies all 64 activation rows by its 64 weight rows (m64n64k16, both operands read from
// shared memory by descriptor, so no fragment loads pass through registers); the weights land
// in 128-byte-swizzled K-major tiles of one 64-k round each and a round's activation parts in
// one [64 rows][64 k] tile per part, the layout gemm_wgmma.cu's TMA copies produce. The hi
// part accumulates apart from mid + lo (as in gemm_wgmma.cu). Two staging buffers: round r + 1
// is split and staged while round r's products run, and round r + 2's rows are loaded into
// registers meanwhile. Rows past T are staged as zeros and multiplied all the same.

#define X3_WARPS 8
#define X3_ROWS 128
#define X3_TMAX 64
#ifndef X3_MIN_BLOCKS
#define X3_MIN_BLOCKS 2
#endif
// Phases the trace times (x3.rs TRACE_PHASES names them).
#define X3_PHASES 8
// One round: 64 k.
#define X3_RK 64
// One part of one round's staged activations, [64 rows][64 k] bf16, in bytes.
#define X3_APART (X3_TMAX * X3_RK * 2)

// The wgmma build's dynamic shared memory (1 KiB-aligned, for the swizzled tiles): the weight
// slice's rounds (16 KiB each), then two staged rounds (three 8 KiB part tiles each), whose memory
// afterwards holds the partial tile (32 KiB) and the rows' squares and 1/rms (256 B each).
#define X3W_ROUND_BYTES 16384
#define X3W_STAGE_BYTES 49152
#ifdef X3_WGMMA
#define X3_WG 1
#define X3_NAME(name) name##_wg
#else
#define X3_WG 0
#define X3_NAME(name) name
#endif

#if X3_WG
// A round's products: the four k-steps (64 k) of each part, mid and lo into acc_lo, hi into
// acc_hi; the first round's first products set the accumulators (`later` false). The host's
// plan keeps kc even, so every round is whole (a wgmma under a per-round condition makes ptxas
// wait between the products).
template <int PARTS>
__device__ __forceinline__ void x3w_round(float (&acc_hi)[32], float (&acc_lo)[32], u32 a_addr, u32 b_addr,
                                          bool later) {
#pragma unroll
    for (int p = PARTS - 1; p >= 0; --p) {
#pragma unroll
        for (int kk = 0; kk < X3_RK / 16; ++kk) {
            const unsigned long long a = wg_desc(a_addr + (u32)(p * X3_APART + kk * 32));
            const unsigned long long b = wg_desc(b_addr + (u32)(kk * 32));
            if (p > 0) wg_mma_n64(acc_lo, a, b, later || p < PARTS - 1 || kk > 0);
            else wg_mma_n64(acc_hi, a, b, later || kk > 0);
        }
    }
}

// Splits four activations (k 4 s .. 4 s + 3 of a round, row t) into their bf16 parts and stores
// each of the first PARTS parts' 8 bytes at byte offset `at` of its part tile.
template <int PARTS>
__device__ __forceinline__ void x3w_store_parts(unsigned char* abuf, u32 at, float4 v) {
    u32 a[3], b[3];
    split_bf16x3_pair(v.x, v.y, a);
    split_bf16x3_pair(v.z, v.w, b);
#pragma unroll
    for (int q = 0; q < PARTS; ++q) *reinterpret_cast<uint2*>(abuf + q * X3_APART + at) = make_uint2(a[q], b[q]);
}
#endif

#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ void x3_mma(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Waits until at most `pending` of this thread's cp.async groups are still in flight.
__device__ __forceinline__ void x3_wait_groups(int pending) {
    switch (pending) {
        case 0: asm volatile("cp.async.wait_group 0;" ::: "memory"); break;
        case 1: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
        case 2: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
        case 3: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
        case 4: asm volatile("cp.async.wait_group 4;" ::: "memory"); break;
        case 5: asm volatile("cp.async.wait_group 5;" ::: "memory"); break;
        case 6: asm volatile("cp.async.wait_group 6;" ::: "memory"); break;
        default: asm volatile("cp.async.wait_group 7;" ::: "memory"); break;
    }
}
#endif

// RMSNorm's part of staging four activations: their squares added to the row's sum, then the
// gain applied (the 1/rms factor waits for the epilogue).
__device__ __forceinline__ void x3_norm_prologue(float4& v, float4 g, float& ss) {
    ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    v.x *= g.x; v.y *= g.y; v.z *= g.z; v.w *= g.w;
}

// Splits four activations of row R (v) and the same four of row R + 8 (u) into their bf16 parts
// and stores each of the first PARTS parts' 16 bytes, {R k0-1, R+8 k0-1, R k2-3, R+8 k2-3}: the
// A operand of one mma k-step, at byte offset `at` of the part planes of a staged round.
template <int PARTS>
__device__ __forceinline__ void x3_store_parts(unsigned char* abuf, u32 at, float4 v, float4 u) {
    u32 p0[3], p1[3], p2[3], p3[3];
    split_bf16x3_pair(v.x, v.y, p0);
    split_bf16x3_pair(u.x, u.y, p1);
    split_bf16x3_pair(v.z, v.w, p2);
    split_bf16x3_pair(u.z, u.w, p3);
#pragma unroll
    for (int q = 0; q < PARTS; ++q)
        *reinterpret_cast<uint4*>(abuf + q * X3_APART + at) = make_uint4(p0[q], p1[q], p2[q], p3[q]);
}

#if __CUDA_ARCH__ >= 900
// One round's products of a warp (chunks 2r and, where K has it, 2r + 1) over its first MC m
// tiles: the weight fragments from the slice in shared memory (rows wn * 32 + nt * 8 + g8 at
// b_base, chunk parity flipped by b_flip), the A operands staged ready-made at a_row.
template <int MC, int PARTS>
__device__ __forceinline__ void x3_products(float (&acc)[2][4][4], const unsigned char* a_row,
                                            const unsigned char* b_base, int b_flip, int w_units, int r, int kc) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        if (c == 1 && 2 * r + 1 >= kc) break;
        uint4 b[4];
        const unsigned char* b_at = b_base + (((2 * r + c) * 64) ^ b_flip);
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) b[nt] = *reinterpret_cast<const uint4*>(b_at + nt * 8 * w_units * 16);
#pragma unroll
        for (int p = 0; p < PARTS; ++p) {
#pragma unroll
            for (int st = 0; st < 2; ++st) {
                uint4 a[MC];
#pragma unroll
                for (int m = 0; m < MC; ++m)
                    a[m] = *reinterpret_cast<const uint4*>(a_row + p * X3_APART + (m * 4 + c * 2 + st) * 512);
#pragma unroll
                for (int m = 0; m < MC; ++m) {
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt) {
                        if (st == 0) x3_mma(acc[m][nt], a[m].x, a[m].y, a[m].z, a[m].w, b[nt].x, b[nt].y);
                        else x3_mma(acc[m][nt], a[m].x, a[m].y, a[m].z, a[m].w, b[nt].z, b[nt].w);
                    }
                }
            }
        }
    }
}
#endif

template <int EPI, bool NORM, int PARTS>
__device__ __forceinline__ void gemm_x3(const float* __restrict__ x, const float* __restrict__ g,
                                        const bf16_t* __restrict__ w, const float* __restrict__ residual,
                                        float* __restrict__ y, int T, int K, int N, int kc, float eps,
                                        unsigned long long* trace) {
#if __CUDA_ARCH__ >= 900
    // With `trace` (QFUSE_CUDA_X3_TRACE), thread 0 of every block adds its phases' durations (ns)
    // to trace[0..X3_PHASES) and 1 to trace[X3_PHASES].
    unsigned long long stamp[X3_PHASES + 1];
    const bool tracing = trace != nullptr && threadIdx.x == 0;
    if (tracing) stamp[0] = globaltimer_ns();
    // Dynamic shared memory: the weight slice [128 rows][kc * 32] bf16, then two staged rounds
    // of activations ([3 parts][64 rows][64 k] bf16 each), which afterwards hold the partial
    // tile ([64 rows][128 columns] fp32) for the cluster's reduction.
    extern __shared__ __align__(128) unsigned char x3_smem[];
    const int w_units = kc * 4;
#if X3_WG
    // The swizzled tiles need 1 KiB alignment, which dynamic shared memory has on sm_90 (it
    // starts past the 1 KiB the system reserves a block); the host adds nothing for it, so a
    // device where it did not hold stops here rather than overrun.
    if (smem_addr(x3_smem) & 1023u) __trap();
    unsigned char* wsm = x3_smem;
    unsigned char* abufs = wsm + (size_t)((kc + 1) >> 1) * X3W_ROUND_BYTES;
    // Past the partial tile, in the second staged round: written only after the block barrier
    // that follows every warpgroup's last wait for its products.
    float* ss_part = reinterpret_cast<float*>(abufs + X3_TMAX * X3_ROWS * 4);
    float* inv_rms = ss_part + X3_TMAX;
#else
    __shared__ float ss_part[X3_TMAX], inv_rms[X3_TMAX];
    unsigned char* wsm = x3_smem;
    unsigned char* abufs = x3_smem + (size_t)X3_ROWS * w_units * 16;
#endif
    float* red = reinterpret_cast<float*>(abufs);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g8 = lane >> 2, q4 = lane & 3;
    const int tile = blockIdx.x, S = gridDim.y, slice = blockIdx.y;
    const int half = N / 2;
    const int k_slice = slice * kc * 32;
    const int rounds = (kc + 1) >> 1;

    // Every weight of the slice, one commit group per round (two chunks: 8 sixteen-byte units a
    // row); thread tid copies unit tid & 7 of rows tid / 8 + 32 j. Rows past the matrix are
    // zero-filled. Odd rows swap units in fours (unit u at u ^ 4), so the two rows a quarter-warp's
    // fragment loads touch fall in different banks; rows of an odd number of chunks are already
    // offset by half a 128-byte line and keep their order.
    const u32 wsm_addr = smem_addr(wsm);
    const int wswap = (w_units & 4) ? 0 : 1;
    {
        const int u8 = tid & 7;
        const bf16_t* src[4];
        u32 dst[4], bytes[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int rr = (tid >> 3) + 32 * j;
            const int col = EPI == EPI_SILU ? tile * 64 + (rr & 63) : tile * X3_ROWS + rr;
            const bool ok = EPI == EPI_SILU ? col < half : col < N;
            const size_t row = EPI == EPI_SILU && rr >= 64 ? (size_t)col + half : (size_t)col;
            src[j] = w + (ok ? row : 0) * K + k_slice + u8 * 8;
            dst[j] = X3_WG ? wsm_addr + (u32)(rr * 128 + ((u8 ^ (rr & 7)) << 4))
                           : wsm_addr + (u32)(rr * w_units + (u8 ^ ((rr & wswap) << 2))) * 16u;
            bytes[j] = ok ? 16u : 0u;
        }
        for (int r = 0; r < rounds; ++r) {
            if (u8 < 4 || 2 * r + 1 < kc) {
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst[j] + r * (X3_WG ? X3W_ROUND_BYTES : 128u)),
                                 "l"(src[j] + r * X3_RK), "r"(bytes[j])
                                 : "memory");
            }
            asm volatile("cp.async.commit_group;" ::: "memory");
        }
    }
    if (tracing) stamp[1] = globaltimer_ns();
    pdl_weights_requested();
    pdl_wait();
    pdl_launch_dependents();
    if (tracing) stamp[2] = globaltimer_ns();

    // Staging: thread tid owns float4 column su of the row pairs (R, R + 8) of pair indices
    // tid / 16 and tid / 16 + 16 (pair p: R = 16 (p / 8) + p % 8) of every round. A staged part
    // holds, for m tile mt, chunk c, k-step s and lane l = 4 g + q4, the lane's A operand as one
    // 16-byte unit at ((mt * 4 + c * 2 + s) * 32 + l) * 16: the fragment loads are conflict-free
    // and need no register shuffling.
    const int su = tid & 15;
    int srows[4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int pair = (tid >> 4) + 16 * i;
        srows[2 * i] = 16 * (pair >> 3) + (pair & 7);
        srows[2 * i + 1] = srows[2 * i] + 8;
    }
    const float* xrow[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) xrow[j] = x + (size_t)srows[j] * K + k_slice + su * 4;
    const float* grow = g + k_slice + su * 4;
    float4 xv[4], gv = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float ss[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const float4 zero4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    auto load_round = [&](int r) {
        const bool in_k = su < 8 || 2 * r + 1 < kc;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            xv[j] = in_k && srows[j] < T ? *reinterpret_cast<const float4*>(xrow[j] + r * X3_RK) : zero4;
        if (NORM) gv = in_k ? *reinterpret_cast<const float4*>(grow + r * X3_RK) : zero4;
    };

#if X3_WG
    // Warpgroup wg multiplies the 64 rows by weight rows 64 wg .. 64 wg + 63 (with SiLU: gate
    // rows for wg 0, up rows for wg 1); lane (warp w4, g8, q4) ends up holding rows 16 w4 + g8
    // (+ 8) of columns 64 wg + 8 j + 2 q4 (+ 1).
    const int wg = warp >> 2;
    u32 stage_w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
        stage_w[j] = (u32)(srows[j] * 128 + (((su >> 1) ^ (srows[j] & 7)) << 4) + (su & 1) * 8);
    const u32 a_addr = smem_addr(abufs), b_addr = wsm_addr + (u32)wg * 64u * 128u;
    float acc_hi[32], acc_lo[32];
    // Round r's activations, split, into staging buffer r & 1.
    auto stage = [&](int r) {
        unsigned char* abuf = abufs + (r & 1) * 3 * X3_APART;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (NORM) x3_norm_prologue(xv[j], gv, ss[j]);
            x3w_store_parts<PARTS>(abuf, stage_w[j], xv[j]);
        }
    };
    load_round(0);
    stage(0);
    if (tracing) stamp[3] = globaltimer_ns();
    if (1 < rounds) load_round(1);
    for (int r = 0; r < rounds; ++r) {
        x3_wait_groups(rounds - 1 - r);
        // The staged parts (ordinary stores) and the copied weights become the async proxy's
        // operands; past the barrier every warpgroup has also waited for its products of round
        // r - 1, which read the buffer round r + 1 is staged into below.
        fence_proxy_async();
        __syncthreads();
        if (tracing && r == 0) stamp[4] = globaltimer_ns();
        const u32 b_round = b_addr + (u32)r * X3W_ROUND_BYTES;
        wg_fence_acc(acc_hi);
        wg_fence_acc(acc_lo);
        wg_fence();
        x3w_round<PARTS>(acc_hi, acc_lo, a_addr + (u32)((r & 1) * 3 * X3_APART), b_round, r > 0);
        wg_commit();
        // The next round is split and staged while these products run.
        if (r + 1 < rounds) {
            stage(r + 1);
            if (r + 2 < rounds) load_round(r + 2);
        }
        wg_wait<0>();
        wg_fence_acc(acc_hi);
        wg_fence_acc(acc_lo);
    }
#else
    u32 stage_at[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int pair = (tid >> 4) + 16 * i, c = su >> 3, q4s = (su >> 1) & 3, s_step = su & 1;
        stage_at[i] = (u32)((((pair >> 3) * 4 + c * 2 + s_step) * 32 + (pair & 7) * 4 + q4s) * 16);
    }
    const int wm = warp & 1, wn = warp >> 1;
    const int mtiles = (T + 15) >> 4;
    // This lane's fragment loads: weight rows wn * 32 + nt * 8 + g8 (odd g8: chunk parity flipped
    // by the swap above), and its A operands in m tiles 2 wm, 2 wm + 1.
    const unsigned char* b_base = wsm + ((wn * 32 + g8) * w_units + q4) * 16;
    const int b_flip = (g8 & wswap) * 64;
    const int a_base = (2 * wm * 4 * 32 + lane) * 16;
    float acc[2][4][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[m][nt][i] = 0.0f;

    load_round(0);
    for (int r = 0; r < rounds; ++r) {
        unsigned char* abuf = abufs + (r & 1) * 3 * X3_APART;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (NORM) x3_norm_prologue(xv[j], gv, ss[j]);
        }
        x3_store_parts<PARTS>(abuf, stage_at[0], xv[0], xv[1]);
        x3_store_parts<PARTS>(abuf, stage_at[1], xv[2], xv[3]);
        if (tracing && r == 0) stamp[3] = globaltimer_ns();
        if (r + 1 < rounds) load_round(r + 1);
        x3_wait_groups(rounds - 1 - r);
        __syncthreads();
        if (tracing && r == 0) stamp[4] = globaltimer_ns();
        // Both of the warp's m tiles (rows past T are staged as zeros) unless its second lies
        // wholly past T.
        if (2 * wm + 1 < mtiles) x3_products<2, PARTS>(acc, abuf + a_base, b_base, b_flip, w_units, r, kc);
        else if (2 * wm < mtiles) x3_products<1, PARTS>(acc, abuf + a_base, b_base, b_flip, w_units, r, kc);
    }
#endif
    if (tracing) stamp[5] = globaltimer_ns();
    if (NORM) {
        // Each row's squares over this slice: the 16 threads of a half-warp share rows.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) ss[j] += __shfl_xor_sync(FULL_MASK, ss[j], o);
        }
    }
    __syncthreads();  // the staged activations are read; their memory takes the partial tile
    if (NORM && su == 0) {
#pragma unroll
        for (int j = 0; j < 4; ++j) ss_part[srows[j]] = ss[j];
    }
    // The partial tile, [row t][column]; rows (m tiles) past T left unwritten (never read).
#if X3_WG
    {
        const int w4 = warp & 3;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int t0 = 16 * w4 + g8 + 8 * h, col = wg * 64 + 8 * j + 2 * q4;
                if (t0 < T) {
                    red[t0 * X3_ROWS + col] = acc_hi[4 * j + 2 * h] + acc_lo[4 * j + 2 * h];
                    red[t0 * X3_ROWS + col + 1] = acc_hi[4 * j + 2 * h + 1] + acc_lo[4 * j + 2 * h + 1];
                }
            }
        }
    }
#else
#pragma unroll
    for (int m = 0; m < 2; ++m) {
        if (2 * wm + m >= mtiles) break;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int col = wn * 32 + nt * 8 + 2 * q4, t0 = (2 * wm + m) * 16 + g8;
            red[t0 * X3_ROWS + col] = acc[m][nt][0];
            red[t0 * X3_ROWS + col + 1] = acc[m][nt][1];
            red[(t0 + 8) * X3_ROWS + col] = acc[m][nt][2];
            red[(t0 + 8) * X3_ROWS + col + 1] = acc[m][nt][3];
        }
    }
#endif
    cluster_sync();
    if (tracing) stamp[6] = globaltimer_ns();
    if (NORM) {
        // 1/rms of each row from every slice's squares, in slice order.
        if (tid < T) {
            const u32 ss_addr = smem_addr(ss_part) + 4u * (u32)tid;
            float tot = 0.0f;
            for (int q = 0; q < S; ++q) tot += ld_peer(ss_addr, (u32)q);
            inv_rms[tid] = rsqrtf(tot / K + eps);
        }
        __syncthreads();
    }
    // This block's share of the tile's outputs, four columns at a time, summed over the S slices
    // in order.
    const u32 rank = cluster_rank();
    constexpr int cols_out = EPI == EPI_SILU ? 64 : X3_ROWS;
    const int out_n = EPI == EPI_SILU ? half : N;
    const int total = T * (cols_out / 4), per = (total + S - 1) / S;
    const int end = (int)(rank + 1) * per < total ? (int)(rank + 1) * per : total;
    const u32 red_addr = smem_addr(red);
    for (int idx = (int)rank * per + tid; idx < end; idx += X3_WARPS * 32) {
        const int t = idx / (cols_out / 4), c = (idx % (cols_out / 4)) * 4;
        const u32 at = red_addr + 4u * (u32)(t * X3_ROWS + c);
        // Four slices' loads in flight at a time, added in slice order.
        float a[4] = {0.0f, 0.0f, 0.0f, 0.0f}, b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int q0 = 0; q0 < S; q0 += 4) {
            float4 va[4], vb[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                if (q0 + i < S) {
                    va[i] = ld_peer4(at, (u32)(q0 + i));
                    if (EPI == EPI_SILU) vb[i] = ld_peer4(at + 4u * 64u, (u32)(q0 + i));
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                if (q0 + i < S) {
                    a[0] += va[i].x; a[1] += va[i].y; a[2] += va[i].z; a[3] += va[i].w;
                    if (EPI == EPI_SILU) {
                        b[0] += vb[i].x; b[1] += vb[i].y; b[2] += vb[i].z; b[3] += vb[i].w;
                    }
                }
            }
        }
        const float inv = NORM ? inv_rms[t] : 1.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = tile * cols_out + c + j;
            if (n < out_n) {
                const size_t o = (size_t)t * out_n + n;
                if (EPI == EPI_SILU) y[o] = silu(a[j] * inv) * (b[j] * inv);
                else if (EPI == EPI_ADD) y[o] = residual[o] + a[j];
                else y[o] = a[j] * inv;
            }
        }
    }
    if (tracing) stamp[7] = globaltimer_ns();
    // No block may leave while the others still read its tile (nothing to publish: relaxed).
    cluster_sync_relaxed();
    if (tracing) {
        stamp[8] = globaltimer_ns();
        for (int i = 0; i < X3_PHASES; ++i) atomicAdd(trace + i, stamp[i + 1] - stamp[i]);
        atomicAdd(trace + X3_PHASES, 1ull);
    }
#endif
}

#define X3_ENTRY(name, EPI, NORM, PARTS)                                                                    \
    extern "C" __global__ void __launch_bounds__(X3_WARPS * 32, X3_MIN_BLOCKS)                              \
        X3_NAME(name)(const float* x, const float* g, const bf16_t* w, const float* residual, float* y, int T, int K, \
             int N, int kc, float eps, unsigned long long* trace) {                                         \
        gemm_x3<EPI, NORM, PARTS>(x, g, w, residual, y, T, K, N, kc, eps, trace);                           \
    }

X3_ENTRY(gemm_x3_f32, EPI_NONE, false, 3)
X3_ENTRY(gemm_x3_add_f32, EPI_ADD, false, 3)
X3_ENTRY(gemm_x3_silu_mul_f32, EPI_SILU, false, 3)
X3_ENTRY(rms_norm_gemm_x3_f32, EPI_NONE, true, 3)
X3_ENTRY(rms_norm_gemm_x3_silu_mul_f32, EPI_SILU, true, 3)
X3_ENTRY(gemm_x3_add_f32_p2, EPI_ADD, false, 2)
X3_ENTRY(gemm_x3_silu_mul_f32_p2, EPI_SILU, false, 2)
X3_ENTRY(rms_norm_gemm_x3_silu_mul_f32_p2, EPI_SILU, true, 2)
