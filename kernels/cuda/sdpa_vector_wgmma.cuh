// aotc: decode attention on Hopper tensor cores (wgmma), for many query rows per KV head.
//
// MLA decode (128 query heads on one latent KV head, D=576, V=512) does about 2 x 128 FLOP per
// byte of K and V: tensor-core work, fed by a stream of K tiles. A block is 64 query rows (one
// wgmma M) of one (batch, KV head, key split) and three warpgroups (sm_90a):
//   - Warpgroup 0 computes S = Q K^T (64 rows x 64 keys, fp32; Q and K tiles in shared memory
//     in the 128-byte-swizzled layout wgmma reads), the online softmax in registers, and hands
//     P (in T) and the rows' rescale factors over in shared memory.
//   - Warpgroups 1 and 2 each own half of O (V/2 fp32 columns a row: 128 registers at V=512),
//     accumulate O += P V, and stage K (and V) tiles two slots deep: by TMA (one thread issues
//     a part's boxes from the tensor maps the launch encodes) for KV heads of 64+ rows, else
//     with 16-byte cp.async (also where a map could not be encoded). A tile lands in up to
//     three parts (column ranges: V's two halves, then K's columns past V), each staged by one
//     warpgroup and tracked by an mbarrier that expects its bytes (TMA) or its copies arrive on
//     (cp.async.mbarrier.arrive): no thread waits for its own copies, S starts on a part as
//     soon as it is there, and each warpgroup refills the half of V it reads as soon as its
//     own P V is done. TMA took MLA
//     B=8 N=32768 from 172-180 to 158-163 us (H100, bench/NOTES.md round 11): the copies no
//     longer take the P V warpgroups' issue slots.
//   - While 1 and 2 multiply P(t) V(t), warpgroup 0 computes S(t+1) and its softmax: the
//     tensor cores are not idle while the softmax runs, as they were with two warpgroups.
//   - When V is K's prefix (MLA's v = k[..., :V], detected from pointers and strides), V is
//     read from the K tile: the latent is loaded once. Otherwise K and V have their own slots,
//     two of each where shared memory holds them (WCfg::DEEP).
// Named barriers hand P over: 1 = P ready (0 -> 1, 2), 2 = P free (1, 2 -> 0). Each is used
// strictly alternately (an arrival for tile t + 1 always follows the wait for tile t), so
// counts never mix. Tiles are handed over by the parts' mbarriers (phase = fill count & 1).
// Output is the split pass's (partials, maxs, sums): the combine kernel of sdpa_vector.cuh
// merges the splits and applies sinks. The pair entry points run in clusters of two blocks
// (key splits 2j and 2j + 1) that first merge their two splits through distributed shared
// memory, each block writing half the rows: one partial per two splits. The one-pass entry
// points (one split a row group) write the output themselves, sinks applied.
//
// Entry point: sdpa_vector_wgmma_<TN>_<D>_<V>(q, k, v, mask, sinks, partials, maxs, sums,
// WParams): Params of sdpa_vector.cuh (m_tiles, stages and row_groups as the plan packs them),
// then K's, V's and Q's tensor maps; sdpa_vector_wgmma_one_<TN>_<D>_<V>(q, k, v, mask, sinks,
// out, WParams).
// Compiled for every arch so that each image has the same symbols; only sm_90a has the body.
#pragma once

#include "sdpa_vector.cuh"

