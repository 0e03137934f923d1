// Shared helpers for qfuse's CUDA kernels. Compiled by NVRTC with no CUDA headers: bf16 is stored
// as its 16 raw bits and converted by hand (exact widening, round-to-nearest-even narrowing).
typedef unsigned short bf16_t;
typedef unsigned int u32;

#define FULL_MASK 0xffffffffu
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float bf16_to_f32(bf16_t v) { return __uint_as_float(((u32)v) << 16); }

__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);  // keep NaN a NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// The two bf16 halves of a 32-bit word, low half first (little-endian element order).
__device__ __forceinline__ float bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }

// Eight bf16 values, four packed pairs (16 bytes as loaded), as floats in element order.
__device__ __forceinline__ void unpack_bf16x8(uint4 r, float* f) {
    f[0] = bf16_lo(r.x); f[1] = bf16_hi(r.x); f[2] = bf16_lo(r.y); f[3] = bf16_hi(r.y);
    f[4] = bf16_lo(r.z); f[5] = bf16_hi(r.z); f[6] = bf16_lo(r.w); f[7] = bf16_hi(r.w);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// `warp_op` (warp_sum or warp_max) over the block; every thread gets the result. `scratch` holds
// 32 floats; `identity` fills the lanes past the block's warps.
template <float (*warp_op)(float)>
__device__ __forceinline__ float block_reduce(float v, float* scratch, float identity) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_op(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : identity;
    return warp_op(t);
}
__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce<warp_sum>(v, scratch, 0.0f); }
__device__ __forceinline__ float block_max(float v, float* scratch) {
    return block_reduce<warp_max>(v, scratch, -INFINITY);
}

// x = hi + mid + lo, each part the bf16 rounding of what the previous ones leave: products of
// the parts on bf16 tensor cores keep an fp32 operand's full 24 mantissa bits (one bf16 rounding
// keeps 8, which random-weight models amplify into visibly different logits).
__device__ __forceinline__ void split_bf16x3(float x, bf16_t& hi, bf16_t& mid, bf16_t& lo) {
    hi = f32_to_bf16(x);
    const float r = x - bf16_to_f32(hi);
    mid = f32_to_bf16(r);
    lo = f32_to_bf16(r - bf16_to_f32(mid));
}
// The parts at element i of the split arrays; `lo` null keeps hi and mid only (a two-part
// split: x to ~2^-18 of its magnitude).
__device__ __forceinline__ void split_bf16_parts(float x, bf16_t* hi, bf16_t* mid, bf16_t* lo, size_t i) {
    bf16_t h, m, l;
    split_bf16x3(x, h, m, l);
    hi[i] = h;
    mid[i] = m;
    if (lo != nullptr) lo[i] = l;
}

// Two floats rounded to bf16 (round to nearest even, as f32_to_bf16), the first in the low half;
// one instruction from sm_80 on.
__device__ __forceinline__ u32 pack_bf16x2(float first, float second) {
#if __CUDA_ARCH__ >= 800
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(second), "f"(first));
    return r;
#else
    return (u32)f32_to_bf16(first) | ((u32)f32_to_bf16(second) << 16);
#endif
}

// split_bf16x3 of two values, each part's pair packed (the first value in the low half).
__device__ __forceinline__ void split_bf16x3_pair(float a, float b, u32 (&parts)[3]) {
#pragma unroll
    for (int p = 0; p < 3; ++p) {
        parts[p] = pack_bf16x2(a, b);
        a -= bf16_lo(parts[p]);
        b -= bf16_hi(parts[p]);
    }
}

// split_bf16_parts for eight values, as elements 8 i8 .. 8 i8 + 7 of the split arrays (16-byte
// stores).
__device__ __forceinline__ void split_bf16_parts8(const float (&f)[8], bf16_t* __restrict__ hi,
                                                  bf16_t* __restrict__ mid, bf16_t* __restrict__ lo, size_t i8) {
    u32 h[4], m[4], l[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        u32 parts[3];
        split_bf16x3_pair(f[2 * j], f[2 * j + 1], parts);
        h[j] = parts[0];
        m[j] = parts[1];
        l[j] = parts[2];
    }
    reinterpret_cast<uint4*>(hi)[i8] = make_uint4(h[0], h[1], h[2], h[3]);
    reinterpret_cast<uint4*>(mid)[i8] = make_uint4(m[0], m[1], m[2], m[3]);
    if (lo != nullptr) reinterpret_cast<uint4*>(lo)[i8] = make_uint4(l[0], l[1], l[2], l[3]);
}

