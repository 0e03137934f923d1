// Row gathers, elementwise ops, casts and argmax: the small ops around the fused kernels.

// out[t, :] = table[ids[t], :] for a table of `rows` rows. Ids from the host were range-checked
// there; ids an argmax left on the device (a decode step queued ahead) are below the vocabulary
// or all ones for a NaN row, whose output row is zeros (the host reports the NaN).
// grid = T, block = 256.
extern "C" __global__ void gather_rows_bf16(const bf16_t* __restrict__ table, const u32* __restrict__ ids,
                                            float* __restrict__ out, int cols, int rows) {
    pdl_begin();
    const u32 id = ids[blockIdx.x];
    const size_t src = (size_t)id * cols, dst = (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[dst + c] = id < (u32)rows ? bf16_to_f32(table[src + c]) : 0.f;
}

extern "C" __global__ void gather_rows_f32(const float* __restrict__ table, const u32* __restrict__ ids,
                                           float* __restrict__ out, int cols, int rows) {
    pdl_begin();
    const u32 id = ids[blockIdx.x];
    const size_t src = (size_t)id * cols, dst = (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[dst + c] = id < (u32)rows ? table[src + c] : 0.f;
}

extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b,
                                   float* __restrict__ out, size_t n) {
    pdl_begin();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

// gate_up [T, 2I] -> out [T, I] = silu(gate) * up. grid = T, block = 256.
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate_up, float* __restrict__ out, int inter) {
    pdl_begin();
    const float* row = gate_up + (size_t)blockIdx.x * 2 * inter;
    for (int i = threadIdx.x; i < inter; i += blockDim.x)
        out[(size_t)blockIdx.x * inter + i] = silu(row[i]) * row[inter + i];
}

// out [T, len] = x[:, start .. start + len]. grid = T, block = 256.
extern "C" __global__ void slice_columns_f32(const float* __restrict__ x, float* __restrict__ out, int cols,
                                             int start, int len) {
    pdl_begin();
    for (int i = threadIdx.x; i < len; i += blockDim.x)
        out[(size_t)blockIdx.x * len + i] = x[(size_t)blockIdx.x * cols + start + i];
}

extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16_t* __restrict__ out, size_t n) {
    pdl_begin();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(x[i]);
}

// The bf16 parts of x (split_bf16x3) as three arrays, for three-part GEMMs, or (lo null) as two.
extern "C" __global__ void split_f32_bf16x3(const float* __restrict__ x, bf16_t* __restrict__ hi,
                                            bf16_t* __restrict__ mid, bf16_t* __restrict__ lo, size_t n) {
    pdl_begin();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        split_bf16_parts(x[i], hi, mid, lo, i);
}

// split_f32_bf16x3 eight values a thread (16-byte loads and stores): n8 groups of eight, x
// 16-byte aligned. The prompt products' split, where 2-byte stores held it to ~2 TB/s.
extern "C" __global__ void split_f32_bf16x3_v8(const float* __restrict__ x, bf16_t* __restrict__ hi,
                                               bf16_t* __restrict__ mid, bf16_t* __restrict__ lo, size_t n8) {
    pdl_begin();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n8; i += (size_t)gridDim.x * blockDim.x) {
        float f[8];
        load8f(x + 8 * i, f);
        split_bf16_parts8(f, hi, mid, lo, i);
    }
}

// y = (lo + mid) + hi for the three stacked partial products [3, n] of split_f32_bf16x3's parts.
extern "C" __global__ void sum3_f32(const float* __restrict__ parts, float* __restrict__ y, size_t n) {
    pdl_begin();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = (parts[2 * n + i] + parts[n + i]) + parts[i];
}

// sum3_f32 plus a residual: y = ((lo + mid) + hi) + residual (the order of matmul then add).
extern "C" __global__ void sum3_add_f32(const float* __restrict__ parts, const float* __restrict__ residual,
                                        float* __restrict__ y, size_t n) {
    pdl_begin();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = ((parts[2 * n + i] + parts[n + i]) + parts[i]) + residual[i];
}