namespace aotc_sdpa {
namespace wg {

constexpr int kRows = 64;        // query rows per block
constexpr int kKeys = 64;        // keys per tile
constexpr int kThreads = 384;    // three warpgroups
constexpr int kAtom = 64 * 128;  // 64 rows of one 128-byte (64-element) column atom
constexpr int kParts = 3;        // a slot's tile lands in up to three parts (column ranges)
template <int N>
using Atoms = std::integral_constant<int, N>;
// A K tile's parts, in atoms: [0, CUT0), [CUT0, CUT1), [CUT1, DA). When V is K's prefix: V's
// two halves, then the columns past V; otherwise the row's two halves (the third is empty).
template <int DA, int VA, bool V_IN_K>
struct KParts {
  static constexpr int CUT0 = V_IN_K ? VA / 2 : (DA + 1) / 2;
  static constexpr int CUT1 = V_IN_K ? VA : DA;
};

constexpr int kSharedLimit = 232448;  // Hopper's opt-in shared memory per block
constexpr int kSharedPerSM = 233472;  // Hopper's shared memory per SM
constexpr int kBlockReserve = 1024;   // shared memory the system keeps per resident block
// Heads up to this D + V keep a block's state in 80 registers a thread (65536 / 768) without
// spills, so two blocks can share an SM (the dual entry points).
constexpr int kTwoBlockHeads = 256;
constexpr int kDeepMinTiles = 3;      // key tiles of a split that takes two-deep K and V slots

// Mirrored by wgmma_shared_bytes() in aotc/families/sdpa_vector/__init__.py.
// Tile slots: where V is K's prefix (MLA), two K tiles (tile t in slot t % 2). Otherwise DEEP
// layouts hold two K and two V tiles (slots 0-1 K, 2-3 V: tile t + 2 loads while t and t + 1
// are read; splits under kDeepMinTiles use slots 0 and 2 only); layouts whose four tiles do not
// fit (576/512), and the short-split entry points (TWO_DEEP false), hold one K (slot 0) and one
// V (slot 1), so tile t + 1 is only requested once t is read.
template <int D, int V, bool TWO_DEEP = true>
struct WCfg {
  static constexpr int DA = D / 64;  // column atoms of a Q / K row
  static constexpr int VA = V / 64;
  static constexpr int NV = V / 2;  // output columns per warpgroup
  static constexpr int Q_BYTES = DA * kAtom;
  static constexpr int REST = kAtom + kRows * 4 + 1024;  // P, rescale factors, alignment
  // An mbarrier per part of each slot, then Q's (Q by TMA).
  __host__ __device__ static constexpr int bar_bytes(int slots) { return slots * kParts * 8 + 8; }
  static constexpr int DEEP_SLOT_BYTES = 2 * (DA + VA) * kAtom;
  static constexpr bool DEEP_FITS = Q_BYTES + DEEP_SLOT_BYTES + bar_bytes(4) + REST <= kSharedLimit;
  static constexpr bool DEEP = TWO_DEEP && DEEP_FITS;
  static constexpr int SLOTS = DEEP ? 4 : 2;
  static constexpr int SLOTS_BYTES = DEEP ? DEEP_SLOT_BYTES : 2 * cmax(DA, VA) * kAtom;
  static constexpr int BAR_BYTES = bar_bytes(SLOTS);
  static constexpr int SMEM = Q_BYTES + SLOTS_BYTES + BAR_BYTES + REST;
  // Two blocks of this layout fit an SM's registers and shared memory (the dual entry point).
  static constexpr bool TWO_BLOCKS_FIT =
      D + V <= kTwoBlockHeads && 2 * (SMEM + kBlockReserve) <= kSharedPerSM;
  // Byte offset of slot s in the slot area.
  __host__ __device__ static constexpr int slot_offset(int s) {
    return DEEP ? (s < 2 ? s * DA : 2 * DA + (s - 2) * VA) * kAtom : s * cmax(DA, VA) * kAtom;
  }
};

template <typename T, int D, int V>
__host__ __device__ constexpr bool supported() {
  return !std::is_same<T, float>::value && D % 64 == 0 && V % 128 == 0 && V <= 512 &&
         WCfg<D, V>::SMEM <= kSharedLimit;
}

// ---------------------------------------------------------------- wgmma helpers
// Shared-memory matrix descriptor, 128-byte swizzle. K-major operands: SBO = 1024 (8 rows of
// 128 bytes), LBO unused; MN-major (V as B, transposed): LBO = next 64-column atom.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) |
         ((uint64_t)(sbo >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Until at most N committed groups of this warpgroup's MMAs are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy shared-memory writes (st.shared, cp.async) become visible to wgmma's reads.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keep the compiler from moving accumulator accesses across wgmma issue and wait.
template <int R>
__device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Operand lists of m64nNk16 with f32 accumulators (N/2 registers a thread), 32 at a time.
#define AOTC_WG_R0 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define AOTC_WG_R32 \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define AOTC_WG_R64 \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define AOTC_WG_R96 \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define AOTC_WG_REGS32 "{" AOTC_WG_R0 "}"
#define AOTC_WG_REGS64 "{" AOTC_WG_R0 ", " AOTC_WG_R32 "}"
#define AOTC_WG_REGS96 "{" AOTC_WG_R0 ", " AOTC_WG_R32 ", " AOTC_WG_R64 "}"
#define AOTC_WG_REGS128 "{" AOTC_WG_R0 ", " AOTC_WG_R32 ", " AOTC_WG_R64 ", " AOTC_WG_R96 "}"
#define AOTC_WG_F8(i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define AOTC_WG_F32(i) AOTC_WG_F8(i), AOTC_WG_F8(i + 8), AOTC_WG_F8(i + 16), AOTC_WG_F8(i + 24)
#define AOTC_WG_OUTS32 AOTC_WG_F32(0)
#define AOTC_WG_OUTS64 AOTC_WG_OUTS32, AOTC_WG_F32(32)
#define AOTC_WG_OUTS96 AOTC_WG_OUTS64, AOTC_WG_F32(64)
#define AOTC_WG_OUTS128 AOTC_WG_OUTS96, AOTC_WG_F32(96)

#define AOTC_WGMMA_FN(N, R, IA, IB, IS, IT)                                                  \
  template <bool BF16, int TB>                                                               \
  __device__ __forceinline__ void wgmma_m64n##N##k16(float(&d)[R], uint64_t da, uint64_t db, \
                                                     int accumulate) {                       \
    if constexpr (BF16) {                                                                    \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                         \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 " AOTC_WG_REGS##R \
                   ", %" #IA ", %" #IB ", p, 1, 1, 0, %" #IT ";\n}\n"                        \
                   : AOTC_WG_OUTS##R                                                         \
                   : "l"(da), "l"(db), "r"(accumulate), "n"(TB));                            \
    } else {                                                                                 \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                         \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.f16.f16 " AOTC_WG_REGS##R \
                   ", %" #IA ", %" #IB ", p, 1, 1, 0, %" #IT ";\n}\n"                        \
                   : AOTC_WG_OUTS##R                                                         \
                   : "l"(da), "l"(db), "r"(accumulate), "n"(TB));                            \
    }                                                                                        \
  }
AOTC_WGMMA_FN(64, 32, 32, 33, 34, 35)
AOTC_WGMMA_FN(128, 64, 64, 65, 66, 67)
AOTC_WGMMA_FN(192, 96, 96, 97, 98, 99)
AOTC_WGMMA_FN(256, 128, 128, 129, 130, 131)
#undef AOTC_WGMMA_FN

// O (64 x NV) += A (64 x 16, K-major) B (16 x NV, MN-major) for NV in {64, 128, 192, 256}.
template <bool BF16, int NV>
__device__ __forceinline__ void wgmma_pv(float (&d)[NV / 2], uint64_t da, uint64_t db) {
  if constexpr (NV == 64) wgmma_m64n64k16<BF16, 1>(d, da, db, 1);
  else if constexpr (NV == 128) wgmma_m64n128k16<BF16, 1>(d, da, db, 1);
  else if constexpr (NV == 192) wgmma_m64n192k16<BF16, 1>(d, da, db, 1);
  else wgmma_m64n256k16<BF16, 1>(d, da, db, 1);
}

// Profiling builds (-DAOTC_SDPA_ABLATE=BITS, bench/ablate_wgmma.py) skip the parts of the block
// that BITS names, to time the others; wrong results by design, never shipped. The bits are
// fixed at compile time: tested at run time, the skips put branches among the MMAs, ptxas then
// made each wgmma wait (C7519), and the whole call ran ~1.5x slower (bench/NOTES.md round 32).
#ifdef AOTC_SDPA_ABLATE
#define AOTC_SKIP(bit) ((((AOTC_SDPA_ABLATE) >> (bit)) & 1) != 0)
#else
#define AOTC_SKIP(bit) false
#endif


// ---------------------------------------------------------------- synchronisation
// Named barriers between warpgroups: `arrive` signals without waiting, `sync` waits for the
// signal (the arrivals and the waiters add up to `count` threads).
template <int ID, int COUNT>
__device__ __forceinline__ void bar_sync() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(COUNT) : "memory");
}
template <int ID, int COUNT>
__device__ __forceinline__ void bar_arrive() {
  asm volatile("bar.arrive %0, %1;\n" ::"n"(ID), "n"(COUNT) : "memory");
}
constexpr int kBarPReady = 1, kBarPFree = 2;
constexpr int kBarDone = 3;  // pair entry points: every warpgroup is done with Q and the slots
constexpr int kBarStaged = 4;  // one pass: warpgroups 1 and 2 have staged O

// ---------------------------------------------------------------- clusters of two (PAIR)
// Both blocks of the cluster arrive, then wait: release and acquire at cluster scope, so each
// sees the other's (and its own) shared-memory writes before the barrier.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}
// The address of shared-window address `addr` in block `rank` of the cluster.
__device__ __forceinline__ uint32_t cluster_addr(uint32_t addr, uint32_t rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(addr), "r"(rank));
  return out;
}
__device__ __forceinline__ float ld_cluster(uint32_t addr) {
  float x;
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(x) : "r"(addr) : "memory");
  return x;
}
__device__ __forceinline__ float4 ld_cluster4(uint32_t addr) {
  float4 x;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(x.x), "=f"(x.y), "=f"(x.z), "=f"(x.w)
               : "r"(addr)
               : "memory");
  return x;
}

// mbarriers (shared-window addresses) of the tile atoms.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// An arrival on `bar` once this thread's earlier cp.async copies have landed; does not wait.
__device__ __forceinline__ void mbar_arrive_on_copies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// ---------------------------------------------------------------- tensor memory access (TMA)
// A CUtensorMap: 128 opaque bytes, 64-byte aligned, encoded by the launch at evaluation (it
// knows K's, V's and Q's addresses and strides only then; see `tensor_maps` of the plan).
struct alignas(64) TensorMap {
  unsigned long long bytes[16];
};
// The kernel's parameter: Params, then the maps of K, V and Q, each over its whole 4-D array
// (innermost first: D, keys or tokens, heads, batch) with the 128-byte swizzle, in boxes of 64
// columns x 64 keys (K, V) or 64 columns x Lq tokens x 64 / Lq heads (Q: 64 rows in the row
// order g * Lq + i of the block), and a word whose bit i says map i was encoded. Where a map
// could not be (a stride or address TMA cannot take), the block stages with cp.async instead.
struct WParams {
  Params p;
  TensorMap maps[3];
  unsigned maps_ok;
};
constexpr unsigned kAllMaps = 3;  // K's and V's
constexpr unsigned kQMap = 4;

// An L2 policy that keeps the lines a load brings in: every split of a row group reads its Q.
__device__ __forceinline__ uint64_t l2_evict_last() {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// One arrival on `bar` that also expects `bytes` more to land on it (a TMA transaction).
__device__ __forceinline__ void mbar_arrive_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// An L2 policy that makes the lines a load brings in the first to be evicted. A K tile is dead
// once both row groups of its split have read it, at about the same time. Tiles loaded under
// it ran every MLA row faster in the harness; evict-last stores of the partials instead gained
// less, and both together no more (bench/NOTES.md, round 13).
__device__ __forceinline__ uint64_t l2_evict_first() {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// The box at (column c, key k, head h, batch b) of `map` into the 1024-aligned atom at `dst`,
// swizzled as wgmma reads it; keys past the array's end land as zeros. Completes on `bar`;
// its lines are cached in L2 under `policy`.
__device__ __forceinline__ void tma_load_box(uint32_t dst, const TensorMap* map, int c, int k,
                                             int h, int b, uint32_t bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".L2::cache_hint [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c), "r"(k), "r"(h), "r"(b), "r"(bar),
      "l"(policy)
      : "memory");
}

// `bytes` (a multiple of 16) from shared memory at `src` to global memory at `dst` (both
// 16-byte aligned) by the bulk-copy engine, as one bulk group of its own.
__device__ __forceinline__ void bulk_store(void* dst, uint32_t src, uint32_t bytes) {
  asm volatile(
      "cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n"
      "cp.async.bulk.commit_group;\n" ::"l"(reinterpret_cast<uint64_t>(dst)),
      "r"(src), "r"(bytes)
      : "memory");
}
// Whether `p` may be a bulk copy's global address (16-byte aligned).
__device__ __forceinline__ bool bulk_aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}
// Until this thread's bulk groups have read their shared memory (which may then be reused or
// released); their writes complete by the grid's end.
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}