// Prompt attention's tiles (kernels/flash.cu, kernels/flash_wgmma.cu): query rows a block, keys
// a step.
#define FA_ROWS 128
#define FA_KEYS 64

// Sequence blockIdx.z of a gather launch: its keys (cached and new) and their first column in
// the gathered buffers. false when the block's first key, j0, is past them (padding included).
__device__ __forceinline__ bool fa_seq_keys(const u32* __restrict__ desc, int koff0, int j0, int& keys, int& koff) {
    const int s = blockIdx.z;
    keys = (int)(desc[4 * s + 1] + desc[4 * s + 2]);
    koff = (int)desc[4 * s + 3] - koff0;
    return j0 < ((keys + FA_KEYS - 1) / FA_KEYS) * FA_KEYS;
}

// A prefill block's work: KV head blockIdx.x of sequence blockIdx.y (its first row in q, new
// tokens, first position, first gathered key), and of its G * n query rows the 128 from `base`:
// tiles in reverse order (blockIdx.z = 0 takes the last rows, which see the most keys), the keys
// its last row sees and the key tiles they span. false when the sequence has no tile blockIdx.z.
struct FaTile {
    int kv, G, row0, n, pos0, koff, rows, base, keys, key_tiles;
};
__device__ __forceinline__ bool fa_tile(const u32* __restrict__ desc, int koff0, int H, int KV, FaTile& b) {
    const int s = blockIdx.y;
    b.kv = blockIdx.x;
    b.G = H / KV;
    b.row0 = (int)desc[4 * s];
    b.n = (int)desc[4 * s + 1];
    b.pos0 = (int)desc[4 * s + 2];
    b.koff = (int)desc[4 * s + 3] - koff0;
    b.rows = b.G * b.n;
    const int tiles = (b.rows + FA_ROWS - 1) / FA_ROWS;
    if ((int)blockIdx.z >= tiles) return false;
    b.base = (tiles - 1 - (int)blockIdx.z) * FA_ROWS;
    b.keys = b.pos0 + min(b.rows - 1, b.base + FA_ROWS - 1) / b.G + 1;
    b.key_tiles = (b.keys + FA_KEYS - 1) / FA_KEYS;
    return true;
}

// The online-softmax step of a flash key tile for a thread's two query rows, whose keys are
// spread over the four lanes of a quad: s[4 j + u] (row 0) and s[4 j + 2 + u] (row 1), u < 2,
// are the tile's masked scores and mx0, mx1 this thread's maxima of them. s becomes
// P = exp2((s - m) scale_log2) against the rows' new maxima m0, m1 (finite once a row has seen
// key 0); the rows' sums l0, l1 are updated, and al0, al1 are the factors the output so far takes.
template <int N>
__device__ __forceinline__ void fa_softmax_step(float* s, float mx0, float mx1, float scale_log2, float& m0, float& m1,
                                                float& l0, float& l1, float& al0, float& al1) {
#pragma unroll
    for (int w = 1; w < 4; w <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, w));
        mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, w));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    al0 = exp2f((m0 - mn0) * scale_log2);
    al1 = exp2f((m1 - mn1) * scale_log2);
    float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
    for (int j = 0; j < N / 4; ++j)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            s[4 * j + u] = exp2f((s[4 * j + u] - mn0) * scale_log2);
            s[4 * j + 2 + u] = exp2f((s[4 * j + 2 + u] - mn1) * scale_log2);
            rs0 += s[4 * j + u];
            rs1 += s[4 * j + 2 + u];
        }
#pragma unroll
    for (int w = 1; w < 4; w <<= 1) {
        rs0 += __shfl_xor_sync(FULL_MASK, rs0, w);
        rs1 += __shfl_xor_sync(FULL_MASK, rs1, w);
    }
    l0 = l0 * al0 + rs0;
    l1 = l1 * al1 + rs1;
    m0 = mn0;
    m1 = mn1;
}

// Two floats as fp16 (round to nearest), the first in the low half (the prompt attention's fp16
// operands: kernels/flash.cu, kernels/flash_wgmma.cu).
__device__ __forceinline__ u32 half2_bits(float lo_elem, float hi_elem) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi_elem), "f"(lo_elem));
    return r;
}

