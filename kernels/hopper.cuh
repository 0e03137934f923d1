// Hopper helpers shared by the sm_90a kernel files (gemm_wgmma.cu, flash_wgmma.cu), prepended
// to each of them after common.cuh (crates/cuda/src/kernels.rs): mbarriers, the tensor-memory
// accelerator's copies, and the warpgroup tensor-core instructions (wgmma) with their
// shared-memory descriptors.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// A TMA descriptor (CUtensorMap), passed by value as a __grid_constant__ parameter.
struct __align__(64) TmaMap {
    unsigned long long v[16];
};

// Copies the box at (x, y) (x the inner, contiguous coordinate) of the tensor `map` describes to
// shared memory at `dst`, completing `bar`'s transaction count by its bytes.
__device__ __forceinline__ void tma_load_2d(u32 dst, const TmaMap* map, int x, int y, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
            dst),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(x), "r"(y), "r"(bar)
        : "memory");
}

// mbarriers (shared memory, CTA scope).
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    unsigned long long state;
    asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];" : "=l"(state) : "r"(bar) : "memory");
}
// Arrives on `bar` and adds `bytes` to the transactions its current phase waits for.
__device__ __forceinline__ void mbar_arrive_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    }
}

// Byte offset of 16-byte chunk c of row r in a K-major tile of 64-element (128-byte) rows under
// the 128-byte swizzle: each row's chunks are permuted by the row's place in its 8-row atom.
__device__ __forceinline__ u32 wg_swizzle(int r, int c) { return (u32)(r * 128 + ((c ^ (r & 7)) << 4)); }

// The shared-memory matrix descriptor of a K-major, 128-byte-swizzled tile starting at `addr`
// (an atom-aligned tile, plus 32 bytes per k16 step): stride 1024 bytes between 8-row atoms;
// the leading offset is unused by this layout.
__device__ __forceinline__ unsigned long long wg_desc(u32 addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
           (1ull << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator reads or writes across the asynchronous products.
template <int R> __device__ __forceinline__ void wg_fence_acc(float (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Copies `bytes` (a multiple of 16) from global `src` to shared `dst` (both 16-byte aligned) as
// one bulk transfer, completing `bar`'s transaction count by its bytes.
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}

// Makes this thread's ordinary shared-memory writes visible to the async proxy (wgmma operands
// read through descriptors, bulk copies).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// A barrier over `threads` threads (a multiple of 32) of the block, numbered `id` (1-15; 0 is
// __syncthreads').
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

#endif