// ---------------------------------------------------------------- O out by bulk copies
// A block's 64 rows of O leave through shared memory: each thread writes its accumulator
// fragment there, and one bulk copy a row takes it to global memory, in place of 64 four- or
// eight-byte stores a thread that kept the load-store unit full (lg stalls; bench/NOTES.md,
// rounds 39 and 40). Rows are padded by 8 elements so that a warp's stores hit 32 banks.
template <typename Out, int V>
constexpr int kStagePitch = (V + 8) * (int)sizeof(Out);
template <typename Out, int V>
constexpr int kStageBytes = kRows * kStagePitch<Out, V>;

// This thread's fragment of O (rows wrow and wrow + 8, columns col0 + 8 n + 2 quad and + 1; NO
// accumulators) into the staged rows at `stage`: as T pairs scaled by the rows' f0 and f1, or
// (Out = float, the partials) as they are.
template <typename Out, typename T, int V, int NO>
__device__ __forceinline__ void stage_o(char* stage, const float (&o)[NO], int wrow, int quad,
                                        int col0, float f0, float f1) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float f = h ? f1 : f0;
    char* dst = stage + (wrow + 8 * h) * kStagePitch<Out, V> + (col0 + 2 * quad) * sizeof(Out);
#pragma unroll
    for (int n = 0; n < NO / 4; ++n) {
      if constexpr (std::is_same<Out, float>::value)
        *reinterpret_cast<float2*>(dst + 8 * n * sizeof(Out)) =
            make_float2(o[4 * n + 2 * h], o[4 * n + 2 * h + 1]);
      else
        *reinterpret_cast<uint32_t*>(dst + 8 * n * sizeof(Out)) =
            pack2<T>(o[4 * n + 2 * h] * f, o[4 * n + 2 * h + 1] * f);
    }
  }
}

// Staged row r (at shared address `stage`) to `dst` (16-byte aligned), by this thread, which
// then waits until the copy has read it: the shared memory may go once every copier is back.
template <typename Out, int V>
__device__ __forceinline__ void copy_staged_row(Out* dst, uint32_t stage, int r) {
  bulk_store(dst, stage + r * kStagePitch<Out, V>, V * sizeof(Out));
  bulk_wait_read();
}

// ---------------------------------------------------------------- staging
// Byte offset of row `row`, 16-byte chunk `chunk` of a 64-row operand in 128-byte-swizzled
// column atoms (the layout wgmma's SW128 descriptors read). Atoms are 1024-byte aligned.
__device__ __forceinline__ uint32_t sw_offset(int row, int chunk) {
  return (chunk >> 3) * kAtom + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// Atoms [a0, a0 + NA) (columns 64 a0 .. 64 (a0 + NA) - 1) of keys [k0, k0 + 64) of one KV
// head into the slot at `dst` (`gdst` is the same place as a generic pointer), by the 128
// threads of one warpgroup (`lt` = 0..127), then one arrival each on `bar` when the data is
// there. Keys at or past key_end are zero-filled.
// The 16-byte path: a warp covers whole row pieces (up to 512 contiguous bytes), each lane
// fixed chunks, so the swizzled offsets are computed once and the loop is a pointer step and a
// cp.async per chunk. These threads also issue the P V MMAs: the loop's length matters.
// With a tensor map (`map` not null), one thread issues the part's boxes instead, and `bar`
// expects their bytes: key_end is not applied (S masks those keys; keys past the array are
// zeros), and the copies cost the warpgroup no issue slots.
template <typename T, int NA>
__device__ __forceinline__ void stage_cols(uint32_t dst, char* gdst, const T* base,
                                           const long long* st, bool vec, int a0, int k0,
                                           int key_end, int lt, uint32_t bar,
                                           const TensorMap* map, int kvh, int b) {
  constexpr int CH = cmax(NA, 1) * 8;           // 16-byte chunks of a row (NA = 0: no part)
  constexpr int RPW = CH < 32 && 32 % CH == 0 ? 32 / CH : 1;  // rows a warp covers at once
  constexpr int PER = cdiv(CH, 32);             // chunks a lane takes of a row
  constexpr int PASSES = kKeys / (4 * RPW);
  if constexpr (NA == 0) {
    return;
  } else if (map != nullptr) {
    if (lt == 0) {
      mbar_arrive_expect(bar, NA * kAtom);
#pragma unroll
      for (int a = a0; a < a0 + NA; ++a)
        tma_load_box(dst + a * kAtom, map, a * 64, k0, kvh, b, bar, l2_evict_first());
    }
  } else if (vec) {
    const int warp = lt >> 5, lane = lt & 31;
    const int r0 = warp * RPW + (RPW > 1 ? lane / CH : 0);  // rows r0 + 4 RPW i
    const int c0 = RPW > 1 ? lane % CH : lane;              // chunks c0 + 32 u
    uint32_t off[PER];
#pragma unroll
    for (int u = 0; u < PER; ++u) {
      const int c = c0 + 32 * u;
      off[u] = dst + (a0 + (c >> 3)) * kAtom + r0 * 128 + (((c & 7) ^ (r0 & 7)) << 4);
    }
    const long long step = 4 * RPW * st[2];
    const T* src = base + (long long)(k0 + r0) * st[2] + a0 * 64 + c0 * 8;
    const bool full = k0 + kKeys <= key_end;
#pragma unroll
    for (int i = 0; i < PASSES; ++i, src += step) {
      const int row = r0 + 4 * RPW * i;
      // Row & 7 moves by 4 every other pass when RPW = 1: the swizzle flips bit 6.
      const uint32_t flip = RPW == 1 ? (uint32_t)((i & 1) << 6) : 0u;
      const bool ok = full || k0 + row < key_end;
#pragma unroll
      for (int u = 0; u < PER; ++u)
        if (RPW > 1 || CH % 32 == 0 || c0 + 32 * u < CH)
          cp_async16_to(((off[u] + 4 * RPW * i * 128) ^ flip), ok ? src + 256 * u : base,
                        ok ? 16 : 0);
    }
    mbar_arrive_on_copies(bar);
  } else {
    for (int e = lt; e < kKeys * NA * 64; e += 128) {
      const int j = e / (NA * 64), d = e - j * (NA * 64) + a0 * 64;
      const int key = k0 + j;
      T val = Tr<T>::t(0.f);
      if (key < key_end) val = base[(long long)key * st[2] + (long long)d * st[3]];
      *reinterpret_cast<T*>(gdst + sw_offset(j, d >> 3) + (d & 7) * 2) = val;
    }
    fence_async_shared();
    mbar_arrive(bar);  // release: the stores above are seen by whoever waits on `bar`
  }
}

// ---------------------------------------------------------------- softmax pieces
// O rows (r, r + 8) *= (a0, a1). Once the running max settles (most tiles of a long split)
// every factor is exactly 1: the warp skips its NV / 2 multiplies.
template <int NV>
__device__ __forceinline__ void rescale(float (&o)[NV / 2], float a0, float a1) {
  if (!__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) return;
#pragma unroll
  for (int n = 0; n < NV / 8; ++n) {
    o[4 * n] *= a0;
    o[4 * n + 1] *= a0;
    o[4 * n + 2] *= a1;
    o[4 * n + 3] *= a1;
  }
}

// A thread's two query rows (r and r + 8): the mask row offset and the last key causal
// attention keeps; dead rows (padding past R) are never masked.
struct RowFacts {
  long long mask_row[2];
  int causal_last[2];
  bool live[2];
};

__device__ __forceinline__ RowFacts row_facts(const Params& p, int b, int kvh, int rr, int R) {
  RowFacts f;
  const int G = p.q_heads / p.kv_heads, Lq = p.q_len;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = rr + 8 * h;
    f.live[h] = row < R;
    const int g = f.live[h] ? row / Lq : 0, i = f.live[h] ? row - g * Lq : 0;
    f.mask_row[h] = (long long)b * p.mask_strides[0] +
                    (long long)(kvh * G + g) * p.mask_strides[1] +
                    (long long)i * p.mask_strides[2];
    f.causal_last[h] = p.kv_len - Lq + i;
  }
  return f;
}

