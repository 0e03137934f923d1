// Row gathers, elementwise ops, casts and argmax: the small ops around the fused kernels.

// out[t, :] = table[ids[t], :]; ids were range-checked on the host. grid = T, block = 256.
extern "C" __global__ void gather_rows_bf16(const bf16_t* __restrict__ table, const u32* __restrict__ ids,
                                            float* __restrict__ out, int cols) {
    const size_t src = (size_t)ids[blockIdx.x] * cols, dst = (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[dst + c] = bf16_to_f32(table[src + c]);
}

extern "C" __global__ void gather_rows_f32(const float* __restrict__ table, const u32* __restrict__ ids,
                                           float* __restrict__ out, int cols) {
    const size_t src = (size_t)ids[blockIdx.x] * cols, dst = (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[dst + c] = table[src + c];
}

extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b,
                                   float* __restrict__ out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

// gate_up [T, 2I] -> out [T, I] = silu(gate) * up. grid = T, block = 256.
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate_up, float* __restrict__ out, int inter) {
    const float* row = gate_up + (size_t)blockIdx.x * 2 * inter;
    for (int i = threadIdx.x; i < inter; i += blockDim.x)
        out[(size_t)blockIdx.x * inter + i] = silu(row[i]) * row[inter + i];
}

// out [T, len] = x[:, start .. start + len]. grid = T, block = 256.
extern "C" __global__ void slice_columns_f32(const float* __restrict__ x, float* __restrict__ out, int cols,
                                             int start, int len) {
    for (int i = threadIdx.x; i < len; i += blockDim.x)
        out[(size_t)blockIdx.x * len + i] = x[(size_t)blockIdx.x * cols + start + i];
}

extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16_t* __restrict__ out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(x[i]);
}

// x = hi + lo with hi = bf16(x) and lo = bf16(x - hi): two bf16 GEMMs over hi and lo keep ~16
// mantissa bits of the activations (a single bf16 rounding keeps 8, which random-weight models
// amplify into visibly different logits).
extern "C" __global__ void split_f32_bf16x2(const float* __restrict__ x, bf16_t* __restrict__ hi,
                                            bf16_t* __restrict__ lo, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const bf16_t h = f32_to_bf16(x[i]);
        hi[i] = h;
        lo[i] = f32_to_bf16(x[i] - bf16_to_f32(h));
    }
}

extern "C" __global__ void cast_bf16_f32(const bf16_t* __restrict__ x, float* __restrict__ out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = bf16_to_f32(x[i]);
}

// Index of each row's largest value, lowest index on ties; 0xffffffff if the row holds a NaN.
// grid = rows, block = 1024.
extern "C" __global__ void argmax_f32(const float* __restrict__ x, u32* __restrict__ out, int cols) {
    __shared__ float best_v[32];
    __shared__ u32 best_i[32];
    __shared__ int saw_nan;
    if (threadIdx.x == 0) saw_nan = 0;
    __syncthreads();
    const float* row = x + (size_t)blockIdx.x * cols;
    float bv = -INFINITY;
    u32 bi = 0xffffffffu;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = row[c];
        if (v != v) saw_nan = 1;
        if (v > bv || (v == bv && (u32)c < bi)) { bv = v; bi = c; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        u32 oi = __shfl_xor_sync(FULL_MASK, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        const int nwarps = blockDim.x >> 5;
        bv = lane < nwarps ? best_v[lane] : -INFINITY;
        bi = lane < nwarps ? best_i[lane] : 0xffffffffu;
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(FULL_MASK, bv, o);
            u32 oi = __shfl_xor_sync(FULL_MASK, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) out[blockIdx.x] = saw_nan ? 0xffffffffu : (bi == 0xffffffffu ? 0u : bi);
    }
}
