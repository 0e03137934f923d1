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
// grid = rows, block = 256. V8 (the prompt products' build): eight values a thread, 16-byte loads
// and stores, cols % 8 == 0, x 16-byte aligned, block = 128; a thread's first RMS_V8_GROUPS
// groups of eight stay in registers from the statistic to the split (read once, where the
// scalar build reads x twice). Each thread sums its own squares before the block's sum, as
// block_inv_rms does.
#define RMS_V8_GROUPS 4
template <bool V8>
__device__ __forceinline__ void rms_norm_split(const float* __restrict__ x, const float* __restrict__ w,
                                               bf16_t* __restrict__ hi, bf16_t* __restrict__ mid,
                                               bf16_t* __restrict__ lo, int cols, float eps) {
    pdl_begin();
    const size_t base = (size_t)blockIdx.x * cols;
    if (!V8) {
        const float inv = block_inv_rms(x + base, cols, eps);
        for (int i = threadIdx.x; i < cols; i += blockDim.x)
            split_bf16_parts(x[base + i] * inv * w[i], hi, mid, lo, base + i);
        return;
    }
    __shared__ float scratch[32];
    const int step = 8 * blockDim.x;
    float v[RMS_V8_GROUPS][8];
    float ss = 0.0f;
#pragma unroll
    for (int g = 0; g < RMS_V8_GROUPS; ++g) {
        const int i = 8 * threadIdx.x + g * step;
        if (i < cols) {
            load8f(x + base + i, v[g]);
#pragma unroll
            for (int j = 0; j < 8; ++j) ss += v[g][j] * v[g][j];
        }
    }
    for (int i = 8 * threadIdx.x + RMS_V8_GROUPS * step; i < cols; i += step) {
        float f[8];
        load8f(x + base + i, f);
#pragma unroll
        for (int j = 0; j < 8; ++j) ss += f[j] * f[j];
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
    auto store = [&](float (&f)[8], int i) {
        float g[8];
        load8f(w + i, g);
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = f[j] * inv * g[j];
        split_bf16_parts8(f, hi, mid, lo, (base + i) / 8);
    };
#pragma unroll
    for (int g = 0; g < RMS_V8_GROUPS; ++g) {
        const int i = 8 * threadIdx.x + g * step;
        if (i < cols) store(v[g], i);
    }
    for (int i = 8 * threadIdx.x + RMS_V8_GROUPS * step; i < cols; i += step) {
        float f[8];
        load8f(x + base + i, f);
        store(f, i);
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