// Scores of a tile with a mask or past the split's last key, into the log2 domain: the slow
// path (per-element tests and mask loads). `key0` is this thread's first key column.
template <typename T>
__device__ __forceinline__ void mask_scores(float (&s)[32], const Params& p, const void* mask,
                                            const RowFacts& rows, int key0, int key_end,
                                            float scale2) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int key = key0 + n * 8 + c;
        float x = s[4 * n + 2 * h + c] * scale2;
        if (key >= key_end) {
          x = -INFINITY;
        } else if (rows.live[h] && p.mask_kind == 1) {
          if (key > rows.causal_last[h]) x = kMasked;
        } else if (rows.live[h] && p.mask_kind == 2) {
          if (!reinterpret_cast<const bool*>(mask)[rows.mask_row[h] + key * p.mask_strides[3]])
            x = kMasked;
        } else if (rows.live[h] && p.mask_kind == 3) {
          x += Tr<T>::f(reinterpret_cast<const T*>(
                   mask)[rows.mask_row[h] + key * p.mask_strides[3]]) *
               kLog2e;
        }
        s[4 * n + 2 * h + c] = x;
      }
}

// Scores of a tile into the log2 domain: the fast path where no mask applies and the tile is
// whole (a uniform test), else mask_scores with the rows' facts (`rows()`: kept by a caller
// with registers to spare, worked out here by one without).
template <typename T, typename Rows>
__device__ __forceinline__ void scores_log2(float (&s)[32], const Params& p, const void* mask,
                                            Rows rows, int k0, int key_end, int quad,
                                            float scale2) {
  if (p.mask_kind == 0 && k0 + kKeys <= key_end) {
#pragma unroll
    for (int e = 0; e < 32; ++e) s[e] *= scale2;
  } else {
    mask_scores<T>(s, p, mask, rows(), k0 + quad * 2, key_end, scale2);
  }
}

// The output scale of row rr of a row group that is its split's only one (the combine's
// store_merged for one partial, sinks included): max m and sum l in the log2 domain.
template <typename T>
__device__ __forceinline__ float one_split_scale(const Params& p, const T* sinks, int kvh, int rr,
                                                 int R, float m, float l) {
  // Row rr = g * Lq + i of this KV head is query head kvh * G + g (sink_log2's head, without
  // its 64-bit division).
  const int head = kvh * (p.q_heads / p.kv_heads) + rr / p.q_len;
  const float sk = p.has_sinks && rr < R ? Tr<T>::f(sinks[head]) * kLog2e : -INFINITY;
  return merged_scale(m, l, sk);
}

// Q's boxes of row group row0 (64 columns x Lq tokens x 64 / Lq heads: the rows in their
// g * Lq + i order) into the DA atoms at sQ, on `qbar`; by one thread.
template <int DA>
__device__ __forceinline__ void load_q_boxes(uint32_t sQ, const WParams& wp, uint32_t qbar,
                                             int kvh, int row0, int b) {
  const Params& p = wp.p;
  const int head0 = kvh * (p.q_heads / p.kv_heads) + row0 / p.q_len;
  mbar_arrive_expect(qbar, DA * kAtom);
  for (int a = 0; a < DA; ++a)
    tma_load_box(sQ + a * kAtom, &wp.maps[2], a * 64, 0, head0, b, qbar, l2_evict_last());
}

// ---------------------------------------------------------------- the block
// Q rows (row r = g * Lq + i of this KV head's group) into the atoms at `dst`, zero past R; by
// all threads of the block. The 16-byte path gives each warp whole rows (RPW at once where a row
// is under 32 chunks), so a row's address is computed once, not once per chunk: at 576 columns
// the per-chunk form spent ~12 iterations of 64-bit index arithmetic and divisions a thread.
// NT: the block's threads.
template <typename T, int D, int NT = kThreads>
__device__ __forceinline__ void stage_q(uint32_t dst, char* gdst, const T* q, const Params& p,
                                        int b, int kvh, int row0, int R) {
  constexpr int CH = D / 8;
  if (vec_ok(q, p.q_strides)) {
    constexpr int RPW = CH < 32 && 32 % CH == 0 ? 32 / CH : 1;  // rows a warp covers at once
    constexpr int PER = cdiv(CH, 32);                           // chunks a lane takes of a row
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int c0 = RPW > 1 ? lane % CH : lane;
#pragma unroll 1
    for (int r = warp * RPW + (RPW > 1 ? lane / CH : 0); r < kRows; r += NT / 32 * RPW) {
      const int rr = row0 + r;
      const T* src = rr < R ? q_row(q, p, b, kvh, rr) : q;
#pragma unroll
      for (int u = 0; u < PER; ++u)
        if (CH % 32 == 0 || RPW > 1 || c0 + 32 * u < CH)
          cp_async16_to(dst + sw_offset(r, c0 + 32 * u), src + (c0 + 32 * u) * 8, rr < R ? 16 : 0);
    }
    return;
  }
  for (int c = threadIdx.x; c < kRows * D; c += NT) {
    const int r = c / D, x = c - r * D;
    const int rr = row0 + r;
    const T val = rr < R ? q_row(q, p, b, kvh, rr)[(long long)x * p.q_strides[3]] : Tr<T>::t(0.f);
    *reinterpret_cast<T*>(gdst + sw_offset(r, x >> 3) + (x & 7) * 2) = val;
  }
}

// Pair entry points: the two blocks of a cluster are key splits 2j and 2j + 1 (ranks 0 and 1) of
// one (batch, KV head, row group); the split count is even.
__device__ __forceinline__ BlockWork pair_block_work(const Params& p) {
  BlockWork w = decode_block(p, blockIdx.x >> 1, p.num_splits / 2);
  w.split = 2 * w.split + (blockIdx.x & 1);
  set_keys(w, p);
  return w;
}

// Pair entry points: the O rows (stride V + 8 floats: a warp's float2 stores take two
// wavefronts) and each row's max and sum, over Q and the slots once every MMA is done.
template <int D, int V, bool TWO_DEEP>
struct PairCfg {
  static constexpr int ROW = V + 8;
  static constexpr int STATS = kRows * ROW * 4;                 // byte offset of maxs, then sums
  static constexpr int WEIGHTS = STATS + 2 * kRows * 4;         // this block's rows' merge weights
  static constexpr int ROW_AT = WEIGHTS + 2 * (kRows / 2) * 4;  // each row's place in partials
  static constexpr int BYTES = ROW_AT + (kRows / 2) * 8;
  static_assert(BYTES <= WCfg<D, V, TWO_DEEP>::Q_BYTES + WCfg<D, V, TWO_DEEP>::SLOTS_BYTES,
                "the pair exchange does not fit over Q and the slots");
};

