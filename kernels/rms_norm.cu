// RMSNorm: statistic, gain and output in fp32.

// Each block normalises one group of G consecutive elements (groups tile [rows, C] since C % G == 0).
// y = x * rsqrt(mean(x^2) + eps) * w. grid = rows * C / G, block = min(256, ...) multiple of 32.
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ y, int G, float eps) {
    pdl_begin();
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * G;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < G; i += blockDim.x) { float v = x[base + i]; ss += v * v; }
    const float inv = rsqrtf(block_sum(ss, scratch) / G + eps);
    for (int i = threadIdx.x; i < G; i += blockDim.x) y[base + i] = x[base + i] * inv * w[i];
}

// RMSNorm of each row of x [rows, cols] (as rms_norm_f32), written as its three bf16 parts
// (split_bf16x3) for a three-part GEMM: the norm costs no pass of its own. grid = rows, block = 256.
extern "C" __global__ void rms_norm_split_bf16x3(const float* __restrict__ x, const float* __restrict__ w,
                                                 bf16_t* __restrict__ hi, bf16_t* __restrict__ mid,
                                                 bf16_t* __restrict__ lo, int cols, float eps) {
    pdl_begin();
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * cols;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) { float v = x[base + i]; ss += v * v; }
    const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        split_bf16x3(x[base + i] * inv * w[i], hi[base + i], mid[base + i], lo[base + i]);
}