// sum3_f32 of gate/up products [3][rows, 2 inter], then silu(gate) * up -> y [rows, inter].
extern "C" __global__ void sum3_silu_mul_f32(const float* __restrict__ parts, float* __restrict__ y, size_t rows,
                                             size_t inter) {
    pdl_begin();
    const size_t n = rows * 2 * inter;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < rows * inter; i += (size_t)gridDim.x * blockDim.x) {
        const size_t g = i / inter * 2 * inter + i % inter, u = g + inter;
        const float gate = (parts[2 * n + g] + parts[n + g]) + parts[g];
        const float up = (parts[2 * n + u] + parts[n + u]) + parts[u];
        y[i] = silu(gate) * up;
    }
}

extern "C" __global__ void cast_bf16_f32(const bf16_t* __restrict__ x, float* __restrict__ out, size_t n) {
    pdl_begin();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = bf16_to_f32(x[i]);
}

// (value, index) pairs: the larger value wins, the lower index on ties.
__device__ __forceinline__ void argmax_merge(float& bv, u32& bi, float ov, u32 oi) {
    if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
}

__device__ __forceinline__ void warp_argmax(float& bv, u32& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        const u32 oi = __shfl_xor_sync(FULL_MASK, bi, o);
        argmax_merge(bv, bi, ov, oi);
    }
}

// Block-wide argmax; thread 0 gets the result. `sv`, `si` hold 32 entries.
__device__ __forceinline__ void block_argmax(float& bv, u32& bi, float* sv, u32* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    warp_argmax(bv, bi);
    if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        bv = lane < nwarps ? sv[lane] : -INFINITY;
        bi = lane < nwarps ? si[lane] : 0xffffffffu;
        warp_argmax(bv, bi);
    }
}

// Pass 1 of a row-wise argmax: block (row, p) reduces columns [p * chunk, (p + 1) * chunk) to
// one (value, index), NaN if the slice holds one. grid = (rows, parts), block = 256.
extern "C" __global__ void argmax_partial_f32(const float* __restrict__ x, float* __restrict__ part_v,
                                              u32* __restrict__ part_i, int cols, int chunk) {
    pdl_begin();
    __shared__ float sv[32];
    __shared__ u32 si[32];
    __shared__ int saw_nan;
    if (threadIdx.x == 0) saw_nan = 0;
    __syncthreads();
    const float* row = x + (size_t)blockIdx.x * cols;
    const int begin = blockIdx.y * chunk, end = min(cols, begin + chunk);
    float bv = -INFINITY;
    u32 bi = 0xfffffffeu;  // an empty slice never wins a tie against a real column
    for (int c = begin + threadIdx.x; c < end; c += blockDim.x) {
        const float v = row[c];
        if (v != v) saw_nan = 1;
        argmax_merge(bv, bi, v, (u32)c);
    }
    block_argmax(bv, bi, sv, si);
    if (threadIdx.x == 0) {
        const size_t o = (size_t)blockIdx.x * gridDim.y + blockIdx.y;
        part_v[o] = saw_nan ? __int_as_float(0x7fc00000) : bv;
        part_i[o] = bi;
    }
}

// Pass 2: each row's parts to its index, 0xffffffff if any part saw a NaN. grid = rows, block = 256.
extern "C" __global__ void argmax_final_f32(const float* __restrict__ part_v, const u32* __restrict__ part_i,
                                            u32* __restrict__ out, int parts) {
    pdl_begin();
    __shared__ float sv[32];
    __shared__ u32 si[32];
    __shared__ int saw_nan;
    if (threadIdx.x == 0) saw_nan = 0;
    __syncthreads();
    float bv = -INFINITY;
    u32 bi = 0xfffffffeu;
    for (int p = threadIdx.x; p < parts; p += blockDim.x) {
        const size_t o = (size_t)blockIdx.x * parts + p;
        const float v = part_v[o];
        if (v != v) saw_nan = 1;
        argmax_merge(bv, bi, v, part_i[o]);
    }
    block_argmax(bv, bi, sv, si);
    if (threadIdx.x == 0) out[blockIdx.x] = saw_nan ? 0xffffffffu : bi;
}