// Pair entry points: merges the cluster's two splits into one partial (split / 2 of
// num_splits / 2). Block `rank` takes rows [32 rank, 32 rank + 32): its own O rows and the
// peer's, read from the peer's shared memory, written out as whole rows (16-byte stores).
template <int D, int V, bool TWO_DEEP>
__device__ __forceinline__ void merge_pair(const Params& p, uint32_t sX, char* gX,
                                           float* __restrict__ partials,
                                           float* __restrict__ maxs, float* __restrict__ sums,
                                           int b, int kvh, int row0, int R, int split) {
  using PC = PairCfg<D, V, TWO_DEEP>;
  constexpr int kHalf = kRows / 2, C4 = V / 4;
  const int tid = threadIdx.x, S2 = p.num_splits / 2, out_split = split / 2;
  cluster_sync();  // both blocks' O rows and statistics are in place
  const uint32_t rank = cluster_rank();
  const uint32_t peer = cluster_addr(sX, rank ^ 1);
  const float* const stats = reinterpret_cast<const float*>(gX + PC::STATS);
  float* const weights = reinterpret_cast<float*>(gX + PC::WEIGHTS);
  long long* const row_at = reinterpret_cast<long long*>(gX + PC::ROW_AT);
  if (tid < kHalf) {
    const int r = rank * kHalf + tid;
    const float ma = stats[r], la = stats[kRows + r];
    const float mb = ld_cluster(peer + PC::STATS + r * 4);
    const float lb = ld_cluster(peer + PC::STATS + (kRows + r) * 4);
    const float mx = fmaxf(ma, mb), mu = mx == -INFINITY ? 0.f : mx;
    const float wa = exp2f(ma - mu), wb = exp2f(mb - mu);
    weights[tid] = wa;
    weights[kHalf + tid] = wb;
    row_at[tid] = -1;  // a row past R
    if (row0 + r < R) {
      const long long at = out_row(p, b, kvh, row0 + r) * S2 + out_split;
      maxs[at] = mx;
      sums[at] = wa * la + wb * lb;
      row_at[tid] = at * V;
    }
  }
  bar_sync<kBarDone, kThreads>();  // the weights and row offsets are in place
  // A thread keeps one float4 column of every kStep-th row, and the rows' places come from
  // row_at: the loop divides nothing (two divisions a float4 cost ~0.5 us of the merge,
  // bench/NOTES.md round 30).
  static_assert(kThreads % C4 == 0, "a thread's rows share its column");
  constexpr int kStep = kThreads / C4;
  const int c4 = tid % C4;
  const uint32_t col = (rank * kHalf * PC::ROW + c4 * 4) * 4;
  for (int lr = tid / C4; lr < kHalf; lr += kStep) {
    const uint32_t off = col + lr * PC::ROW * 4;
    const float4 x = *reinterpret_cast<const float4*>(gX + off), y = ld_cluster4(peer + off);
    const long long at = row_at[lr];
    if (at < 0) break;  // rows past R: every later one is too
    const float wa = weights[lr], wb = weights[kHalf + lr];
    *reinterpret_cast<float4*>(partials + at + c4 * 4) = make_float4(
        wa * x.x + wb * y.x, wa * x.y + wb * y.y, wa * x.z + wb * y.z, wa * x.w + wb * y.w);
  }
  cluster_sync();  // the peer is done reading this block's rows
}

// MAPS_PREFETCHED: the entry point has prefetched every encoded tensor map (prefetch_maps).
// ONE: the block is its row group's only split, and writes `out` (sinks applied) in place of
// partials for the combine. T_PARTIALS: its partials are T rows, each O / l (the combine's
// 2pass_2t reads them), staged and copied out as ONE's output is.
template <typename T, int D, int V, bool TWO_DEEP, bool PAIR, bool MAPS_PREFETCHED, bool ONE,
          bool T_PARTIALS>
