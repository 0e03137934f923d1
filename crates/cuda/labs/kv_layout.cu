// Does the KV cache's layout set the batched decode attention's DRAM rate? The fp32 cache is
// [slot][kv_head][d], so a block of attention_many (one token, one KV head) reads 512-byte rows
// 4 KB apart; Nsight puts that kernel at ~75% of DRAM peak. This lab reads the same bytes with the
// same grid (64 sequences x 8 KV heads, 4 warps, 8 keys a warp in flight, K and V) in three
// patterns, and as a plain stream, and prints each one's rate (docs/perf.md, 20th session):
//   slot_major  the cache as it is: block (t, h) reads slot * W + h * d
//   head_major  [kv_head][slot][d]: block (t, h) reads h * slots * d + slot * d (runs of rows)
//   heads_adjacent  slot_major with the 8 KV heads of a sequence launched next to each other
//   stream(8)   a grid-stride read of both arrays, 16-byte loads, 4 (8: 16) in flight a thread (the ceiling)
// Build and run (GPU machine): nvcc -O3 -arch=sm_90 -o /tmp/kv_layout crates/cuda/labs/kv_layout.cu && /tmp/kv_layout
#include <cstdio>
#include <cuda_runtime.h>

constexpr int SEQS = 64, KV = 8, D = 128, KEYS = 576, W = KV * D, WARPS = 4;

template <int MODE>
__global__ void __launch_bounds__(32 * WARPS) read_kv(const float4* __restrict__ k, const float4* __restrict__ v,
                                                      float* __restrict__ out) {
    const int t = MODE == 2 ? blockIdx.y : blockIdx.x, h = MODE == 2 ? blockIdx.x : blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t slots = (size_t)SEQS * KEYS;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int kb = warp * 8; kb < KEYS; kb += WARPS * 8) {
        float4 kr[8], vr[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const size_t slot = (size_t)t * KEYS + kb + j;  // each sequence's slots contiguous
            size_t row;
            if (MODE == 1) row = (size_t)h * slots * D + slot * D;
            else row = slot * W + (size_t)h * D;
            kr[j] = k[row / 4 + lane];
            vr[j] = v[row / 4 + lane];
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            acc.x += kr[j].x * vr[j].y;
            acc.y += kr[j].y * vr[j].z;
            acc.z += kr[j].z * vr[j].w;
            acc.w += kr[j].w * vr[j].x;
        }
    }
    const float s = acc.x + acc.y + acc.z + acc.w;
    if (s == 1.2345f) out[0] = s;  // never true for the data below; keeps the loads
}

__global__ void stream(const float4* __restrict__ k, const float4* __restrict__ v, size_t n4, float* __restrict__ out) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += 2 * stride) {
        const float4 a = k[i], b = v[i];
        const float4 c = i + stride < n4 ? k[i + stride] : a, d = i + stride < n4 ? v[i + stride] : b;
        acc.x += a.x * b.y + c.x * d.y;
        acc.y += a.y * b.z + c.y * d.z;
        acc.z += a.z * b.w + c.z * d.w;
        acc.w += a.w * b.x + c.w * d.x;
    }
    const float s = acc.x + acc.y + acc.z + acc.w;
    if (s == 1.2345f) out[0] = s;
}

// The ceiling again, with 8 loads of each array in flight a thread.
__global__ void stream8(const float4* __restrict__ k, const float4* __restrict__ v, size_t n4, float* __restrict__ out) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += 8 * stride) {
        float4 a[8], b[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const size_t e = i + u * stride < n4 ? i + u * stride : i;
            a[u] = k[e];
            b[u] = v[e];
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            acc.x += a[u].x * b[u].y;
            acc.y += a[u].y * b[u].z;
            acc.z += a[u].z * b[u].w;
            acc.w += a[u].w * b[u].x;
        }
    }
    const float s = acc.x + acc.y + acc.z + acc.w;
    if (s == 1.2345f) out[0] = s;
}

int main() {
    const size_t n = (size_t)SEQS * KEYS * W;  // floats of K (and of V)
    float4 *k, *v;
    float* out;
    cudaMalloc(&k, n * 4);
    cudaMalloc(&v, n * 4);
    cudaMalloc(&out, 4);
    cudaMemset(k, 0x3c, n * 4);
    cudaMemset(v, 0x3d, n * 4);
    // Something larger than L2 between runs, so every run reads DRAM.
    float* flush;
    const size_t flush_n = 256u << 20;
    cudaMalloc(&flush, flush_n);
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    const char* names[5] = {"slot_major", "head_major", "heads_adjacent", "stream", "stream8"};
    const dim3 grid(SEQS, KV), block(32 * WARPS);
    for (int round = 0; round < 3; ++round) {
        for (int mode = 0; mode < 5; ++mode) {
            float best = 1e9f;
            for (int rep = 0; rep < 10; ++rep) {
                cudaMemsetAsync(flush, rep, flush_n);
                cudaEventRecord(a);
                if (mode == 0) read_kv<0><<<grid, block>>>(k, v, out);
                if (mode == 1) read_kv<1><<<grid, block>>>(k, v, out);
                if (mode == 2) read_kv<2><<<dim3(KV, SEQS), block>>>(k, v, out);
                if (mode == 3) stream<<<132 * 8, 256>>>(k, v, n / 4, out);
                if (mode == 4) stream8<<<132 * 4, 256>>>(k, v, n / 4, out);
                cudaEventRecord(b);
                cudaEventSynchronize(b);
                float ms;
                cudaEventElapsedTime(&ms, a, b);
                best = ms < best ? ms : best;
            }
            printf("round %d %-14s %7.2f us  %6.0f GB/s (K and V, %.0f MB)\n", round, names[mode], best * 1e3,
                   2.0 * n * 4 / (best * 1e-3) / 1e9, 2.0 * n * 4 / 1e6);
        }
    }
    cudaError_t e = cudaGetLastError();
    printf("%s\n", e == cudaSuccess ? "ok" : cudaGetErrorString(e));
    return e != cudaSuccess;
}