// (a, b) -> hi = fp16 pair, lo = fp16 pair of what hi leaves.
__device__ __forceinline__ void half2_split(float a, float b, u32& hi, u32& lo) {
    hi = half2_bits(a, b);
    float ha, hb;
    asm("{\n.reg .f16 l, h;\nmov.b32 {l, h}, %2;\ncvt.f32.f16 %0, l;\ncvt.f32.f16 %1, h;\n}" : "=f"(ha), "=f"(hb) : "r"(hi));
    lo = half2_bits(a - ha, b - hb);
}

// The power of two that brings `m` (a row's largest magnitude) into [2^14, 2^15); 1 for 0 and
// for non-finite m (which then stays non-finite).
__device__ __forceinline__ float fp16_row_scale(float m) {
    return (m > 0.0f && m <= 3.0e38f) ? ldexpf(1.0f, 14 - ilogbf(m)) : 1.0f;
}

// A 4 x 4 transpose across each quad of lanes (lane q = lane % 4 holds row q, m[j] its column j):
// afterwards m[s] holds row s's column q. Two exchanges of two values (xor 2, then xor 1).
__device__ __forceinline__ void quad_transpose(u32 (&m)[4], int lane) {
    const bool hi = lane & 2, lo = lane & 1;
    // Rows q % 2 and q % 2 + 2, columns (q & 2) and (q & 2) + 1.
    u32 r0 = __shfl_xor_sync(FULL_MASK, hi ? m[0] : m[2], 2);
    u32 r1 = __shfl_xor_sync(FULL_MASK, hi ? m[1] : m[3], 2);
    const u32 n0 = hi ? r0 : m[0], n1 = hi ? r1 : m[1], n2 = hi ? m[2] : r0, n3 = hi ? m[3] : r1;
    // Column q of all four rows.
    r0 = __shfl_xor_sync(FULL_MASK, lo ? n0 : n1, 1);
    r1 = __shfl_xor_sync(FULL_MASK, lo ? n2 : n3, 1);
    m[0] = lo ? r0 : n0;
    m[1] = lo ? n1 : r0;
    m[2] = lo ? r1 : n2;
    m[3] = lo ? n3 : r1;
}