__device__ __forceinline__ void wgmma_block(const T* __restrict__ q, const T* __restrict__ k,
                                            const T* __restrict__ v, const void* __restrict__ mask,
                                            const T* __restrict__ sinks, T* __restrict__ out,
                                            float* __restrict__ partials,
                                            float* __restrict__ maxs, float* __restrict__ sums,
                                            const WParams& wp, char* smem_raw) {
  static_assert(!(ONE && PAIR), "a pair's blocks are two splits");
  static_assert(!T_PARTIALS || (TWO_DEEP && !PAIR && !ONE), "T partials: the two-deep split pass");
  // ONE's output, or partials in T (each row O / l), leave as staged rows (stage_o).
  constexpr bool STAGED = ONE || T_PARTIALS;
  const Params& p = wp.p;
  using C = WCfg<D, V, TWO_DEEP>;
  static_assert(supported<T, D, V>(), "wgmma tiles need 16-bit T, D % 64 == 0, V % 128 == 0");
  constexpr bool BF16 = std::is_same<T, __nv_bfloat16>::value;
  constexpr int NV = C::NV;
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31;
  const int quad = lane & 3;
  const int wrow = ((tid & 127) >> 5) * 16 + (lane >> 2);  // this thread's rows: wrow, wrow + 8

  AOTC_STAMPS_DECLARE;  // profiling builds: slot 0 warpgroup 0's, slot 1 warpgroup 1's
  AOTC_STAMP(0);        // start
  const BlockWork w = PAIR ? pair_block_work(p) : block_work(p);
  const int split = w.split, kvh = w.kvh, b = w.b;
  const int R = p.q_heads / p.kv_heads * p.q_len;  // query rows of the KV head
  const int row0 = w.rg * kRows;
  const int key_begin = w.key_begin, key_end = w.key_end;
  const int ntiles = cdiv(key_end - key_begin, kKeys);
  const int S = p.num_splits;

  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t sQ = (raw + 1023) & ~1023u;
  char* const gQ = smem_raw + (sQ - raw);
  const uint32_t slots = sQ + C::Q_BYTES;
  const uint32_t sP = slots + C::SLOTS_BYTES;
  char* const gP = gQ + (sP - sQ);
  float* const sAlpha = reinterpret_cast<float*>(gP + kAtom);

  const uint32_t sBars = smem_u32(sAlpha + kRows);  // [slot][part] mbarriers

  const T* kbase = k + (long long)b * p.k_strides[0] + (long long)kvh * p.k_strides[1];
  const T* vbase = v + (long long)b * p.v_strides[0] + (long long)kvh * p.v_strides[1];
  const bool kvec = vec_ok(kbase, p.k_strides), vvec = vec_ok(vbase, p.v_strides);
  // TMA where a KV head has a full block of rows (MLA's 128 heads): those blocks are bound by
  // moving tiles into shared memory, and TMA frees the copying warpgroups' issue slots. Blocks
  // of few rows (576/512 with GQA 8) are bound by HBM, where cp.async's row-major copies read
  // faster on an H200 (539.0-539.7 against 561.6-562.1 us; an H100 had 768.5 against 754.7).
  const bool tma = (wp.maps_ok & kAllMaps) == kAllMaps && R >= kRows;
  const TensorMap* const kmap = tma ? &wp.maps[0] : nullptr;
  const TensorMap* const vmap = tma ? &wp.maps[1] : nullptr;
  // V is K's prefix (MLA: v = k[..., :V]) when this block's V rows are K's rows: slots then
  // hold K tiles only, tile t in slot t % 2. Else (WCfg's slots) K(t) in slot t % 2 and V(t) in
  // 2 + t % 2 where the layout is DEEP, else K(t) in slot 0 and V(t) in slot 1.
  const bool v_in_k = V <= D && vbase == kbase && p.v_strides[2] == p.k_strides[2] &&
                      p.v_strides[3] == p.k_strides[3];
  // Two tiles of each kind in flight: tile t + 2 refills tile t's slots. Not for splits of
  // kDeepMinTiles - 1 tiles or fewer: loading tile 1 beside tile 0 delays tile 0, and with it
  // the whole split (H100, bench/NOTES.md round 21: 192/128, 64 rows, 2-tile splits 14.7 us
  // two deep against 13.6 one deep).
  const bool two_deep = v_in_k || (C::DEEP && ntiles >= kDeepMinTiles);
  auto kslot = [&](int t) { return two_deep ? (t & 1) : 0; };
  auto vslot = [&](int t) {
    return v_in_k ? (t & 1) : !C::DEEP ? 1 : two_deep ? 2 + (t & 1) : 2;
  };
  // Parity of the fill of a slot that holds tile t: two-deep slots fill every other tile.
  auto parity = [&](int t) { return (two_deep ? t >> 1 : t) & 1; };
  // Separate V, two deep: tile t + 2 refills tile t's K and V slots (else tile t + 1 does).
  const bool own_v_two_deep = !v_in_k && two_deep;
  auto slot_at = [&](int slot) { return slots + C::slot_offset(slot); };
  auto bar = [&](int slot, int part) { return sBars + (slot * kParts + part) * 8; };
  // A tile lands in parts, each staged by one warpgroup and waited for on its own mbarrier.
  // V tiles (and K tiles that hold V): the two halves of V, each staged by the warpgroup that
  // reads it in P V (and refills it once that is done), then (K) the columns past V, by
  // warpgroup 1. Other K tiles: two halves of the row, by warpgroups 1 and 2.
  // Ablation: the part's arrivals without its copies.
  auto skip_stage = [&](uint32_t at) {
    if (!tma || (tid & 127) == 0) mbar_arrive(at);
  };
  using InK = KParts<C::DA, C::VA, true>;    // V is K's prefix
  using OwnV = KParts<C::DA, C::VA, false>;  // V has its own tiles
  constexpr int VH = C::VA / 2;
  // Part `part` of K(t) into `slot`, when this warpgroup stages it.
  auto stage_k = [&](int t, int slot, int part) {
    if (wg != (part == 1 ? 2 : 1)) return;
    const uint32_t dst = slot_at(slot);
    auto cols = [&](auto atoms, int a0) {
      stage_cols<T, decltype(atoms)::value>(dst, gQ + (dst - sQ), kbase, p.k_strides, kvec, a0,
                                            key_begin + t * kKeys, key_end, tid & 127,
                                            bar(slot, part), kmap, kvh, b);
    };
    if ((AOTC_SKIP(2) && t > 1) || AOTC_SKIP(4)) skip_stage(bar(slot, part));
    else if (part == 0 && v_in_k) cols(Atoms<InK::CUT0>{}, 0);
    else if (part == 0) cols(Atoms<OwnV::CUT0>{}, 0);
    else if (part == 1 && v_in_k) cols(Atoms<InK::CUT1 - InK::CUT0>{}, InK::CUT0);
    else if (part == 1) cols(Atoms<OwnV::CUT1 - OwnV::CUT0>{}, OwnV::CUT0);
    else if (v_in_k) cols(Atoms<C::DA - InK::CUT1>{}, InK::CUT1);  // OwnV has no third part
  };
  auto stage_k_all = [&](int t, int slot) {
    for (int part = 0; part < kParts; ++part) stage_k(t, slot, part);
  };
  // This warpgroup's half of V(t) into its slot (separate V only).
  auto stage_v = [&](int t) {
    const int slot = vslot(t);
    const uint32_t dst = slot_at(slot);
    if ((AOTC_SKIP(2) && t >= (own_v_two_deep ? 2 : 1)) || AOTC_SKIP(4))
      skip_stage(bar(slot, wg - 1));
    else
      stage_cols<T, VH>(dst, gQ + (dst - sQ), vbase, p.v_strides, vvec, (wg - 1) * VH,
                        key_begin + t * kKeys, key_end, tid & 127, bar(slot, wg - 1), vmap, kvh,
                        b);
  };

  // Prologue: Q (all threads, waited for here) and the first tiles (warpgroups 1 and 2,
  // arriving on their parts' mbarriers): K(0) and K(1); K(0), V(0), K(1) and V(1); or K(0) and
  // V(0).
  // A part lands on its mbarrier by the arrivals of its warpgroup's 128 copying threads, or by
  // one arrival that expects the bytes of its TMA boxes.
  // Q by TMA where K's tiles come so and its boxes hold whole row groups (Lq divides 64): one
  // thread (0) issues the boxes, and no thread computes a row address or issues a copy. MLA at
  // B=1-2, N=4096-8192 ran 0.5-0.9 us faster than with cp.async; multicasting Q to both blocks
  // of a pair (same rows), which needs a cluster barrier first, ran 0.7-2.2 us slower than TMA
  // alone on short MLA rows (H200, bench/NOTES.md round 25). Rows past R get other heads' queries (or zeros past
  // the array): finite, and never stored.
  const bool q_tma = tma && (wp.maps_ok & kQMap) != 0 && kRows % p.q_len == 0;
  const uint32_t qbar = sBars + C::SLOTS * kParts * 8;
  if (tid <= C::SLOTS * kParts) {
    mbar_init(sBars + tid * 8, tma || tid == C::SLOTS * kParts ? 1 : 128);
    if (tma) asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // for TMA
  }
  if (!MAPS_PREFETCHED && tma && tid == 0) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(kmap)) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(vmap)) : "memory");
  }
  __syncthreads();  // the mbarriers are initialised before any arrival
  // Else Q's copies form the one cp.async group. TMA boxes go out first (one thread issues
  // them, so the tiles' reads start at once); cp.async tiles after Q's group is committed, so
  // that their copies join no group.
  auto stage_q_group = [&]() {
    if (q_tma) {
      if (tid == 0 && AOTC_SKIP(5)) mbar_arrive(qbar);
      else if (tid == 0) load_q_boxes<C::DA>(sQ, wp, qbar, kvh, row0, b);
      return;
    }
    if (!AOTC_SKIP(5)) stage_q<T, D>(sQ, gQ, q, p, b, kvh, row0, R);
    cp_async_commit();
  };
  if (!tma) stage_q_group();
  if (wg > 0) {
    stage_k_all(0, 0);
    if (!v_in_k) stage_v(0);
    else if (ntiles > 1) stage_k_all(1, 1);
    if (own_v_two_deep) {  // splits of kDeepMinTiles or more
      stage_k_all(1, 1);
      stage_v(1);
    }
  }
  if (tma) stage_q_group();
  cp_async_wait<0>();  // Q's group; the tiles' copies are in no group
  if (q_tma) mbar_wait(qbar, 0);
  fence_async_shared();
  __syncthreads();
  AOTC_STAMP(1);  // prologue done: Q landed

  if (wg == 0) {
    // ---- S and the softmax; P and the rescale factors out through shared memory.
    const RowFacts rows = row_facts(p, b, kvh, row0 + wrow, R);
    const float scale2 = p.scale * kLog2e;
    const uint64_t qd = sw128_desc(sQ, 16, 1024);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    for (int t = 0; t < ntiles; ++t) {
      const int k0 = key_begin + t * kKeys;
      float s[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] = 0.f;
      const int ks = kslot(t), kpar = parity(t);
      const uint64_t kd = sw128_desc(slot_at(ks), 16, 1024);
      // Part by part as they land (the layout is fixed per block: one branch, compile-time
      // parts inside, so the MMAs stay in one straight line).
      auto qk = [&](auto parts) {
        constexpr int CUT0 = decltype(parts)::CUT0, CUT1 = decltype(parts)::CUT1;
#pragma unroll
        for (int a = 0; a < C::DA; ++a) {
          if (a == 0 || a == CUT0 || a == CUT1) {
            mbar_wait(bar(ks, a == 0 ? 0 : a == CUT0 ? 1 : 2), kpar);
            if (t == 0 && a == 0) AOTC_STAMP(2);  // K(0)'s first part landed
            // cp.async's generic-proxy writes need the fence before wgmma reads them; TMA
            // writes through the async proxy, ordered by the mbarrier alone (MLA B=8 N=8192
            // 0.2-0.4 us faster without it, bench/NOTES.md round 32).
            if (!tma) fence_async_shared();
            wgmma_fence();
          }
          if (!AOTC_SKIP(0)) {
#pragma unroll
            for (int kk = 4 * a; kk < 4 * a + 4; ++kk) {
              const uint64_t off = ((kk >> 2) * kAtom + (kk & 3) * 32) >> 4;
              wgmma_m64n64k16<BF16, 0>(s, qd + off, kd + off, 1);
            }
          }
          if (a + 1 == C::DA || a + 1 == CUT0 || a + 1 == CUT1) wgmma_commit();
        }
      };
      if (v_in_k) qk(InK{});
      else qk(OwnV{});
      wgmma_wait<0>();
      fence_regs(s);
      if (t == 0) AOTC_STAMP(3);  // S(0) done
      if (t == 1) AOTC_STAMP(5);  // S(1) done
      if (t == ntiles - 1) AOTC_STAMP(6);  // S(last) done
      scores_log2<T>(s, p, mask, [&] { return rows; }, k0, key_end, quad, scale2);
      float alpha[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          mx[j] = fmaxf(fmaxf(s[8 * j + 2 * h], s[8 * j + 2 * h + 1]),
                        fmaxf(s[8 * j + 4 + 2 * h], s[8 * j + 4 + 2 * h + 1]));
        float rmax = fmaxf(fmaxf(mx[0], mx[1]), fmaxf(mx[2], mx[3]));
        rmax = fmaxf(rmax, __shfl_xor_sync(0xffffffffu, rmax, 1));
        rmax = fmaxf(rmax, __shfl_xor_sync(0xffffffffu, rmax, 2));
        const float m_new = fmaxf(m[h], rmax);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        alpha[h] = fast_exp2(m[h] - m_use);
        m[h] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < 16; ++n) {
          const int e = 4 * (n >> 1) + 2 * h + (n & 1);
          s[e] = fast_exp2(s[e] - m_use);
          sum += s[e];
        }
        l[h] = l[h] * alpha[h] + sum;  // this thread's keys; the quad is summed at the end
      }
      if (t > 0) bar_sync<kBarPFree, kThreads>();  // P V of tile t - 1 is done with P
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wrow + 8 * h;
        // P row r, keys 8n + 2 quad + {0, 1}: chunk n of the swizzled 128-byte row.
#pragma unroll
        for (int n = 0; n < 8; ++n)
          *reinterpret_cast<uint32_t*>(gP + r * 128 + ((n ^ (r & 7)) << 4) + quad * 4) =
              pack2<T>(s[4 * n + 2 * h], s[4 * n + 2 * h + 1]);
      }
      if (quad == 0) {
        sAlpha[wrow] = alpha[0];
        sAlpha[wrow + 8] = alpha[1];
      }
      fence_async_shared();
      bar_arrive<kBarPReady, kThreads>();
      if (t == 0) AOTC_STAMP(4);  // P(0) ready
    }
    AOTC_STAMP(7);  // tile loop done
    // ---- row statistics of the split (log2 domain), for the combine
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
      const int rr = row0 + wrow + 8 * h;
      if (!PAIR && !ONE && rr < R && quad == 0 && !AOTC_SKIP(3)) {
        const long long row = out_row(p, b, kvh, rr);
        maxs[row * S + split] = m[h];
        sums[row * S + split] = l[h];
      }
    }
    if constexpr (PAIR) {  // the statistics, to merge (merge_pair)
      bar_sync<kBarDone, kThreads>();
      float* const stats = reinterpret_cast<float*>(gQ + PairCfg<D, V, TWO_DEEP>::STATS);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (quad == 0) {
          stats[wrow + 8 * h] = m[h];
          stats[kRows + wrow + 8 * h] = l[h];
        }
      }
    }
    if constexpr (STAGED) {  // each row's output scale (the combine's for one split; T
      // partials: 1 / l), for WG 1, 2. Q's shared memory is dead once the last S is done.
      float* const out_scale = reinterpret_cast<float*>(gQ);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = row0 + wrow + 8 * h;
        if (quad == 0)
          out_scale[wrow + 8 * h] = ONE ? one_split_scale(p, sinks, kvh, rr, R, m[h], l[h])
                                        : partial_scale(l[h]);
      }
      bar_arrive<kBarDone, kThreads>();
    }
  } else {
    // ---- O += P V for half of V's columns; both warpgroups stage the tiles.
    const int half = wg - 1;
    float o[NV / 2];
#pragma unroll
    for (int i = 0; i < NV / 2; ++i) o[i] = 0.f;
    for (int t = 0; t < ntiles; ++t) {
      const bool more = t + 1 < ntiles;
      bar_sync<kBarPReady, kThreads>();  // P(t), alpha(t); S(t) is done with K(t)
      // The tile of separate V that refills tile t's slots, if any.
      const int tn = own_v_two_deep ? t + 2 : t + 1;
      const bool next = tn < ntiles;
      if (!v_in_k) {
        mbar_wait(bar(vslot(t), half), parity(t));  // this half of V(t) landed
        if (!tma) fence_async_shared();
      }
      // Refill what only S reads: K(tn) into K(t)'s slot, or (MLA) the columns of K(t + 2)
      // past V.
      if (!v_in_k && next) stage_k_all(tn, kslot(t));
      if (v_in_k && t + 2 < ntiles) stage_k(t + 2, kslot(t), 2);
      rescale<NV>(o, sAlpha[wrow], sAlpha[wrow + 8]);
      wgmma_fence();
      const uint64_t pd = sw128_desc(sP, 16, 1024);
      const uint64_t vd =
          sw128_desc(slot_at(vslot(t)) + half * (NV / 64) * kAtom, kAtom, 1024);
      if (!AOTC_SKIP(1)) {
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; ++kk)
          wgmma_pv<BF16, NV>(o, pd + ((kk * 32) >> 4), vd + ((kk * 16 * 128) >> 4));
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(o);
      if (t == 0) AOTC_STAMP(2);  // P V(0) done
      if (t == 1) AOTC_STAMP(3);  // P V(1) done
      if (t == ntiles / 2) AOTC_STAMP(4);  // P V(middle tile) done
      if (t == ntiles - 1) AOTC_STAMP(5);  // P V(last) done
      if (more) bar_arrive<kBarPFree, kThreads>();
      // This half of tile t's V atoms is free: V(tn), or (MLA) K(t + 2)'s V columns.
      if (!v_in_k && next) stage_v(tn);
      if (v_in_k && t + 2 < ntiles) stage_k(t + 2, kslot(t), half);
    }
    // ---- unnormalised partial O of the split (pairs: into shared memory, to merge; ONE: the
    // output, scaled as store_merged does; T_PARTIALS: O / l in T)
    if constexpr (STAGED) {
      // Warpgroup 0's row scales are out, and every MMA is done with the slots, which stage O.
      bar_sync<kBarDone, kThreads>();
      static_assert(kStageBytes<T, V> <= C::SLOTS_BYTES, "O's staging must fit the slots");
      const float* const out_scale = reinterpret_cast<const float*>(gQ);
      stage_o<T, T, V>(gQ + (slots - sQ), o, wrow, quad, half * NV, out_scale[wrow],
                       out_scale[wrow + 8]);
      fence_async_shared();  // generic-proxy writes, read by the bulk copies
      bar_sync<kBarStaged, 2 * 128>();
      const int r = tid - 128, rr = row0 + r;
      if (r < kRows && rr < R && !AOTC_SKIP(3)) {
        const long long row = out_row(p, b, kvh, rr);
        if constexpr (ONE)
          copy_staged_row<T, V>(out + row * V, slots, r);
        else
          copy_staged_row<T, V>(reinterpret_cast<T*>(partials) + (row * S + split) * V, slots, r);
      }
    } else if constexpr (PAIR) {
      bar_sync<kBarDone, kThreads>();
      static_assert(PairCfg<D, V, TWO_DEEP>::ROW * 4 == kStagePitch<float, V>,
                    "the pair's O rows are staged rows");
      stage_o<float, T, V>(gQ, o, wrow, quad, half * NV, 1.f, 1.f);
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = row0 + wrow + 8 * h;
        if (rr >= R || AOTC_SKIP(3)) continue;
        const long long row = out_row(p, b, kvh, rr);
        float* dst = partials + (row * S + split) * V + half * NV + 2 * quad;
#pragma unroll
        for (int n = 0; n < NV / 8; ++n)
          *reinterpret_cast<float2*>(dst + 8 * n) =
              make_float2(o[4 * n + 2 * h], o[4 * n + 2 * h + 1]);
      }
    }
  }
  AOTC_STAMP(8);  // this warpgroup's part out: partials (or, pairs, O rows) and statistics
  if constexpr (PAIR)
    merge_pair<D, V, TWO_DEEP>(p, sQ, gQ, partials, maxs, sums, b, kvh, row0, R, split);
