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
