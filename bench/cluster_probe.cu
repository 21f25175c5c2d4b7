// aotc bench: what merging key splits inside thread-block clusters costs on this GPU.
//
// Built and run by `python3 -m bench.cluster_probe` (a benchmark, not a test). Blocks are shaped
// like the MLA split blocks of sdpa_vector_wgmma.cuh: 384 threads, one block an SM (220 KB of
// shared memory), each holding a 64-row x 512-column fp32 partial O. It prints
//   - how many clusters of 1, 2, 4 and 8 such blocks can be resident at once;
//   - clusters of 8 (all splits of a row group): each block owns 64 of the 512 columns and
//     gathers them from the 8 partials, through distributed shared memory (st.shared::cluster
//     from registers) or through global memory (L2), then stores them as bf16;
//   - clusters of 2 (the pair merge of the tree): each block owns 32 rows and takes the peer's
//     copy of them by ld.shared::cluster (as the tree's merge_pair does) or by one bulk copy
//     (cp.async.bulk shared::cluster, pushed by the peer), then stores the merged fp32 rows;
// each against the same blocks with no exchange, as CUDA-graph replays of 50 launches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "sdpa_vector_wgmma.cuh"

namespace {

constexpr int kRows = 64, kV = 512, kThreads = 384;
constexpr int kSmem = 220 * 1024;  // one block an SM
constexpr int kSlice = 64, kSliceStride = kSlice + 8;  // clusters of 8: a block's columns
constexpr int kRow = kV + 8;                           // pairs: O rows as the tree pads them
constexpr int kRowBytes = kRow * 4;
constexpr int kHalfBytes = kRows / 2 * kRowBytes;  // 66,560: the peer's 32 rows
constexpr int kRecv = kRows * kRowBytes;           // pairs: where the peer's rows land
constexpr int kBar = kRecv + kHalfBytes;
static_assert(kBar + 8 <= kSmem, "the pair layout does not fit");

// The kernels' own cluster and mbarrier primitives: the pair merge's exchange is measured as the
// tree does it.
using aotc_sdpa::smem_u32;
using aotc_sdpa::wg::cluster_addr;
using aotc_sdpa::wg::cluster_rank;
using aotc_sdpa::wg::cluster_sync;
using aotc_sdpa::wg::fence_async_shared;
using aotc_sdpa::wg::ld_cluster4;
using aotc_sdpa::wg::mbar_arrive_expect;
using aotc_sdpa::wg::mbar_init;
using aotc_sdpa::wg::mbar_wait;

// The partial O of this thread, in the wgmma accumulator layout of warpgroups 1 and 2 (each
// holds 256 columns: 32 groups of 8, two rows of a float2 each).
struct Fragment {
  float o[128];
  __device__ Fragment(float seed) {
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = seed * (i + threadIdx.x);
  }
  template <typename F>
  __device__ void each(F&& f) const {  // f(row, column, x, y)
    const int t = threadIdx.x & 127, warp = t >> 5, lane = t & 31;
    const int col0 = (threadIdx.x / 128 - 1) * 256;
#pragma unroll
    for (int j = 0; j < 32; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        f(warp * 16 + (lane >> 2) + 8 * h, col0 + 8 * j + 2 * (lane & 3), o[4 * j + 2 * h],
          o[4 * j + 2 * h + 1]);
  }
};

enum Mode { kNone = 0, kShared = 1, kGlobal = 2 };

// Clusters of 8: block `rank` owns columns [64 rank, 64 rank + 64) of its row group.
__global__ void __launch_bounds__(kThreads, 1)
    merge8(int mode, float* scratch, __nv_bfloat16* out, float seed) {
  extern __shared__ __align__(1024) char smem[];
  const uint32_t rank = cluster_rank();
  const long long group = blockIdx.x / 8;
  const Fragment frag(seed);
  cluster_sync();  // every block's landing area is free
  if (threadIdx.x >= 128)
    frag.each([&](int row, int col, float x, float y) {
      const int owner = col / kSlice, c = col % kSlice;
      const int at = ((rank * kRows + row) * kSliceStride + c) * 4;
      if (mode == kShared) {
        const uint32_t addr = cluster_addr(smem_u32(smem) + at, owner);
        asm volatile("st.shared::cluster.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(x), "f"(y)
                     : "memory");
      } else if (mode == kGlobal) {
        float* dst = scratch + ((group * 8 + rank) * kRows + row) * kV + col;
        *reinterpret_cast<float2*>(dst) = make_float2(x, y);
      } else {
        *reinterpret_cast<float2*>(smem + at) = make_float2(x, y);
      }
    });
  cluster_sync();  // every slice is in place
  for (int i = threadIdx.x; i < kRows * kSlice / 2; i += kThreads) {
    const int row = i / (kSlice / 2), c = 2 * (i % (kSlice / 2));
    float2 sum = make_float2(0.f, 0.f);
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const float2 x =
          mode == kGlobal
              ? *reinterpret_cast<const float2*>(
                    scratch + ((group * 8 + s) * kRows + row) * kV + rank * kSlice + c)
              : *reinterpret_cast<const float2*>(smem + ((s * kRows + row) * kSliceStride + c) * 4);
      sum.x += x.x;
      sum.y += x.y;
    }
    *reinterpret_cast<__nv_bfloat162*>(out + (group * kRows + row) * kV + rank * kSlice + c) =
        __floats2bfloat162_rn(sum.x, sum.y);
  }
}

enum PairMode { kAlone = 0, kLoads = 1, kBulk = 2 };

// Clusters of 2: block `rank` owns rows [32 rank, 32 rank + 32) of both splits.
__global__ void __launch_bounds__(kThreads, 1)
    merge2(int mode, float* partials, float seed) {
  extern __shared__ __align__(1024) char smem[];
  const uint32_t rank = cluster_rank(), peer = rank ^ 1;
  const uint32_t bar = smem_u32(smem + kBar);
  if (threadIdx.x == 0) {
    mbar_init(bar, 1);
    mbar_arrive_expect(bar, kHalfBytes);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  const Fragment frag(seed);
  if (threadIdx.x >= 128)  // O rows into shared memory, as the tree stages them
    frag.each([&](int row, int col, float x, float y) {
      *reinterpret_cast<float2*>(smem + row * kRowBytes + col * 4) = make_float2(x, y);
    });
  fence_async_shared();  // for the bulk copy's reads
  cluster_sync();  // both blocks' rows and mbarriers are in place
  if (mode == kBulk) {
    if (threadIdx.x == 0) {  // the peer's rows, from this block, into the peer's landing area
      const uint32_t src = smem_u32(smem) + peer * kHalfBytes;
      asm volatile(
          "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], "
          "%2, [%3];" ::"r"(cluster_addr(smem_u32(smem) + kRecv, peer)),
          "r"(src), "r"(kHalfBytes), "r"(cluster_addr(bar, peer))
          : "memory");
    }
    mbar_wait(bar, 0);
  }
  const uint32_t peer_rows = cluster_addr(smem_u32(smem), peer);
  for (int i = threadIdx.x; i < kRows / 2 * (kV / 4); i += kThreads) {
    const int lr = i / (kV / 4), c4 = i % (kV / 4), r = rank * kRows / 2 + lr;
    const float4 x = *reinterpret_cast<const float4*>(smem + r * kRowBytes + c4 * 16);
    float4 y = make_float4(0.f, 0.f, 0.f, 0.f);
    if (mode == kLoads) {
      y = ld_cluster4(peer_rows + r * kRowBytes + c4 * 16);
    } else if (mode == kBulk) {
      y = *reinterpret_cast<const float4*>(smem + kRecv + lr * kRowBytes + c4 * 16);
    }
    const long long row = blockIdx.x / 2 * kRows + r;
    *reinterpret_cast<float4*>(partials + row * kV + c4 * 4) =
        make_float4(0.5f * (x.x + y.x), 0.5f * (x.y + y.y), 0.5f * (x.z + y.z), 0.5f * (x.w + y.w));
  }
  cluster_sync();  // the peer is done reading this block's rows
}

cudaLaunchConfig_t cluster_config(int blocks, int cluster, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = kSmem;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = cluster;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Microseconds a launch: the best of 5 replays of a graph of 50 launches.
template <typename Launch>
float time_launches(Launch&& launch) {
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  for (int i = 0; i < 20; ++i) launch(stream);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal);
  for (int i = 0; i < 50; ++i) launch(stream);
  cudaStreamEndCapture(stream, &graph);
  cudaGraphInstantiate(&exec, graph, 0);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  float best = 1e30f;
  for (int r = 0; r < 6; ++r) {
    cudaEventRecord(start, stream);
    cudaGraphLaunch(exec, stream);
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms;
    cudaEventElapsedTime(&ms, start, stop);
    if (r > 0 && ms < best) best = ms;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  return best * 1000.f / 50.f;
}

// Whether two device buffers hold the same bytes (every mode computes the same merge).
bool same(const void* a, const void* b, size_t bytes) {
  std::vector<char> ha(bytes), hb(bytes);
  cudaMemcpy(ha.data(), a, bytes, cudaMemcpyDeviceToHost);
  cudaMemcpy(hb.data(), b, bytes, cudaMemcpyDeviceToHost);
  return std::memcmp(ha.data(), hb.data(), bytes) == 0;
}

int check(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return 0;
  std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
  return 1;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "no CUDA device: the probe runs on the GPU machine\n");
    return 2;
  }
  cudaFuncSetAttribute(merge8, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  cudaFuncSetAttribute(merge2, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("%s, %d SMs; blocks of %d threads, %d bytes of shared memory\n", prop.name,
              prop.multiProcessorCount, kThreads, kSmem);
  for (int size : {1, 2, 4, 8}) {
    cudaLaunchAttribute attr;
    cudaLaunchConfig_t cfg = cluster_config(128, size, &attr);
    int clusters = 0;
    cudaOccupancyMaxActiveClusters(&clusters, merge8, &cfg);
    std::printf("clusters of %d: at most %d resident (%d blocks)\n", size, clusters,
                clusters * size);
  }
  float *scratch, *partials[3];
  __nv_bfloat16* out[3];
  cudaMalloc(&scratch, 132LL * kRows * kV * 4);
  for (int m = 0; m < 3; ++m) {
    cudaMalloc(&partials[m], 64LL * kRows * kV * 4);
    cudaMalloc(&out[m], 16LL * kRows * kV * 2);
  }
  if (check("setup")) return 1;
  const char* modes8[] = {"no exchange", "shared::cluster stores", "global (L2)"};
  for (int blocks : {120, 128})
    for (int round = 0; round < 2; ++round)
      for (int mode : {kNone, kShared, kGlobal}) {
        const float us = time_launches([&](cudaStream_t s) {
          cudaLaunchAttribute attr;
          cudaLaunchConfig_t cfg = cluster_config(blocks, 8, &attr);
          cfg.stream = s;
          cudaLaunchKernelEx(&cfg, merge8, mode, scratch, out[mode], 1e-3f);
        });
        if (check(modes8[mode])) return 1;
        std::printf("clusters of 8, %d blocks, %-22s %7.2f us a launch\n", blocks, modes8[mode], us);
      }
  const char* modes2[] = {"no exchange", "ld.shared::cluster", "cp.async.bulk"};
  for (int round = 0; round < 2; ++round)
    for (int mode : {kAlone, kLoads, kBulk}) {
      const float us = time_launches([&](cudaStream_t s) {
        cudaLaunchAttribute attr;
        cudaLaunchConfig_t cfg = cluster_config(128, 2, &attr);
        cfg.stream = s;
        cudaLaunchKernelEx(&cfg, merge2, mode, partials[mode], 1e-3f);
      });
      if (check(modes2[mode])) return 1;
      std::printf("clusters of 2, 128 blocks, %-22s %7.2f us a launch\n", modes2[mode], us);
    }
  // 128 blocks: 16 row groups of 64 rows x 512 bf16 outputs, 64 pairs of 32-row fp32 halves
  const bool agree8 = same(out[kShared], out[kGlobal], 16LL * kRows * kV * 2);
  const bool agree2 = same(partials[kLoads], partials[kBulk], 64LL * kRows * kV * 4);
  std::printf("outputs agree: clusters of 8 %s, pairs %s\n", agree8 ? "yes" : "NO",
              agree2 ? "yes" : "NO");
  return agree8 && agree2 ? 0 : 1;
}