#ifdef AOTC_SDPA_STAMPS
  __syncthreads();
  AOTC_STAMP(9);  // end
  if (!ONE && (tid == 0 || tid == 128)) {
    const int rank = PAIR ? (int)cluster_rank() : 0;
    const int r = row0 + rank * (kRows / 2), SS = PAIR ? S / 2 : S;
    if (r < R)
      write_stamps(partials + (out_row(p, b, kvh, r) * SS + (PAIR ? split / 2 : split)) * V,
                   tid / 128, aotc_stamps);
  }
#endif
}

// Thread 0 fetches the encoded tensor maps (K's, V's, Q's) into the descriptor cache at the
// block's start: the first TMA boxes wait on them. MLA rows ran 0.1-1.0 us faster than with
// K's and V's prefetched after the set-up and Q's not at all (bench/NOTES.md round 30). Not in
// the dual entry points: at their 80 registers a thread it spilled.
__device__ __forceinline__ void prefetch_maps(const WParams& wp) {
  if (threadIdx.x != 0) return;
#pragma unroll
  for (int m = 0; m < 3; ++m)
    if (wp.maps_ok & (1u << m))
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&wp.maps[m]))
                   : "memory");
}

template <typename T, int D, int V, bool TWO_DEEP, int BLOCKS, bool PAIR, bool ONE = false,
          bool T_PARTIALS = false>
