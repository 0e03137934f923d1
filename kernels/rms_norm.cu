// RMSNorm: statistic, gain and output in fp32.

// 1 / sqrt(mean(x^2) + eps) of the n values at x, for the whole block.
__device__ __forceinline__ float block_inv_rms(const float* __restrict__ x, int n, float eps) {
    __shared__ float scratch[32];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { float v = x[i]; ss += v * v; }
    return rsqrtf(block_sum(ss, scratch) / n + eps);
}

// Each block normalises one group of G consecutive elements (groups tile [rows, C] since C % G == 0).
// y = x * rsqrt(mean(x^2) + eps) * w. grid = rows * C / G, block = min(256, ...) multiple of 32.
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ y, int G, float eps) {
    pdl_begin();
    const size_t base = (size_t)blockIdx.x * G;
    const float inv = block_inv_rms(x + base, G, eps);
    for (int i = threadIdx.x; i < G; i += blockDim.x) y[base + i] = x[base + i] * inv * w[i];
}

// RMSNorm of each row of x [rows, cols] (as rms_norm_f32), written as its three bf16 parts
// (split_bf16x3) for a three-part GEMM, or two with lo null: the norm costs no pass of its own.
// V8: eight values a thread (16-byte loads and stores; cols % 8 == 0, x 16-byte aligned).
// grid = rows, block = 256.
template <bool V8>
__device__ __forceinline__ void rms_norm_split(const float* __restrict__ x, const float* __restrict__ w,
                                               bf16_t* __restrict__ hi, bf16_t* __restrict__ mid,
                                               bf16_t* __restrict__ lo, int cols, float eps) {
    pdl_begin();
    const size_t base = (size_t)blockIdx.x * cols;
    const float inv = block_inv_rms(x + base, cols, eps);
    if (V8) {
        for (int i = 8 * threadIdx.x; i < cols; i += 8 * blockDim.x)
            split_bf16_parts8(x + base + i, hi, mid, lo, (base + i) / 8, inv, w + i);
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x)
            split_bf16_parts(x[base + i] * inv * w[i], hi, mid, lo, base + i);
    }
}

extern "C" __global__ void rms_norm_split_bf16x3(const float* x, const float* w, bf16_t* hi, bf16_t* mid, bf16_t* lo,
                                                 int cols, float eps) {
    rms_norm_split<false>(x, w, hi, mid, lo, cols, eps);
}
extern "C" __global__ void rms_norm_split_bf16x3_v8(const float* x, const float* w, bf16_t* hi, bf16_t* mid,
                                                    bf16_t* lo, int cols, float eps) {
    rms_norm_split<true>(x, w, hi, mid, lo, cols, eps);
}