// The eight values at p (16-byte aligned).
__device__ __forceinline__ void load8f(const float* __restrict__ p, float (&f)[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

// Thread-block clusters (sm_90): a block's shared-memory address, the cluster barrier (release
// this block's shared-memory writes, acquire the others'), this block's rank and the cluster's
// size (1 when launched without clusters), and loads from a peer block's shared memory.
#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ u32 smem_addr(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}

__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// A barrier with nothing to publish: no block leaves while the others still read its memory.
__device__ __forceinline__ void cluster_sync_relaxed() {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
}

__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

__device__ __forceinline__ u32 cluster_size() {
    u32 n;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
    return n;
}

// The float at shared address `addr` of the cluster's block `rank`.
__device__ __forceinline__ float ld_peer(u32 addr, u32 rank) {
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}

// The four floats at shared address `addr` (16-byte aligned) of the cluster's block `rank`.
__device__ __forceinline__ float4 ld_peer4(u32 addr, u32 rank) {
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(remote) : "memory");
    return v;
}
#endif

// The device's nanosecond clock (the same on every SM), for the trace builds' stamps.
__device__ __forceinline__ unsigned long long globaltimer_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Programmatic dependent launch (sm_90+; no-ops before). A kernel may be launched while the one
// before it still runs (crates/cuda/src/launch.rs): until pdl_wait() returns it may read only
// what no kernel writes (weights, and batch metadata the host copies in before the step) and
// must write nothing. pdl_wait() returns once every earlier kernel has completed and its writes
// are visible. pdl_launch_dependents() lets the next kernel start launching now.
//
// When the next kernel may launch is the host's choice (CudaOptions::pdl_trigger, prepended as
// QFUSE_PDL_TRIGGER): 0 once this kernel's wait has returned (the previous kernel is done); 1 (the
// default) as soon as a decode product kernel has requested its weights (pdl_weights_requested),
// so the next kernel's weight loads start under this one's wait (batch-1 decode 0.907 -> 0.838
// ms/step on the H200, docs/perf.md); 2 also every other kernel before its wait. Earlier is
// always safe (the next kernel's own pdl_wait still orders it); what it costs is SM slots held
// by waiting blocks and their loads queued beside this kernel's.
#ifndef QFUSE_PDL_TRIGGER
#define QFUSE_PDL_TRIGGER 1
#endif
__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// QFUSE_TRACE (CudaOptions::trace, a measurement build): the first thread of every kernel's
// first and last block stamps %globaltimer before and after its wait (when the block started,
// and when the kernels before it had finished) into this module's ring of records, with its
// grid, block and the source line of the wait; the host reads the ring with cuModuleGetGlobal
// (crates/cuda/src/trace.rs). A record is {t0, t1, grid x | grid y*z << 32, block threads |
// line << 32 | last block << 63}.
// Stores, not prints: a print would make each kernel's completion wait for the host.
#ifndef QFUSE_TRACE
#define QFUSE_TRACE 0
#endif
#if QFUSE_TRACE
#define QFUSE_TRACE_RECORDS 4096
__device__ unsigned int qfuse_trace_count;
__device__ unsigned long long qfuse_trace_records[QFUSE_TRACE_RECORDS * 4];
#endif
__device__ __forceinline__ void pdl_wait_at(unsigned line) {
#if QFUSE_TRACE
    // The first block, and the last one (flagged; it starts when the launch's last wave does).
    const bool first_block = (blockIdx.x | blockIdx.y | blockIdx.z) == 0;
    const bool last_block =
        blockIdx.x == gridDim.x - 1 && blockIdx.y == gridDim.y - 1 && blockIdx.z == gridDim.z - 1;
    const bool tracer = (first_block || last_block) && (threadIdx.x | threadIdx.y | threadIdx.z) == 0;
    const unsigned long long t0 = tracer ? globaltimer_ns() : 0;
#else
    (void)line;
#endif
#if __CUDA_ARCH__ >= 900
    if (QFUSE_PDL_TRIGGER >= 2) pdl_launch_dependents();
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#if QFUSE_TRACE
    if (tracer) {
        const unsigned long long t1 = globaltimer_ns();
        const unsigned i = atomicAdd(&qfuse_trace_count, 1u) % QFUSE_TRACE_RECORDS;
        unsigned long long* r = qfuse_trace_records + 4 * (size_t)i;
        r[0] = t0;
        r[1] = t1;
        r[2] = gridDim.x | (unsigned long long)(gridDim.y * gridDim.z) << 32;
        r[3] = blockDim.x * blockDim.y * blockDim.z | (unsigned long long)line << 32 |
               (unsigned long long)(!first_block) << 63;
    }
#endif
}
// The source line names the kernel in a trace build.
#define pdl_wait() pdl_wait_at(__LINE__)
// A product kernel has requested all its weights (none of which an earlier kernel writes).
__device__ __forceinline__ void pdl_weights_requested() {
    if (QFUSE_PDL_TRIGGER >= 1) pdl_launch_dependents();
}

// For kernels with nothing worth starting early: wait, then let the next kernel launch.
__device__ __forceinline__ void pdl_begin_at(unsigned line) {
    pdl_wait_at(line);
    pdl_launch_dependents();
}
#define pdl_begin() pdl_begin_at(__LINE__)

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

// What a product kernel does with its dot products (gemv, gemm_x3, gemm_wgmma): store them, add a
// residual, or (gate and up rows) store SiLU(gate) * up.
#define EPI_NONE 0
#define EPI_ADD 1
#define EPI_SILU 2

// One element of a KV-cache pool (fp32 or bf16), loaded as or stored from fp32.
__device__ __forceinline__ float kv_load(const float* p) { return *p; }
__device__ __forceinline__ float kv_load(const bf16_t* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ void kv_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void kv_store(bf16_t* p, float v) { *p = f32_to_bf16(v); }

// The pool slot of a sequence's key j, from its block table.
__device__ __forceinline__ size_t cache_slot(const u32* __restrict__ table, int block_size, int j) {
    return (size_t)table[j / block_size] * block_size + j % block_size;
}

// cos, sin of pos * theta^(-2i / d), the angle formed and reduced modulo 2 pi in double so
// positions in the tens of thousands keep full fp32 accuracy.
__device__ __forceinline__ void rope_cs(u32 pos, int i, int d, double log2_theta, float* c, float* s) {
    double ang = (double)pos * exp2(-2.0 * i / d * log2_theta);
    ang -= 6.283185307179586 * rint(ang * 0.15915494309189535);
    sincosf((float)ang, s, c);
}