__device__ __forceinline__ void wgmma_entry(const T* q, const T* k, const T* v, const void* mask,
                                            const T* sinks, T* out, float* partials, float* maxs,
                                            float* sums, const WParams& p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (supported<T, D, V>()) {
    static_assert(BLOCKS == 1 || WCfg<D, V, TWO_DEEP>::TWO_BLOCKS_FIT, "two blocks do not fit");
    extern __shared__ __align__(1024) char aotc_wg_smem[];
    uint32_t dyn;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < (uint32_t)WCfg<D, V, TWO_DEEP>::SMEM || blockDim.x != kThreads ||
        (PAIR && p.p.num_splits % 2 != 0) ||
        (ONE && (p.p.num_splits != 1 || !bulk_aligned(out))) ||
        (T_PARTIALS && !bulk_aligned(partials)))
      __trap();  // (bulk copies need 16-byte aligned outputs and partials, as allocators give)
    if constexpr (T_PARTIALS) allow_next_grid();  // the seesaw's stand-in: as the seesaw does
    if constexpr (BLOCKS == 1) prefetch_maps(p);
    wgmma_block<T, D, V, TWO_DEEP, PAIR, BLOCKS == 1, ONE, T_PARTIALS>(
        q, k, v, mask, sinks, out, partials, maxs, sums, p, aotc_wg_smem);
    return;
  }
#endif
  __trap();  // no wgmma here: the plan only picks this kernel from an sm_90a image
}

}  // namespace wg
}  // namespace aotc_sdpa
#undef AOTC_SKIP

// BLOCKS: blocks an SM must hold (launch bounds); 2 caps a thread at 80 registers. PAIR: the
// blocks come in clusters of two that merge their splits (CLUSTER: the attribute, sm_90 only).
#define AOTC_SDPA_VECTOR_WGMMA_ENTRY(NAME, T, D, V, TWO_DEEP, BLOCKS, PAIR, CLUSTER)          \
  extern "C" __global__ void CLUSTER __launch_bounds__(384, BLOCKS) NAME(                     \
      const T* q, const T* k, const T* v, const void* mask, const T* sinks, float* partials, \
      float* maxs, float* sums, const __grid_constant__ aotc_sdpa::wg::WParams p) {          \
    aotc_sdpa::wg::wgmma_entry<T, D, V, TWO_DEEP, BLOCKS, PAIR>(q, k, v, mask, nullptr,      \
                                                                nullptr, partials, maxs, sums, \
                                                                p);                          \
  }
#define AOTC_SDPA_VECTOR_WGMMA(TN, T, D, V) \
  AOTC_SDPA_VECTOR_WGMMA_ENTRY(sdpa_vector_wgmma_##TN##_##D##_##V, T, D, V, true, 1, false, )
// The same kernel built one deep, for pairs whose DEEP layout fits: the plan takes it where
// every split holds fewer than kDeepMinTiles tiles. Such short calls ran 0.3-0.7 us slower in the
// two-deep kernel on the very same one-deep flow (its code; bench/NOTES.md round 21).
#define AOTC_SDPA_VECTOR_WGMMA_SHORT(TN, T, D, V) \
  AOTC_SDPA_VECTOR_WGMMA_ENTRY(sdpa_vector_wgmma_short_##TN##_##D##_##V, T, D, V, false, 1, false, )
// Two blocks an SM (WCfg::TWO_BLOCKS_FIT), for KV heads of 2+ row groups: there the kernel is
// bound by each block's serial S, softmax, P V chain, and a second block's MMAs fill its gaps
// (128/128 GQA 16 at 8 tokens, B=8 N=32768: 219-225 us against 241-243 one block an SM, H100;
// 221-222 against 239-242, H200). One row group loses 1-15% on it (80 registers, twice the
// partial rows to merge), and so do splits of under 16 tiles (bench/NOTES.md round 22).
#define AOTC_SDPA_VECTOR_WGMMA_DUAL(TN, T, D, V) \
  AOTC_SDPA_VECTOR_WGMMA_ENTRY(sdpa_vector_wgmma_dual_##TN##_##D##_##V, T, D, V, true, 2, false, )
// Clusters of two blocks (key splits 2j and 2j + 1) that merge their splits through distributed
// shared memory before writing one partial: half the partials' stores and the combine's reads
// (MLA: 16.8 MB of each a call; bench/NOTES.md round 23). A cluster attribute is sm_90's only.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define AOTC_WG_PAIR_CLUSTER
#else
#define AOTC_WG_PAIR_CLUSTER __cluster_dims__(2, 1, 1)
#endif
#define AOTC_SDPA_VECTOR_WGMMA_PAIR(TN, T, D, V)                                               \
  AOTC_SDPA_VECTOR_WGMMA_ENTRY(sdpa_vector_wgmma_pair_##TN##_##D##_##V, T, D, V, true, 1, true, \
                               AOTC_WG_PAIR_CLUSTER)
// One split a row group (large batches of wide heads): the block writes the output itself, with
// the sinks, as the combine would from its one partial; no partials and no combine launch.
#define AOTC_SDPA_VECTOR_WGMMA_ONE(TN, T, D, V)                                                   \
  extern "C" __global__ void __launch_bounds__(384, 1) sdpa_vector_wgmma_one_##TN##_##D##_##V(  \
      const T* q, const T* k, const T* v, const void* mask, const T* sinks, T* out,              \
      const __grid_constant__ aotc_sdpa::wg::WParams p) {                                        \
    aotc_sdpa::wg::wgmma_entry<T, D, V, true, 1, false, true>(q, k, v, mask, sinks, out, nullptr, \
                                                              nullptr, nullptr, p);              \
  }

// The two-deep split pass with its partials in T, each row O / l (staged as the one pass stages
// its output), for the combine of such partials (2pass_2t): the launch whose view alternative
// is the seesaw's split pass, which stores them so. Half the partial bytes to store and merge:
// MLA's seesaw split plans ran 5-8% faster at B=1-4 and B=8 of 8k keys, up to 2% at B=8 of
// 16k-32k (bench/NOTES.md round 42). The fp32 entry point stays without this epilogue: with a
// run-time switch between the two, ptxas spilled 10 bytes and 576/512 GQA 8 (HBM-bound, fp32
// partials) ran 1% slower.
#define AOTC_SDPA_VECTOR_WGMMA_T_PARTIALS(TN, T, D, V)                                           \
  extern "C" __global__ void __launch_bounds__(384, 1)                                           \
      sdpa_vector_wgmma_t_partials_##TN##_##D##_##V(                                             \
          const T* q, const T* k, const T* v, const void* mask, const T* sinks, float* partials, \
          float* maxs, float* sums, const __grid_constant__ aotc_sdpa::wg::WParams p) {          \
    aotc_sdpa::wg::wgmma_entry<T, D, V, true, 1, false, false, true>(                            \
        q, k, v, mask, nullptr, nullptr, partials, maxs, sums, p);                               \
  }

#include "sdpa_vector_seesaw.cuh"
