// aotc: decode attention (1..8 query tokens) for CUDA, templated on (T, D, V).
//
// One block handles one (batch, KV head, key split, query-row group). Its query rows are the
// G = Hq / Hkv heads sharing the KV head times the Lq query tokens (row r = g * Lq + i), so K and
// V are read once per KV head for the whole group (or once per row group, when the plan splits
// the rows over blocks: siblings, at adjacent block indices, mostly read L2). Key tiles land in a
// ring of shared-memory slots by 16-byte cp.async, in unpadded rows (XOR-swizzled when they are
// whole 128-byte lines); S = Q K^T and O += P V run on tensor cores (mma.sync m16n8k16, fp32
// accumulation) for fp16/bf16 and on CUDA cores (same fragment layout) for fp32. Softmax is
// online, in the log2 domain, in fp32. Blocks of 16 or 32 rows (fp16/bf16, 4 warps) split each
// tile's keys over the warps, which keep S, P and their softmax state in registers
// (sdpa_block_warp_keys); other blocks share S and P through shared memory (sdpa_block).
//
// Entry points (kernel contract, see docs/ARCHITECTURE.md):
//   sdpa_vector_<TN>_<D>_<V>(q, k, v, mask, sinks, out, Params)
//   sdpa_vector_2pass_1_<TN>_<D>_<V>(q, k, v, mask, sinks, partials, maxs, sums, Params)
//   sdpa_vector_2pass_fused_<TN>_<D>_<V>(q, k, v, mask, sinks, scratch, out, Params): the split
//                                        pass and the combine in one launch: the last block per
//                                        row group merges its splits, or (Params::combiners_from
//                                        > 0) the grid's last blocks each wait for one query
//                                        row's splits and merge them. scratch: partials, maxs,
//                                        sums, then 64-bit flag slots (FusedScratch)
//   sdpa_vector_2pass_2_<TN>_<V>(partials, maxs, sums, sinks, out, CombineParams)
// The first three serve one m-tile (Params::m_tiles == 1: 16 query rows a block); the same
// three named sdpa_vector_rows_... serve 2 or 4.
// Absent mask / sinks are passed as any valid pointer (the plan passes q) and flagged in Params.
// The plan (aotc/families/sdpa_vector/cuda.py) mirrors Cfg and shared_bytes() below exactly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <float.h>
#include <stdint.h>

#include <type_traits>

namespace aotc_sdpa {

// Profiling builds (-DAOTC_SDPA_STAMPS, bench/stamps.py) record %globaltimer at points of a split
// block (AOTC_STAMP(i) into the block's aotc_stamps) and write them over the first partial row
// the block owns once it is done: wrong results by design, never shipped. Elsewhere the macros
// expand to nothing.
constexpr int kStamps = 12;  // stamps a slot: then the SM's id
#ifdef AOTC_SDPA_STAMPS
#define AOTC_STAMPS_DECLARE unsigned long long aotc_stamps[aotc_sdpa::kStamps] = {}
#define AOTC_STAMP(i) \
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(aotc_stamps[i])::"memory")
__device__ __forceinline__ void write_stamps(float* row, int slot,
                                             const unsigned long long (&stamps)[kStamps]) {
  unsigned smid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  unsigned long long* dst = reinterpret_cast<unsigned long long*>(row) + slot * (kStamps + 1);
  for (int i = 0; i < kStamps; ++i) dst[i] = stamps[i];
  dst[kStamps] = smid;
}
#else
#define AOTC_STAMPS_DECLARE
#define AOTC_STAMP(i) ((void)0)
#endif

struct Params {
  long long q_strides[4];     // filled by the launch primitive (elements)
  long long k_strides[4];
  long long v_strides[4];
  long long mask_strides[4];  // of the mask broadcast to (B, Hq, Lq, N); q's when no mask
  float scale;
  int batch;
  int q_heads;
  int kv_heads;
  int q_len;
  int kv_len;
  int mask_kind;       // 0 none, 1 causal, 2 bool, 3 additive (mask in T)
  int has_sinks;       // sinks: (Hq,) in T
  int num_splits;      // key splits (1 for the one-pass kernel)
  int keys_per_split;  // multiple of Cfg::TK
  int m_tiles;         // 16-row tiles per block: 1, 2 or 4 (<= Cfg::MT_MAX)
  int row_groups;      // blocks along the query rows of one KV head
  int stages;          // K+V tile stages in shared memory: 2..Cfg::MAX_STAGES (plan: fill smem)
  int combiners_from;  // fused split pass: blocks from here on are waiting combiners, one query
                       // row each (0: the last block of each row group merges)
  int reserved;
};

struct CombineParams {
  int rows;  // B * Hq * Lq
  int num_splits;
  int q_heads;
  int q_len;
  int has_sinks;
  int reserved;
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kMasked = -FLT_MAX;  // finfo.min semantics: a fully masked row is uniform

template <typename T>
struct Tr;
template <>
struct Tr<float> {
  static constexpr bool kMma = false;
  __device__ static float f(float x) { return x; }
  __device__ static float t(float x) { return x; }
};
template <>
struct Tr<__half> {
  static constexpr bool kMma = true;
  __device__ static float f(__half x) { return __half2float(x); }
  __device__ static __half t(float x) { return __float2half_rn(x); }
};
template <>
struct Tr<__nv_bfloat16> {
  static constexpr bool kMma = true;
  __device__ static float f(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 t(float x) { return __float2bfloat16_rn(x); }
};

__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }

// Element offset of (row, col) in a key tile with row pitch `pitch`: when swizzled, the
// 16-byte chunk (E elements) of col is XOR-ed with row & 7 (rows are whole 128-byte lines).
template <int E>
__device__ __forceinline__ int tile_off(int row, int col, int pitch, bool swizzled) {
  return row * pitch + (swizzled ? ((col / E) ^ (row & 7)) * E + col % E : col);
}

// Tile configuration; mirrored by kernel_config() in cuda.py.
template <typename T, int D, int V>
struct Cfg {
  static constexpr int TS = sizeof(T);
  static constexpr int NW = (D > 256 || V > 256) ? 8 : 4;  // warps per block
  static constexpr int NT = NW * 32;
  // Resident blocks per SM the plan counts (cuda.py blocks_per_sm_cap), given to ptxas as
  // __launch_bounds__' minimum: three 4-warp blocks of one m-tile (168 registers), two of 2 or
  // 4 m-tiles (ROWS: their accumulators spilled 8-32 bytes a thread at 168), one of 8 warps.
  static constexpr int min_blocks(bool rows) { return NW == 4 ? (rows ? 2 : 3) : 1; }
  // Keys per tile: up to 32 KB of K and V per stage (128/128 bf16: 64 keys, 2% faster than
  // 32 on an H200); three stages when they fit 72 KB (three blocks of 4 warps per SM, the
  // register limit, keep six tiles in flight), else two.
  static constexpr int TK = (D + V) * TS * 64 <= 32 * 1024 ? 64
                            : (D + V) * TS * 32 <= 32 * 1024 ? 32
                                                             : 16;
  static constexpr int PAD = 16 / TS;  // one 16-byte vector per row: conflict-free ldmatrix
  // K and V tile rows are unpadded, as in global memory: a padded row starts mid-line, and
  // cp.async then splits a warp's global lines into more L2 requests, reading some sectors
  // twice (ncu, H200: 1.5x the L2 sectors of the bytes, reads capped near 3.9 TB/s). Rows of
  // whole 128-byte lines get their 16-byte chunks XOR-swizzled by row (conflict-free
  // ldmatrix); other widths (D = 80: 160 bytes) take 2- to 4-way conflicts instead.
  static constexpr bool KSW = (D * TS) % 128 == 0;
  static constexpr bool VSW = (V * TS) % 128 == 0;
  static constexpr int DP = D;        // K tile row pitch (elements)
  static constexpr int VP = V;        // V tile row pitch
  static constexpr int QP = D + PAD;  // Q row pitch (staged once: padded)
  static constexpr int STAGE_BYTES = TK * (DP + VP) * TS;
  // Default stage count (three 4-warp blocks per SM); the plan passes Params::stages, up to
  // MAX_STAGES, to fill shared memory when one 8-warp block owns the SM.
  static constexpr int STAGES = 3 * STAGE_BYTES <= 72 * 1024 ? 3 : 2;
  static constexpr int MAX_STAGES = 6;
  // When V is K's prefix (same rows in memory), tiles hold K alone: more of them fit.
  static constexpr int MAX_RING = 8;
  static constexpr int SP = TK + 4;  // fp32 score row pitch
  static constexpr int PP = TK + PAD;
  static constexpr int NT1 = TK / 8;  // key n-tiles in S
  static constexpr int KS = NW > NT1 ? NW / NT1 : 1;  // D split across warps in S
  static constexpr int NPW1 = NT1 > NW ? NT1 / NW : 1;
  static constexpr int KSTEPS = D / 16;
  static constexpr int KCHUNK = cdiv(KSTEPS, KS);
  static constexpr int NT3 = V / 8;  // value n-tiles in O
  static constexpr int NPW3 = cdiv(NT3, NW);
  static constexpr int MT_MAX = 4;
  static_assert(D % 16 == 0 && V % 16 == 0, "head dims must be multiples of 16");
};

template <typename T, int D, int V>
__host__ __device__ constexpr int shared_bytes(int mt, int stages) {
  using C = Cfg<T, D, V>;
  return C::TS * (stages * C::TK * (C::DP + C::VP) + 16 * mt * C::QP + 16 * mt * C::PP) +
         4 * (C::KS * 16 * mt * C::SP + 3 * 16 * mt);
}

// ---------------------------------------------------------------- PTX helpers
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared (`dst` a shared-window address); bytes past src_bytes are zeroed.
__device__ __forceinline__ void cp_async16_to(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  cp_async16_to(smem_u32(dst), src, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// Programmatic dependent launch (sm_90+). A launch made with programmatic stream
// serialization may start while the launch before it still runs; it must wait for that grid
// (complete, its writes visible) before reading what it wrote. The earlier grid lets the later
// one start once every block of it has allowed so (or exited). Both are no-ops in a plain
// launch.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
// wait_group takes an immediate: dispatch a run-time count (0..6).
__device__ __forceinline__ void cp_async_wait_dyn(int n) {
  switch (n) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    default: cp_async_wait<6>(); break;
  }
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p)));
}
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// Two packed T (pack2's layout) as floats.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t x) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    return make_float2(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
  else
    return __half22float2(*reinterpret_cast<__half2*>(&x));
}

// 2^x on the SFU (inputs here are <= 0 or -inf: no range handling needed).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Instruction fetch: a batch-1 split block runs a few tiles, so most of its code runs once, cold
// (ncu, H100: up to 55% of warps' cycles stalled on instruction fetch). Paths that common inputs
// never take (strided or misaligned K, V, Q) live out of line, where they are never fetched.
// They take values, not the Params: a reference into the kernel's parameters would make the
// compiler copy them to the stack for every block. And they are static: a library is relocatable
// device code (nvlink joins its units), where ptxas calls externally visible functions by the
// ABI; the 128/128 kernels then sat at the register cap with 40-64 bytes of stack spills.
template <typename T, int DIM, int NT, int ROWS, bool SW>
static __device__ __noinline__ void load_rows_strided(T* dst, int pitch, const T* base,
                                                      long long key_stride, long long dim_stride,
                                                      int k0, int key_end, int tid) {
  constexpr int E = 16 / sizeof(T);
  for (int e = tid; e < ROWS * DIM; e += NT) {
    int j = e / DIM, d = e - j * DIM;
    int key = k0 + j;
    T val = Tr<T>::t(0.f);
    if (key < key_end) val = base[(long long)key * key_stride + (long long)d * dim_stride];
    dst[tile_off<E>(j, d, pitch, SW)] = val;
  }
}

// A lane's fixed place in a (keys x DIM) tile's 16-byte copies: a warp covers RPW whole rows a
// pass (or one row in PER chunks a lane when a row has more than 32 chunks), NT / 32 warps RPP
// rows, so a pass is a pointer step and a cp.async per chunk.
template <typename T, int DIM, int NT, int ROWS>
struct RowCopy {
  static constexpr int E = 16 / sizeof(T);
  static constexpr int CH = DIM / E;                      // 16-byte chunks of a row
  static constexpr int RPW = CH <= 32 ? 32 / CH : 1;      // rows a warp covers in a pass
  static constexpr int PER = CH <= 32 ? 1 : cdiv(CH, 32);  // chunks a lane takes of a row
  static constexpr int RPP = NT / 32 * RPW;               // rows a pass covers
  static constexpr int PASSES = cdiv(ROWS, RPP);
  // RPP is a multiple of 4 (4 or 8 warps), so a pass moves a row's swizzle (row & 7) by 0 or 4.
  static_assert(RPP % 4 == 0, "passes must keep the swizzle's low bits");
  int lrow, lchunk;
  bool idle;  // lanes past a pass's whole rows (e.g. CH = 10)
  __device__ __forceinline__ explicit RowCopy(int lane)
      : lrow(CH <= 32 ? lane / CH : 0),
        lchunk(CH <= 32 ? lane % CH : lane),
        idle(CH <= 32 && 32 % CH != 0 && lane >= RPW * CH) {}
  __device__ __forceinline__ static bool chunk_in_row(int lchunk, int u) {
    return CH % 32 == 0 || CH < 32 || lchunk + 32 * u < CH;
  }
};

// Rows [0, ROWS) of a (keys x DIM) tile, any row stride, keys at or past key_end zero-filled:
// a split's last, partial tile, or K / V rows that are not contiguous. Out of line: most tiles
// take load_rows' unguarded path, and ptxas otherwise predicates both into every tile's code.
template <typename T, int DIM, int NT, int ROWS, bool SW>
static __device__ __noinline__ void load_rows_guarded(uint32_t dst, int pitch, const T* base,
                                                      long long stride, int k0, int key_end,
                                                      int tid) {
  using R = RowCopy<T, DIM, NT, ROWS>;
  const R rc(tid & 31);
  if (rc.idle) return;
  const int r0 = (tid >> 5) * R::RPW + rc.lrow;
  const T* src = base + (long long)(k0 + r0) * stride + rc.lchunk * R::E;
#pragma unroll
  for (int i = 0; i < R::PASSES; ++i, src += R::RPP * stride) {
    const int row = r0 + i * R::RPP;
    if (ROWS % R::RPP != 0 && row >= ROWS) break;
    const bool ok = k0 + row < key_end;
    const int sw = SW ? row & 7 : 0;
#pragma unroll
    for (int u = 0; u < R::PER; ++u)
      if (R::chunk_in_row(rc.lchunk, u))
        cp_async16_to(dst + (row * pitch + ((rc.lchunk + 32 * u) ^ sw) * R::E) * (int)sizeof(T),
                      ok ? src + 32 * u * R::E : base, ok ? 16 : 0);
  }
}

// Rows [0, ROWS) of a (keys x DIM) tile from global memory into shared memory (pitch DIM +
// PAD). Keys at or past key_end are zero-filled (so that P = 0 times them stays 0).
// In memory-bound blocks the copies' instructions are most of the issued ones: a whole tile of
// contiguous rows (a KV cache's common case) takes one cp.async per chunk with immediate
// offsets on both sides, and the rest go out of line.
template <typename T, int DIM, int NT, int ROWS, bool SW>
__device__ __forceinline__ void load_rows(T* dst, int pitch, const T* base, const long long* st,
                                          bool vec, int k0, int key_end, int tid) {
  using R = RowCopy<T, DIM, NT, ROWS>;
  if (!vec) {
    load_rows_strided<T, DIM, NT, ROWS, SW>(dst, pitch, base, st[2], st[3], k0, key_end, tid);
    return;
  }
  if (k0 + ROWS > key_end || st[2] != DIM) {
    load_rows_guarded<T, DIM, NT, ROWS, SW>(smem_u32(dst), pitch, base, st[2], k0, key_end,
                                            tid);
    return;
  }
  const R rc(tid & 31);
  if (rc.idle) return;
  const int r0 = (tid >> 5) * R::RPW + rc.lrow;
  const T* src = base + (long long)(k0 + r0) * DIM + rc.lchunk * R::E;
  const uint32_t srow = smem_u32(dst + r0 * pitch);
  const int sw0 = SW ? r0 & 7 : 0;
  uint32_t d0[R::PER], d4[R::PER];  // the lane's chunks at swizzle sw0 and sw0 ^ 4
#pragma unroll
  for (int u = 0; u < R::PER; ++u) {
    d0[u] = srow + (((rc.lchunk + 32 * u) ^ sw0) * R::E) * (int)sizeof(T);
    d4[u] = srow + (((rc.lchunk + 32 * u) ^ sw0 ^ 4) * R::E) * (int)sizeof(T);
  }
#pragma unroll
  for (int i = 0; i < R::PASSES; ++i) {
    if (ROWS % R::RPP != 0 && r0 + i * R::RPP >= ROWS) break;
    const bool flip = SW && (i * R::RPP) % 8 != 0;
#pragma unroll
    for (int u = 0; u < R::PER; ++u)
      if (R::chunk_in_row(rc.lchunk, u))
        cp_async16_to((flip ? d4[u] : d0[u]) + i * R::RPP * pitch * (int)sizeof(T),
                      src + i * R::RPP * DIM + 32 * u * R::E, 16);
  }
}

// This block's place in the grid the plan lays out (row group fastest, then key split, KV head,
// batch) and its keys [key_begin, key_end) (the register path's long splits take theirs
// interleaved instead: key_tiles).
struct BlockWork {
  int rg, split, kvh, b, key_begin, key_end;
};

// Block `bid` of a grid laid out as above with `splits` key splits; keys not set.
__device__ __forceinline__ BlockWork decode_block(const Params& p, int bid, int splits) {
  BlockWork w;
  w.rg = bid % p.row_groups;
  bid /= p.row_groups;
  w.split = bid % splits;
  bid /= splits;
  w.kvh = bid % p.kv_heads;
  w.b = bid / p.kv_heads;
  return w;
}

__device__ __forceinline__ void set_keys(BlockWork& w, const Params& p) {
  w.key_begin = w.split * p.keys_per_split;
  w.key_end = min(p.kv_len, w.key_begin + p.keys_per_split);
}

__device__ __forceinline__ BlockWork block_work(const Params& p) {
  BlockWork w = decode_block(p, blockIdx.x, p.num_splits);
  set_keys(w, p);
  return w;
}

// Splits of at least this many TK-key tiles take every num_splits-th tile (below).
constexpr int kInterleaveMinTiles = 8;

// A register-path block's key tiles: tile t holds keys [first + t * step, + TK), none at or
// past `end`. A split pass whose splits are long gives split s the tiles s, s + S, s + 2S, ...
// of its KV head (S splits) in place of a contiguous range: then the blocks of a KV head stream
// neighbouring keys at the same time, which DRAM serves faster (256/128 B=1: 3% a call,
// bench/NOTES.md round 36). A split is only ever merged by its index, so which keys it took does
// not matter to the merge.
struct KeyTiles {
  int first, step, count, end;
  __device__ __forceinline__ int key(int t) const { return first + t * step; }
};

template <int TK>
__device__ __forceinline__ KeyTiles key_tiles(const BlockWork& w, const Params& p, bool split) {
  const int tiles = cdiv(p.kv_len, TK);
  if (split && tiles >= kInterleaveMinTiles * p.num_splits)
    return {w.split * TK, p.num_splits * TK, cdiv(tiles - w.split, p.num_splits), p.kv_len};
  return {w.key_begin, TK, cdiv(w.key_end - w.key_begin, TK), w.key_end};
}

// Query row rr of KV head kvh's group (rr = g * Lq + i: head kvh * G + g, token i), element 0.
template <typename T>
__device__ __forceinline__ const T* q_row(const T* q, const Params& p, int b, int kvh, int rr) {
  const int G = p.q_heads / p.kv_heads, g = rr / p.q_len, i = rr - g * p.q_len;
  return q + (long long)b * p.q_strides[0] + (long long)(kvh * G + g) * p.q_strides[1] +
         (long long)i * p.q_strides[2];
}

// Output row (b, head, token) of query row rr of KV head kvh's group, in (B, Hq, Lq) order.
__device__ __forceinline__ long long out_row(const Params& p, int b, int kvh, int rr) {
  const int G = p.q_heads / p.kv_heads, g = rr / p.q_len, i = rr - g * p.q_len;
  return ((long long)b * p.q_heads + kvh * G + g) * p.q_len + i;
}

template <typename T>
__device__ __forceinline__ bool vec_ok(const T* base, const long long* st) {
  constexpr int E = 16 / sizeof(T);
  return st[3] == 1 && (reinterpret_cast<uintptr_t>(base) & 15) == 0 && (st[0] % E) == 0 &&
         (st[1] % E) == 0 && (st[2] % E) == 0;
}

// Offset of the mask row of (batch b, query head, token i); the kernels index keys from it.
__device__ __forceinline__ long long mask_row(const Params& p, int b, int head, int i) {
  return (long long)b * p.mask_strides[0] + (long long)head * p.mask_strides[1] +
         (long long)i * p.mask_strides[2];
}

// Score x (log2 domain) of `key` under the Params' mask; causal is aligned to the keys' end.
template <typename T>
__device__ __forceinline__ float apply_mask(float x, const Params& p, const void* mask,
                                            long long mrow, int key, int causal_last) {
  if (p.mask_kind == 1) {
    if (key > causal_last) x = kMasked;
  } else if (p.mask_kind == 2) {
    if (!reinterpret_cast<const bool*>(mask)[mrow + key * p.mask_strides[3]]) x = kMasked;
  } else if (p.mask_kind == 3) {
    x += Tr<T>::f(reinterpret_cast<const T*>(mask)[mrow + key * p.mask_strides[3]]) * kLog2e;
  }
  return x;
}

// A block's key tiles: where K and V rows come from and the ring of shared-memory slots they
// land in. When V is K's prefix (MLA: v = k[..., :V]) and this block's V rows are K's rows, a
// tile holds K alone and P V reads V from the K tile (no second load, more tiles in flight).
template <typename T, int D, int V>
struct TileRing {
  using C = Cfg<T, D, V>;
  const Params& p;
  T* slots;
  const T* kbase;
  const T* vbase;
  bool kvec, vvec, v_in_k, vsw;  // vsw: V's rows (K's when V is K's prefix) are swizzled
  int tile_elems, ring, vpitch, voff, key_end;

  __device__ __forceinline__ TileRing(T* smem, const T* k, const T* v, const Params& params,
                                      const BlockWork& w, int keys_end)
      : p(params), slots(smem) {
    kbase = k + (long long)w.b * p.k_strides[0] + (long long)w.kvh * p.k_strides[1];
    vbase = v + (long long)w.b * p.v_strides[0] + (long long)w.kvh * p.v_strides[1];
    kvec = vec_ok(kbase, p.k_strides);
    vvec = vec_ok(vbase, p.v_strides);
    v_in_k = V <= D && vbase == kbase && p.v_strides[2] == p.k_strides[2] &&
             p.v_strides[3] == p.k_strides[3];
    tile_elems = v_in_k ? C::TK * C::DP : C::TK * (C::DP + C::VP);
    ring = v_in_k ? min(C::MAX_RING, p.stages * (C::DP + C::VP) / C::DP) : p.stages;
    vpitch = v_in_k ? C::DP : C::VP;
    vsw = v_in_k ? C::KSW : C::VSW;
    voff = v_in_k ? 0 : C::TK * C::DP;
    key_end = keys_end;
  }
  // Keys [k0, k0 + TK) into `slot` by cp.async (the caller commits); keys past key_end are zero.
  __device__ __forceinline__ void load(int slot, int k0, int tid) const {
    T* dst = slots + slot * tile_elems;
    load_rows<T, D, C::NT, C::TK, C::KSW>(dst, C::DP, kbase, p.k_strides, kvec, k0, key_end,
                                          tid);
    if (!v_in_k)
      load_rows<T, V, C::NT, C::TK, C::VSW>(dst + C::TK * C::DP, C::VP, vbase, p.v_strides,
                                            vvec, k0, key_end, tid);
  }
  // Pass t of a block's pipeline over tiles `kt`, t = 2 - ring .. kt.count - 1
  // (the caller loaded tile 0 into slot 0 and committed it with Q's copies): the first ring - 2
  // passes only issue loads (one copy of the loader's code: a batch-1 block runs its code once,
  // cold), then each pass waits for tile t, frees the slot of tile t - 1 (every thread is past
  // it) and loads tile t + ring - 1. True when tile t is to be computed.
  __device__ __forceinline__ bool step(int t, const KeyTiles& kt, int& next, int tid) const {
    if (t >= 0) {
      cp_async_wait_dyn(ring - 2);
      __syncthreads();
    }
    if (t + ring - 1 < kt.count) load(next, kt.key(t + ring - 1), tid);
    cp_async_commit();
    next = next + 1 == ring ? 0 : next + 1;
    return t >= 0;
  }
  __device__ __forceinline__ const T* k_tile(int slot) const { return slots + slot * tile_elems; }
  __device__ __forceinline__ const T* v_tile(int slot) const { return k_tile(slot) + voff; }
};

// Q rows of one KV head's group: `q` at (b, first head of the group), rows rr = g * Lq + i.
template <typename T, int D, int NT>
static __device__ __noinline__ void stage_q_strided(T* sQ, int pitch, int rows, const T* q,
                                                    long long head_stride, long long token_stride,
                                                    long long dim_stride, int q_len, int row0,
                                                    int R, int tid) {
  for (int e = tid; e < rows * D; e += NT) {
    const int r = e / D, d = e - r * D;
    const int rr = row0 + r, g = rr / q_len, i = rr - g * q_len;
    sQ[r * pitch + d] = rr < R ? q[g * head_stride + i * token_stride + d * dim_stride]
                               : Tr<T>::t(0.f);
  }
}

// The block's query rows (row r = global row row0 + r = g * Lq + i) into sQ, zero past R.
// Contiguous, 16-byte aligned rows go by cp.async in the first tile's group (the first wait
// covers them): a split block of a short-KV call does only a few tiles, so Q's latency must
// overlap K's.
template <typename T, int D, int NT>
__device__ __forceinline__ void stage_q(T* sQ, int pitch, int rows, const T* q, const Params& p,
                                        int b, int kvh, int row0, int R, int tid) {
  if (vec_ok(q, p.q_strides)) {
    // A warp a row: one row address (two divisions) per row, not per chunk.
    constexpr int E = 16 / sizeof(T), CH = D / E;
    const int warp = tid >> 5, lane = tid & 31;
#pragma unroll 1
    for (int r = warp; r < rows; r += NT / 32) {
      const int rr = row0 + r;
      const T* src = rr < R ? q_row(q, p, b, kvh, rr) : q;
#pragma unroll
      for (int u = 0; u < cdiv(CH, 32); ++u) {
        const int cc = lane + 32 * u;
        if (CH % 32 == 0 || cc < CH)
          cp_async16(sQ + r * pitch + cc * E, rr < R ? src + cc * E : q, rr < R ? 16 : 0);
      }
    }
  } else {
    const T* group = q + (long long)b * p.q_strides[0] +
                     (long long)kvh * (p.q_heads / p.kv_heads) * p.q_strides[1];
    stage_q_strided<T, D, NT>(sQ, pitch, rows, group, p.q_strides[1], p.q_strides[2],
                              p.q_strides[3], p.q_len, row0, R, tid);
  }
}

template <typename T, int D, int V, int MT, bool SPLIT>
__device__ __forceinline__ void sdpa_block(const T* __restrict__ q, const T* __restrict__ k,
                                           const T* __restrict__ v, const void* __restrict__ mask,
                                           const T* __restrict__ sinks, T* __restrict__ out,
                                           float* __restrict__ partials, float* __restrict__ maxs,
                                           float* __restrict__ sums, const Params& p, char* smem) {
  using C = Cfg<T, D, V>;
  constexpr int MB = 16 * MT;
  constexpr int NT = C::NT, TK = C::TK, DP = C::DP, VP = C::VP, QP = C::QP, SP = C::SP,
                PP = C::PP, E = 16 / C::TS;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g8 = lane >> 2, t4 = lane & 3;

  const BlockWork w = block_work(p);
  const int rg = w.rg, split = w.split, kvh = w.kvh, b = w.b;
  const int G = p.q_heads / p.kv_heads, Lq = p.q_len, N = p.kv_len;
  const int R = G * Lq;
  const int row0 = rg * MB;
  const KeyTiles kt = key_tiles<TK>(w, p, SPLIT);
  const float scale2 = p.scale * kLog2e;

  T* sRing = reinterpret_cast<T*>(smem);  // p.stages * TK * (DP + VP) elements
  T* sQ = sRing + p.stages * TK * (DP + VP);
  T* sP = sQ + MB * QP;
  float* sS = reinterpret_cast<float*>(sP + MB * PP);
  float* sM = sS + C::KS * MB * SP;
  float* sL = sM + MB;
  float* sA = sL + MB;

  const TileRing<T, D, V> tiles(sRing, k, v, p, w, kt.end);
  const int ring = tiles.ring, vpitch = tiles.vpitch;
  const bool vsw = tiles.vsw;
  if (kt.count > 0) tiles.load(0, kt.first, tid);  // before Q's copies, as sdpa_block_warp_keys
  stage_q<T, D, NT>(sQ, QP, MB, q, p, b, kvh, row0, R, tid);
  cp_async_commit();
  for (int r = tid; r < MB; r += NT) {
    sM[r] = -INFINITY;
    sL[r] = 0.f;
    sA[r] = 1.f;
  }
  // Padding rows (past R) keep P = 0 and alpha = 1 for the whole block.
  for (int e = tid; e < MB * TK; e += NT) {
    int r = e / TK;
    if (row0 + r >= R) sP[r * PP + (e - r * TK)] = Tr<T>::t(0.f);
  }
  const int rows_here = min(MB, R - row0);

  float acc[MT][C::NPW3][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < C::NPW3; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[m][n][c] = 0.f;

  int stage = 0, next = 1;  // tile 0 (slot 0) was issued with Q
#pragma unroll 1
  for (int t = 2 - ring; t < kt.count; ++t) {
    if (!tiles.step(t, kt, next, tid)) continue;
    const int k0 = kt.key(t);
    const T* tK = tiles.k_tile(stage);
    const T* tV = tiles.v_tile(stage);
    stage = stage + 1 == ring ? 0 : stage + 1;

    // ---- phase 1: S[ks] = Q[:, kchunk] K[:, kchunk]^T
    {
      const int nt_first = C::NW >= C::NT1 ? warp % C::NT1 : warp * C::NPW1;
      const int ks = C::NW >= C::NT1 ? warp / C::NT1 : 0;
      const bool active = ks < C::KS;
      const int kb = ks * C::KCHUNK;
      const int ke = min(C::KSTEPS, kb + C::KCHUNK);
      float s[MT][C::NPW1][4];
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < C::NPW1; ++n)
#pragma unroll
          for (int c = 0; c < 4; ++c) s[m][n][c] = 0.f;
      if (active) {
        if constexpr (Tr<T>::kMma) {
#pragma unroll
          for (int kc = 0; kc < C::KCHUNK; ++kc) {
            const int kk = kb + kc;
            if (C::KSTEPS % C::KS != 0 && kk >= ke) break;
            uint32_t a[MT][4];
#pragma unroll
            for (int m = 0; m < MT; ++m)
              ldsm_x4(a[m], sQ + (m * 16 + (lane & 15)) * QP + kk * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int n = 0; n < C::NPW1; ++n) {
              uint32_t bf[2];
              ldsm_x2(bf, tK + tile_off<E>((nt_first + n) * 8 + (lane & 7),
                                                  kk * 16 + ((lane >> 3) & 1) * 8, DP, C::KSW));
#pragma unroll
              for (int m = 0; m < MT; ++m) mma16816<T>(s[m][n], a[m], bf);
            }
          }
        } else {
          for (int d = kb * 16; d < ke * 16; d += 4) {
#pragma unroll
            for (int n = 0; n < C::NPW1; ++n) {
              const int key = (nt_first + n) * 8 + 2 * t4;
              float4 k0v = *reinterpret_cast<const float4*>(tK + tile_off<E>(key, d, DP, C::KSW));
              float4 k1v =
                  *reinterpret_cast<const float4*>(tK + tile_off<E>(key + 1, d, DP, C::KSW));
#pragma unroll
              for (int m = 0; m < MT; ++m) {
                float4 q0 = *reinterpret_cast<const float4*>(sQ + (m * 16 + g8) * QP + d);
                float4 q1 = *reinterpret_cast<const float4*>(sQ + (m * 16 + g8 + 8) * QP + d);
                s[m][n][0] += q0.x * k0v.x + q0.y * k0v.y + q0.z * k0v.z + q0.w * k0v.w;
                s[m][n][1] += q0.x * k1v.x + q0.y * k1v.y + q0.z * k1v.z + q0.w * k1v.w;
                s[m][n][2] += q1.x * k0v.x + q1.y * k0v.y + q1.z * k0v.z + q1.w * k0v.w;
                s[m][n][3] += q1.x * k1v.x + q1.y * k1v.y + q1.z * k1v.z + q1.w * k1v.w;
              }
            }
          }
        }
        float* dS = sS + ks * MB * SP;
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int n = 0; n < C::NPW1; ++n) {
            const int col = (nt_first + n) * 8 + 2 * t4;
            *reinterpret_cast<float2*>(dS + (m * 16 + g8) * SP + col) =
                make_float2(s[m][n][0], s[m][n][1]);
            *reinterpret_cast<float2*>(dS + (m * 16 + g8 + 8) * SP + col) =
                make_float2(s[m][n][2], s[m][n][3]);
          }
      }
    }
    __syncthreads();

    // ---- phase 2: online softmax of the tile. LPR lanes per row: 32 (one row per warp) when
    // the rows fit the warps, else 8 (4 rows per warp at once: shorter reductions, fewer passes).
    auto softmax_rows = [&](auto lpr_tag) {
      constexpr int LPR = decltype(lpr_tag)::value;
      constexpr int RPW = 32 / LPR;                  // rows per warp pass
      constexpr int KPL = TK >= LPR ? TK / LPR : 1;  // keys per lane, contiguous
      const int sub = lane / LPR, sl = lane % LPR;
      for (int rb = warp * RPW; rb < rows_here; rb += C::NW * RPW) {
        const int r = rb + sub;  // < MB: rb < rows_here <= MB, MB a multiple of RPW
        const bool rv = r < rows_here;
        const int rr = row0 + r;
        const int g = rr / Lq, i = rr - g * Lq;
        const int head = kvh * G + g;
        const long long mrow = mask_row(p, b, head, i);
        const int causal_last = N - Lq + i;
        float sv[KPL];
        float tmax = -INFINITY;
#pragma unroll
        for (int u = 0; u < KPL; ++u) {
          const int j = sl * KPL + u;
          const int key = k0 + j;
          float x = -INFINITY;
          if (rv && j < TK && key < kt.end) {
            float dot = 0.f;
#pragma unroll
            for (int ks = 0; ks < C::KS; ++ks) dot += sS[ks * MB * SP + r * SP + j];
            x = apply_mask<T>(dot * scale2, p, mask, mrow, key, causal_last);
          }
          sv[u] = x;
          tmax = fmaxf(tmax, x);
        }
#pragma unroll
        for (int o = LPR / 2; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
        const float m_old = sM[r];
        const float m_new = fmaxf(m_old, tmax);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        float lsum = 0.f;
#pragma unroll
        for (int u = 0; u < KPL; ++u) {
          const float pj = exp2f(sv[u] - m_use);
          lsum += pj;
          if (rv && sl * KPL + u < TK) sP[r * PP + sl * KPL + u] = Tr<T>::t(pj);
        }
#pragma unroll
        for (int o = LPR / 2; o > 0; o >>= 1) lsum += __shfl_xor_sync(0xffffffffu, lsum, o);
        if (rv && sl == 0) {
          const float alpha = exp2f(m_old - m_use);
          sA[r] = alpha;
          sM[r] = m_new;
          sL[r] = sL[r] * alpha + lsum;
        }
      }
    };
    if (rows_here <= C::NW)
      softmax_rows(std::integral_constant<int, 32>());
    else
      softmax_rows(std::integral_constant<int, 8>());
    __syncthreads();

    // ---- phase 3: O = alpha * O + P V
    {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float a_lo = sA[m * 16 + g8], a_hi = sA[m * 16 + g8 + 8];
#pragma unroll
        for (int n = 0; n < C::NPW3; ++n) {
          acc[m][n][0] *= a_lo;
          acc[m][n][1] *= a_lo;
          acc[m][n][2] *= a_hi;
          acc[m][n][3] *= a_hi;
        }
      }
      if constexpr (Tr<T>::kMma) {
#pragma unroll
        for (int kk = 0; kk < TK / 16; ++kk) {
          uint32_t a[MT][4];
#pragma unroll
          for (int m = 0; m < MT; ++m)
            ldsm_x4(a[m], sP + (m * 16 + (lane & 15)) * PP + kk * 16 + (lane >> 4) * 8);
#pragma unroll
          for (int n = 0; n < C::NPW3; ++n) {
            const int nt = warp * C::NPW3 + n;
            if (C::NT3 % C::NW == 0 || nt < C::NT3) {
              uint32_t bf[2];
              ldsm_x2_t(bf, tV + tile_off<E>(kk * 16 + (lane & 15), nt * 8, vpitch, vsw));
#pragma unroll
              for (int m = 0; m < MT; ++m) mma16816<T>(acc[m][n], a[m], bf);
            }
          }
        }
      } else {
        for (int j = 0; j < TK; ++j) {
#pragma unroll
          for (int n = 0; n < C::NPW3; ++n) {
            const int nt = warp * C::NPW3 + n;
            if (C::NT3 % C::NW == 0 || nt < C::NT3) {
              const float2 vv = *reinterpret_cast<const float2*>(
                  tV + tile_off<E>(j, nt * 8 + 2 * t4, vpitch, vsw));
#pragma unroll
              for (int m = 0; m < MT; ++m) {
                const float plo = sP[(m * 16 + g8) * PP + j];
                const float phi = sP[(m * 16 + g8 + 8) * PP + j];
                acc[m][n][0] += plo * vv.x;
                acc[m][n][1] += plo * vv.y;
                acc[m][n][2] += phi * vv.x;
                acc[m][n][3] += phi * vv.y;
              }
            }
          }
        }
      }
    }
  }
  __syncthreads();

  // ---- epilogue
  const int Hq = p.q_heads;
  if constexpr (SPLIT) {
    const int S = p.num_splits;
    for (int r = tid; r < MB; r += NT) {
      const int rr = row0 + r;
      if (rr < R) {
        const long long row = out_row(p, b, kvh, rr);
        maxs[row * S + split] = sM[r];
        sums[row * S + split] = sL[r];
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = m * 16 + g8 + 8 * h;
      const int rr = row0 + r;
      if (rr >= R) continue;
      const int g = rr / Lq, i = rr - g * Lq;
      const int head = kvh * G + g;
      const long long row = ((long long)b * Hq + head) * Lq + i;
      float f = 1.f;
      if constexpr (!SPLIT) {
        const float mr = sM[r], lr = sL[r];
        if (p.has_sinks) {
          const float sk = Tr<T>::f(sinks[head]) * kLog2e;
          const float m2 = fmaxf(mr, sk);
          const float fac = exp2f(mr - m2);
          f = __fdividef(fac, lr * fac + exp2f(sk - m2));
        } else {
          f = __fdividef(1.f, lr);
        }
      }
#pragma unroll
      for (int n = 0; n < C::NPW3; ++n) {
        const int nt = warp * C::NPW3 + n;
        if (C::NT3 % C::NW == 0 || nt < C::NT3) {
          const int col = nt * 8 + 2 * t4;
          const float x0 = acc[m][n][2 * h] * f, x1 = acc[m][n][2 * h + 1] * f;
          if constexpr (SPLIT) {
            *reinterpret_cast<float2*>(partials + (row * p.num_splits + split) * V + col) =
                make_float2(x0, x1);
          } else {
            out[row * V + col] = Tr<T>::t(x0);
            out[row * V + col + 1] = Tr<T>::t(x1);
          }
        }
      }
    }
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
// MT 16-row m-tiles (MT = 1: up to 16 query rows, decode's common case; 2: speculative decoding's
// 17-32), fp16/bf16. Each warp owns a 16-key slice of every tile (KG slices) and a share of V's
// columns (VG shares), and keeps its own online softmax in registers: S's accumulators become P's
// A fragments and alpha scales O in place, so a tile costs one barrier (the ring) instead of
// three. Warps with the same key slice compute the same S: decode at small GQA is bound by
// latency per tile, not by MMAs. A K or V fragment serves every m-tile. The warps' (max, sum, O)
// merge once, after the last tile, an m-tile at a time.
template <typename T, int D, int V>
struct WarpKeysCfg {
  using C = Cfg<T, D, V>;
  static constexpr int KG = C::TK / 16;        // key slices per tile
  static constexpr int VG = C::NW / KG;        // column shares per key slice
  static constexpr int NT3 = V / 8;            // value n-tiles
  static constexpr int NTV = cdiv(NT3, VG);    // value n-tiles per warp
  static_assert(C::NW % KG == 0, "warps must divide into key slices");
  // The merge's scratch reuses the ring: per slice a row max and sum for 16 rows, then O, 16 x V
  // a slice (one-pass), or 16 x OP for slices 1.. (split passes; OP = V + 8: a padded row).
  static constexpr int OP = V + 8;
  static_assert(KG * 16 * (V + 2) * 4 <= 2 * C::TK * (C::DP + C::VP) * C::TS, "merge scratch");
  static_assert((2 * KG * 16 + (KG - 1) * 16 * OP) * 4 <= 2 * C::TK * (C::DP + C::VP) * C::TS,
                "slice merge scratch");
};

template <typename T, int D, int V, int MT, bool SPLIT>
__device__ __forceinline__ void sdpa_block_warp_keys(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const void* __restrict__ mask, const T* __restrict__ sinks, T* __restrict__ out,
    float* __restrict__ partials, float* __restrict__ maxs, float* __restrict__ sums,
    const Params& p, char* smem) {
  using C = Cfg<T, D, V>;
  using W = WarpKeysCfg<T, D, V>;
  constexpr int MB = 16, NT = C::NT, TK = C::TK, DP = C::DP, VP = C::VP, QP = C::QP;
  constexpr int E = 16 / C::TS;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g8 = lane >> 2, t4 = lane & 3;
  const int kg = warp % W::KG, vg = warp / W::KG;

  AOTC_STAMPS_DECLARE;
  AOTC_STAMP(0);  // start
  const BlockWork w = block_work(p);
  AOTC_STAMP(1);  // block work
  const int G = p.q_heads / p.kv_heads, Lq = p.q_len, N = p.kv_len;
  const int R = G * Lq, row0 = w.rg * MB * MT;
  const KeyTiles kt = key_tiles<TK>(w, p, SPLIT);
  const float scale2 = p.scale * kLog2e;

  // sdpa_block's layout (ring, then Q): shared_bytes(MT, stages) covers it.
  T* sRing = reinterpret_cast<T*>(smem);
  T* sQ = sRing + p.stages * TK * (DP + VP);
  const TileRing<T, D, V> tiles(sRing, k, v, p, w, kt.end);
  const int ring = tiles.ring, vpitch = tiles.vpitch;
  const bool vsw = tiles.vsw;
  AOTC_STAMP(2);  // ring set up
  // Tile 0's copies go out before Q's, which join its group: stage_q is ~0.6 us of cold code in
  // a batch-1 block, and DRAM is idle until the first copy (bench/NOTES.md round 14).
  if (kt.count > 0) tiles.load(0, kt.first, tid);
  AOTC_STAMP(3);  // tile 0 issued
  stage_q<T, D, NT>(sQ, QP, MB * MT, q, p, w.b, w.kvh, row0, R, tid);
  cp_async_commit();
  AOTC_STAMP(4);  // Q issued

  // This thread's rows in m-tile mt: g8 (h = 0) and g8 + 8 (h = 1); their mask facts.
  long long mrow[MT][2];
  int causal_last[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int rr = min(row0 + mt * MB + g8 + 8 * h, R - 1);
      const int g = rr / Lq, i = rr - g * Lq;
      mrow[mt][h] = mask_row(p, w.b, w.kvh * G + g, i);
      causal_last[mt][h] = N - Lq + i;
    }
  float o[MT][W::NTV][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < W::NTV; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) o[mt][n][c] = 0.f;
  float m_run[MT][2], l_run[MT][2] = {};  // l: this thread's keys
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) m_run[mt][0] = m_run[mt][1] = -INFINITY;

  // This lane's K-fragment row and its offsets in a tile for k-steps 0..3. A k-step is two
  // 16-byte chunks, and the swizzle XORs a chunk's index below 8 only, so k-step kk's offset is
  // koff[kk % 4] + (kk / 4) * 64: immediates in the S loop, not per-step address math.
  static_assert(E == 8, "the register path: fp16/bf16");
  int koff[4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
    koff[j] = tile_off<E>((lane & 7) + ((lane >> 4) << 3), j * 16 + ((lane >> 3) & 1) * 8, DP,
                          C::KSW);
  int stage = 0, next = 1;  // tile 0 (slot 0) was issued above
#pragma unroll 1
  for (int t = 2 - ring; t < kt.count; ++t) {
    if (!tiles.step(t, kt, next, tid)) continue;
    if (t == 0) AOTC_STAMP(5);  // tile 0 landed
    const int k0 = kt.key(t);
    const T* tK = tiles.k_tile(stage) + kg * 16 * DP;
    const T* tV = tiles.v_tile(stage) + kg * 16 * vpitch;
    stage = stage + 1 == ring ? 0 : stage + 1;

    // S (16 rows of m-tile mt x this warp's 16 keys): s[mt][n] is keys n * 8 + [0, 8).
    float s[MT][2][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4], bk[4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldsm_x4(a[mt], sQ + (mt * MB + (lane & 15)) * QP + kk * 16 + (lane >> 4) * 8);
      ldsm_x4(bk, tK + koff[kk % 4] + (kk / 4) * 64);
      const uint32_t b0[2] = {bk[0], bk[1]}, b1[2] = {bk[2], bk[3]};
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(s[mt][0], a[mt], b0);
        mma16816<T>(s[mt][1], a[mt], b1);
      }
    }

    // Online softmax in registers; a row's four lanes (t4) meet by shuffles.
    const int key0 = k0 + kg * 16 + 2 * t4;
    const bool plain = p.mask_kind == 0 && k0 + TK <= kt.end;  // uniform over the block
    uint32_t pa[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[mt][n][c] *= scale2;
      if (!plain) {  // one branch over all of the mask's code (fetch, above)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int h = c >> 1, key = key0 + n * 8 + (c & 1);
            s[mt][n][c] = key < kt.end ? apply_mask<T>(s[mt][n][c], p, mask, mrow[mt][h],
                                                       key, causal_last[mt][h])
                                       : -INFINITY;
          }
      }
      float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) tmax[c >> 1] = fmaxf(tmax[c >> 1], s[mt][n][c]);
      float alpha[2], m_use[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tmax[h] = fmaxf(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 1));
        tmax[h] = fmaxf(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 2));
        const float m_new = fmaxf(m_run[mt][h], tmax[h]);
        m_use[h] = m_new == -INFINITY ? 0.f : m_new;
        alpha[h] = fast_exp2(m_run[mt][h] - m_use[h]);
        m_run[mt][h] = m_new;
        l_run[mt][h] *= alpha[h];
      }
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          s[mt][n][c] = fast_exp2(s[mt][n][c] - m_use[c >> 1]);
          l_run[mt][c >> 1] += s[mt][n][c];
        }
      // S's accumulator layout is P's A-fragment layout (rows g8 / g8 + 8, keys 2 t4 (+ 8)).
      pa[mt][0] = pack2<T>(s[mt][0][0], s[mt][0][1]);
      pa[mt][1] = pack2<T>(s[mt][0][2], s[mt][0][3]);
      pa[mt][2] = pack2<T>(s[mt][1][0], s[mt][1][1]);
      pa[mt][3] = pack2<T>(s[mt][1][2], s[mt][1][3]);

      // Once a row's running max settles (most tiles of a long split) alpha is exactly 1.
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f))
#pragma unroll
        for (int n = 0; n < W::NTV; ++n) {
          o[mt][n][0] *= alpha[0];
          o[mt][n][1] *= alpha[0];
          o[mt][n][2] *= alpha[1];
          o[mt][n][3] *= alpha[1];
        }
    }

    // O (this warp's column share) = alpha O + P V over the slice's 16 keys.
#pragma unroll
    for (int n = 0; n < W::NTV; n += 2) {
      const int nt = vg * W::NTV + n;
      if (W::NT3 % W::VG == 0 || nt < W::NT3) {
        if (n + 1 < W::NTV) {
          // Two n-tiles at once; past V (padded rows only: swizzled V has 8k n-tiles)
          // it reads the padding, never stored.
          uint32_t bv[4];
          ldsm_x4_t(bv, tV + tile_off<E>(lane & 15, (nt + (lane >> 4)) * 8, vpitch, vsw));
          const uint32_t b0[2] = {bv[0], bv[1]}, b1[2] = {bv[2], bv[3]};
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma16816<T>(o[mt][n], pa[mt], b0);
            mma16816<T>(o[mt][n + 1], pa[mt], b1);
          }
        } else {
          uint32_t bv[2];
          ldsm_x2_t(bv, tV + tile_off<E>(lane & 15, nt * 8, vpitch, vsw));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma16816<T>(o[mt][n], pa[mt], bv);
        }
      }
    }
  }

  AOTC_STAMP(6);  // tile loop done (thread 0's warp)
  // ---- merge the key slices, an m-tile at a time. Scratch in the ring (every copy has landed,
  // every warp is done).
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[mt][h] += __shfl_xor_sync(0xffffffffu, l_run[mt][h], 1);
      l_run[mt][h] += __shfl_xor_sync(0xffffffffu, l_run[mt][h], 2);
    }
  cp_async_wait<0>();
  __syncthreads();
  AOTC_STAMP(8);  // every warp done with the tiles
  float* sMax = reinterpret_cast<float*>(sRing);  // [KG][16]
  float* sSum = sMax + W::KG * MB;                // [KG][16]
  float* sO = sSum + W::KG * MB;                  // split passes: [KG - 1][16][OP]; else [KG][16][V]
  // Split passes store partials straight from the fragments: the warps of key slices 1.. put
  // their weighted O in shared memory (rows padded to V + 8 floats: a warp's float2 accesses meet
  // no bank twice a wavefront), and slice 0's warps add them to theirs and store the rows. The
  // one-pass merge lays every slice out by rows and normalises them with the sinks.
  constexpr int OP = W::OP;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    if (mt > 0) __syncthreads();  // the previous m-tile's reads of the scratch are done
    if (vg == 0 && t4 == 0)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sMax[kg * MB + g8 + 8 * h] = m_run[mt][h];
        sSum[kg * MB + g8 + 8 * h] = l_run[mt][h];
      }
    __syncthreads();
    float mx[2], wgt[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = -INFINITY;
#pragma unroll
      for (int j = 0; j < W::KG; ++j) mx[h] = fmaxf(mx[h], sMax[j * MB + g8 + 8 * h]);
      wgt[h] = fast_exp2(m_run[mt][h] - (mx[h] == -INFINITY ? 0.f : mx[h]));
    }
    // This warp's weighted O into the scratch: split passes slices 1.. only (pitch OP).
    constexpr int PITCH = SPLIT ? OP : V;
    if (!SPLIT || kg > 0)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int n = 0; n < W::NTV; ++n) {
          const int nt = vg * W::NTV + n;
          const int srow = (SPLIT ? kg - 1 : kg) * MB + g8 + 8 * h;
          if (W::NT3 % W::VG == 0 || nt < W::NT3)
            *reinterpret_cast<float2*>(sO + srow * PITCH + nt * 8 + 2 * t4) =
                make_float2(o[mt][n][2 * h] * wgt[h], o[mt][n][2 * h + 1] * wgt[h]);
        }
    __syncthreads();
    if (mt == 0) AOTC_STAMP(9);  // m-tile 0's slices in shared memory
    if constexpr (SPLIT) {
      if (kg > 0) continue;
      const int S = p.num_splits;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = g8 + 8 * h, rr = row0 + mt * MB + r;
        if (rr >= R) continue;
        const long long row = out_row(p, w.b, w.kvh, rr);
        float* dst = partials + (row * S + w.split) * V;
#pragma unroll
        for (int n = 0; n < W::NTV; ++n) {
          const int nt = vg * W::NTV + n;
          if (W::NT3 % W::VG != 0 && nt >= W::NT3) continue;
          float x0 = o[mt][n][2 * h] * wgt[h], x1 = o[mt][n][2 * h + 1] * wgt[h];
#pragma unroll
          for (int j = 1; j < W::KG; ++j) {
            const float2 xo =
                *reinterpret_cast<const float2*>(sO + ((j - 1) * MB + r) * OP + nt * 8 + 2 * t4);
            x0 += xo.x;
            x1 += xo.y;
          }
          *reinterpret_cast<float2*>(dst + nt * 8 + 2 * t4) = make_float2(x0, x1);
        }
        if (vg == 0 && t4 == 0) {
          const float mu = mx[h] == -INFINITY ? 0.f : mx[h];
          float l = 0.f;
#pragma unroll
          for (int j = 0; j < W::KG; ++j) l += fast_exp2(sMax[j * MB + r] - mu) * sSum[j * MB + r];
          maxs[row * S + w.split] = mx[h];
          sums[row * S + w.split] = l;
        }
      }
    } else {
      const int mrow0 = row0 + mt * MB, rows_here = min(MB, R - mrow0);
      for (int e = tid; e < rows_here * (V / 2); e += NT) {
        const int r = e / (V / 2), col = (e - r * (V / 2)) * 2;
        float mxr = -INFINITY;
#pragma unroll
        for (int j = 0; j < W::KG; ++j) mxr = fmaxf(mxr, sMax[j * MB + r]);
        const float mu = mxr == -INFINITY ? 0.f : mxr;
        float l = 0.f, x0 = 0.f, x1 = 0.f;
#pragma unroll
        for (int j = 0; j < W::KG; ++j) {
          l += fast_exp2(sMax[j * MB + r] - mu) * sSum[j * MB + r];
          const float2 xo = *reinterpret_cast<const float2*>(sO + (j * MB + r) * V + col);
          x0 += xo.x;
          x1 += xo.y;
        }
        const long long row = out_row(p, w.b, w.kvh, mrow0 + r);
        float f = __fdividef(1.f, l);
        if (p.has_sinks) {
          const float sk = Tr<T>::f(sinks[(int)((row / Lq) % p.q_heads)]) * kLog2e;
          const float m2 = fmaxf(mxr, sk);
          const float fac = fast_exp2(mxr - m2);
          f = __fdividef(fac, l * fac + fast_exp2(sk - m2));
        }
        *reinterpret_cast<uint32_t*>(out + row * V + col) = pack2<T>(x0 * f, x1 * f);
      }
    }
  }
#ifdef AOTC_SDPA_STAMPS
  if constexpr (SPLIT) {
    __syncthreads();
    AOTC_STAMP(7);  // merged and stored
    if (tid == 0)
      write_stamps(partials + (out_row(p, w.b, w.kvh, row0) * p.num_splits + w.split) * V, 0,
                   aotc_stamps);
  }
#endif
}

// Splits whose loads a merging thread issues at once (merge_splits' U) in every merge: waiting
// combiners and the combine kernel. Mirrored by COMBINE_SPLITS_IN_FLIGHT in the plan.
constexpr int kCombineSplitsInFlight = 8;

// Four columns of a partial row as floats: fp32 partials, or T partials (8 bytes) widened.
template <typename P, bool L2_ONLY>
__device__ __forceinline__ float4 load_partial4(const P* x) {
  if constexpr (std::is_same<P, float>::value) {
    const float4* v = reinterpret_cast<const float4*>(x);
    return L2_ONLY ? __ldcg(v) : *v;
  } else {
    const uint2* v = reinterpret_cast<const uint2*>(x);
    const uint2 u = L2_ONLY ? __ldcg(v) : *v;
    const float2 lo = unpack2<P>(u.x), hi = unpack2<P>(u.y);
    return make_float4(lo.x, lo.y, hi.x, hi.y);
  }
}

// Merges splits s0, s0 + step, ... < S of one row's column group c4 (4 floats) into the running
// (max m, sum l, unnormalised output a), U splits' loads in flight at a time. L2_ONLY: the
// partials were written by other blocks of this kernel (no stale L1 lines may serve them).
template <typename P, int V, int U, bool L2_ONLY>
__device__ __forceinline__ void merge_splits(const float* mrow, const float* lrow,
                                             const P* prow, int c4, int s0, int step, int S,
                                             float& m, float& l, float4& a) {
  // fp32 partials are unnormalised; narrower ones hold O / l (within V's range).
  constexpr bool kNormalised = !std::is_same<P, float>::value;
  for (; s0 < S; s0 += U * step) {
    float ms[U], ls[U];
    float4 xs[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = s0 + u * step;
      const bool ok = s < S;
      const P* x = prow + (long long)s * V + c4 * 4;
      if constexpr (L2_ONLY) {
        ms[u] = ok ? __ldcg(mrow + s) : -INFINITY;
        ls[u] = ok ? __ldcg(lrow + s) : 0.f;
      } else {
        ms[u] = ok ? mrow[s] : -INFINITY;
        ls[u] = ok ? lrow[s] : 0.f;
      }
      xs[u] = ok ? load_partial4<P, L2_ONLY>(x) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float cm = m;
#pragma unroll
    for (int u = 0; u < U; ++u) cm = fmaxf(cm, ms[u]);
    const float cu = cm == -INFINITY ? 0.f : cm;
    const float r = exp2f(m - cu);
    l *= r;
    a.x *= r;
    a.y *= r;
    a.z *= r;
    a.w *= r;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float w = exp2f(ms[u] - cu);
      if constexpr (kNormalised) {
        w *= ls[u];
        l += w;
      } else {
        l += w * ls[u];
      }
      a.x += w * xs[u].x;
      a.y += w * xs[u].y;
      a.z += w * xs[u].z;
      a.w += w * xs[u].w;
    }
    m = cm;
  }
}

// Writes out = a / l for 4 columns, with the sink (log2 domain, -inf when absent) in the sum.
// Divisions here and in the epilogues are __fdividef: an IEEE division adds a slow-path call,
// code that a cold block fetches; l >= 1 (the row max's own weight), far below 2^126.
// The sink of output row `row` ((b, head, token) order) in the log2 domain; -inf without sinks.
template <typename T>
__device__ __forceinline__ float sink_log2(const T* __restrict__ sinks, bool has_sinks, long long row,
                                          int q_len, int q_heads) {
  return has_sinks ? Tr<T>::f(sinks[(int)((row / q_len) % q_heads)]) * kLog2e : -INFINITY;
}

// out[0..3] = a * inv.
template <typename T>
__device__ __forceinline__ void store4(T* o, float4 a, float inv) {
  o[0] = Tr<T>::t(a.x * inv);
  o[1] = Tr<T>::t(a.y * inv);
  o[2] = Tr<T>::t(a.z * inv);
  o[3] = Tr<T>::t(a.w * inv);
}

// The factor that turns a row's merged (unnormalised) output into attention's: max m and sum l
// of its splits, the sink sk beside them (log2 domain).
__device__ __forceinline__ float merged_scale(float m, float l, float sk) {
  const float mx = fmaxf(m, sk);
  const float mu = mx == -INFINITY ? 0.f : mx;
  const float f = exp2f(m - mu);
  return __fdividef(f, l * f + exp2f(sk - mu));
}

// The factor of a split's partial row in T (the seesaw's split passes): O / l, which stays
// within V's range (a T such as fp16 cannot hold O itself). 0 for a split without a key.
__device__ __forceinline__ float partial_scale(float l) {
  return l > 0.f ? __fdividef(1.f, l) : 0.f;
}

template <typename T>
__device__ __forceinline__ void store_merged(T* o, float m, float l, float4 a, float sk) {
  store4(o, a, merged_scale(m, l, sk));
}

// The fused split pass's end: a block publishes that its splits' partials are written; the last
// block of its (batch, KV head, row group) to finish merges the group's splits into `out`.
// "Last" needs no zeroed counter: each block stores a token in its slot of `flags` (a buffer of
// this call: no call running at the same time shares it), then its first warp's lanes each run a
// sequentially consistent fence and read a share of the group's slots; the block whose earliest
// fence comes last sees every token (more than one may, and they write the same values). The
// merging blocks reset the slots to 0, so a later call given the same buffer starts clean.
// A slot holds a 64-bit token, stored and read whole (aligned 8-byte accesses are single-copy
// atomic). A fresh buffer may hold any bits: a 32-bit token would match one of a batch-1 call's
// 1024 slots by chance about once in 4 million calls, and merge a row before its splits landed.
using Slot = unsigned long long;

// A token per buffer address (splitmix64's finalizer; never 0, the reset value).
__device__ __forceinline__ Slot flag_token(const Slot* flags) {
  Slot a = reinterpret_cast<uintptr_t>(flags);
  a = (a ^ (a >> 30)) * 0xBF58476D1CE4E5B9ull;
  a = (a ^ (a >> 27)) * 0x94D049BB133111EBull;
  return (a ^ (a >> 31)) | 1ull;
}

// RELEASE: a store that orders this thread's (and, after a barrier, its block's) earlier
// writes before the token (no fence before it).
template <bool RELEASE = false>
__device__ __forceinline__ void publish_token(Slot* slot, Slot tok) {
  if constexpr (RELEASE)
    asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(slot), "l"(tok) : "memory");
  else
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(slot), "l"(tok) : "memory");
}

// Whether all S slots hold `tok`, read by one whole warp (`lane` its lane), 32 at a time (one
// read after another would cost a round trip each); the same answer in every lane. ACQUIRE:
// reads that synchronize with the release stores of the tokens (no fence after them).
template <bool ACQUIRE = false>
__device__ __forceinline__ bool slots_hold_token(const Slot* slots, int S, Slot tok, int lane) {
  bool seen = true;
  for (int s = lane; s < S; s += 32) {
    Slot x;
    if constexpr (ACQUIRE)
      asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(x) : "l"(slots + s) : "memory");
    else
      asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(x) : "l"(slots + s) : "memory");
    seen &= x == tok;
  }
  return __all_sync(0xffffffffu, seen);
}

template <typename T, int V, int NT>
__device__ __forceinline__ void merge_group(const float* partials, const float* maxs,
                                            const float* sums, Slot* flags, const T* sinks,
                                            T* out, const Params& p, int rows_per_block,
                                            char* smem) {
  const BlockWork w = block_work(p);
  const int S = p.num_splits, tid = threadIdx.x;
  const int R = p.q_heads / p.kv_heads * p.q_len, row0 = w.rg * rows_per_block;
  const int rows_here = min(rows_per_block, R - row0);
  Slot* gflags = flags + ((long long)(w.b * p.kv_heads + w.kvh) * p.row_groups + w.rg) * S;
  int* s_last = reinterpret_cast<int*>(smem);
  __threadfence();  // this block's partials, before its token
  __syncthreads();
  if (tid < 32) {
    const Slot tok = flag_token(flags);
    if (tid == 0) publish_token(gflags + w.split, tok);
    __syncwarp();
    asm volatile("fence.sc.gpu;" ::: "memory");
    const bool seen = slots_hold_token(gflags, S, tok, tid);
    __threadfence();  // the other blocks' partials, after their tokens
    if (tid == 0) *s_last = seen;
  }
  __syncthreads();
  if (!*s_last) return;

  // Items are (row, 4-column group); when they are fewer than the threads, split groups share
  // an item's splits and meet in shared memory.
  constexpr int CG = V / 4;
  constexpr int U = kCombineSplitsInFlight;
  const int items = rows_here * CG;
  const int sg_count = max(1, NT / items), sg = tid / items;
  float* part = reinterpret_cast<float*>(smem + 16);  // [sg_count][items][6]
  for (int it = tid % items; sg < sg_count && it < items; it += (sg_count > 1 ? items : NT)) {
    const int r = it / CG, c4 = it - r * CG;
    const long long row = out_row(p, w.b, w.kvh, row0 + r);
    float m = -INFINITY, l = 0.f;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
    merge_splits<float, V, U, true>(maxs + row * S, sums + row * S, partials + row * S * V, c4,
                                    sg, sg_count, S, m, l, a);
    if (sg_count == 1) {
      const float sk = sink_log2(sinks, p.has_sinks, row, p.q_len, p.q_heads);
      store_merged(out + row * V + c4 * 4, m, l, a, sk);
    } else {
      float* e = part + (sg * items + it) * 6;
      e[0] = m;
      e[1] = l;
      e[2] = a.x;
      e[3] = a.y;
      e[4] = a.z;
      e[5] = a.w;
    }
    if (sg_count > 1) break;  // one item per thread when split groups share items
  }
  if (sg_count > 1) {
    __syncthreads();
    for (int it = tid; it < items; it += NT) {
      const int r = it / CG, c4 = it - r * CG;
      const long long row = out_row(p, w.b, w.kvh, row0 + r);
      float m = -INFINITY;
      for (int g = 0; g < sg_count; ++g) m = fmaxf(m, part[(g * items + it) * 6]);
      const float mu = m == -INFINITY ? 0.f : m;
      float l = 0.f;
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int g = 0; g < sg_count; ++g) {
        const float* e = part + (g * items + it) * 6;
        const float wgt = exp2f(e[0] - mu);
        l += wgt * e[1];
        a.x += wgt * e[2];
        a.y += wgt * e[3];
        a.z += wgt * e[4];
        a.w += wgt * e[5];
      }
      const float sk = sink_log2(sinks, p.has_sinks, row, p.q_len, p.q_heads);
      store_merged(out + row * V + c4 * 4, m, l, a, sk);
    }
  }
  __syncthreads();
  for (int s = tid; s < S; s += NT) gflags[s] = 0ull;
}

// Merges one query row's splits into `out` with the block's nt threads: threads = column groups
// (4 floats) x split groups; each thread issues the loads of U splits (max, sum, 4 partial
// columns) at once and merges them online, so a row waits for about one global round trip per U
// splits instead of three dependent ones (maxs, then weights and sums, then partials). Split
// groups meet in shared memory: part (nt float4), gm and gl (64 floats each). L2_ONLY: the
// partials were written by other blocks of the same kernel.
template <typename T, int V, int U, bool L2_ONLY, typename P = float>
__device__ __forceinline__ void combine_row(long long row, const P* __restrict__ partials,
                                            const float* __restrict__ maxs,
                                            const float* __restrict__ sums,
                                            const T* __restrict__ sinks, T* __restrict__ out,
                                            int S, int q_heads, int q_len, int has_sinks,
                                            float4* part, float* gm, float* gl) {
  constexpr int CG = V / 4;
  constexpr int MAX_GROUPS = 64;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int sg_count = nt >= CG ? min(nt / CG, MAX_GROUPS) : 1;
  const int sg = tid / CG;
  const float* mrow = maxs + row * S;
  const float* lrow = sums + row * S;
  const P* prow = partials + row * S * V;
  const float sk = sink_log2(sinks, has_sinks, row, q_len, q_heads);

  if (sg < sg_count) {
    for (int c4 = tid % CG; c4 < CG; c4 += (nt >= CG ? CG : nt)) {
      float m = -INFINITY, l = 0.f;
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
      merge_splits<P, V, U, L2_ONLY>(mrow, lrow, prow, c4, sg, sg_count, S, m, l, a);
      if (sg_count == 1) {
        store_merged(out + row * V + c4 * 4, m, l, a, sk);
      } else {
        part[sg * CG + c4] = a;
        if (c4 == 0) {
          gm[sg] = m;
          gl[sg] = l;
        }
      }
    }
  }
  if (sg_count > 1) {
    __syncthreads();
    float mx = sk;
    for (int g = 0; g < sg_count; ++g) mx = fmaxf(mx, gm[g]);
    const float mu = mx == -INFINITY ? 0.f : mx;
    float L = exp2f(sk - mu);
    for (int g = 0; g < sg_count; ++g) L += exp2f(gm[g] - mu) * gl[g];
    const float inv = __fdividef(1.f, L);
    for (int c4 = tid; c4 < CG; c4 += nt) {
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int g = 0; g < sg_count; ++g) {
        const float w = exp2f(gm[g] - mu);
        const float4 x = part[g * CG + c4];
        a.x += w * x.x;
        a.y += w * x.y;
        a.z += w * x.z;
        a.w += w * x.w;
      }
      store4(out + row * V + c4 * 4, a, inv);
    }
  }
}

// The fused split pass with waiting combiners (Params::combiners_from > 0): a split block
// publishes a token in the slot (query row, split) of each of its rows; the combiner of a row
// (one of the grid's last blocks) waits until its row's slots all hold the token, merges the
// row's splits as the combine kernel does, and resets the slots. A combiner waits only for
// blocks of lower index, which the GPU dispatches before it; the plan also keeps the grid within
// one wave of resident blocks.
__device__ __forceinline__ void publish_rows(Slot* flags, const Params& p,
                                             int rows_per_block) {
  const BlockWork w = block_work(p);
  const int R = p.q_heads / p.kv_heads * p.q_len, row0 = w.rg * rows_per_block;
  const int rows_here = min(rows_per_block, R - row0);
  // The barrier orders every thread's partial stores before the publishing threads' release
  // stores, and a release is cumulative: a combiner that sees a token sees the block's partials.
  // One release per row instead of a fence in every thread before the barrier: 192/128 B=1 11.5
  // against 11.7 us (H100, bench/NOTES.md round 9).
  __syncthreads();
  if ((int)threadIdx.x < rows_here) {
    const long long row = out_row(p, w.b, w.kvh, row0 + threadIdx.x);
    publish_token<true>(flags + row * p.num_splits + w.split, flag_token(flags));
  }
}

template <typename T, int V>
__device__ __forceinline__ void wait_and_combine(const float* partials, const float* maxs,
                                                 const float* sums, Slot* flags,
                                                 const T* sinks, T* out, const Params& p,
                                                 long long row, char* smem) {
  const int S = p.num_splits;
  Slot* slots = flags + row * S;
  if (threadIdx.x < 32) {
    const Slot tok = flag_token(flags);
    // Acquire reads of the tokens order this block's reads of the partials after them (with
    // the barrier below, for every thread): a full fence here (MEMBAR.SC) cost more.
    while (!slots_hold_token<true>(slots, S, tok, threadIdx.x)) __nanosleep(128);
  }
  __syncthreads();
  float4* part = reinterpret_cast<float4*>(smem);  // blockDim.x float4, then gm and gl
  float* gm = reinterpret_cast<float*>(part + blockDim.x);
  combine_row<T, V, kCombineSplitsInFlight, true>(row, partials, maxs, sums, sinks, out, S,
                                                  p.q_heads, p.q_len, p.has_sinks, part, gm,
                                                  gm + 64);
  for (int s = threadIdx.x; s < S; s += blockDim.x) slots[s] = 0ull;
}

// 4-byte words of a FusedScratch: rows x S (`rows_splits`) partial rows of V, maxs and sums, then
// `slots` 8-byte flag slots. The plan sizes the scratch output by the same sum (cuda.py
// _scratch; tests/test_cuda_plan.py compares the two).
__host__ __device__ constexpr long long fused_flags_word(long long rows_splits, int v) {
  return rows_splits * (v + 2);
}
__host__ __device__ constexpr long long fused_scratch_words(long long rows_splits, int v,
                                                           long long slots) {
  return fused_flags_word(rows_splits, v) + 2 * slots;
}

// The fused pass's scratch, one buffer: every output array of a launch costs MLX host time
// (the fused launch took 4.5 us to build with five outputs, 1.8 with three; H100 host). In it:
// partials (rows x S x V floats), maxs and sums (rows x S each), then the flag slots, 8-byte
// aligned because V + 2 is even; rows = B * Hq * Lq, S = Params::num_splits.
struct FusedScratch {
  float* partials;
  float* maxs;
  float* sums;
  Slot* flags;
  __device__ __forceinline__ FusedScratch(float* base, const Params& p, int V) {
    const long long rs = (long long)p.batch * p.q_heads * p.q_len * p.num_splits;
    partials = base;
    maxs = partials + rs * V;
    sums = maxs + rs;
    flags = reinterpret_cast<Slot*>(base + fused_flags_word(rs, V));
  }
};

// sm_80's ptxas spilled 112-168 bytes a thread from the two-m-tile register path at 255
// registers (128/128); there the plan keeps row groups of one m-tile (cuda.py block_layout), and
// calls of two m-tiles from another plan take the shared-memory path.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr bool kTwoTileRegisterPath = false;
#else
constexpr bool kTwoTileRegisterPath = true;
#endif

// FUSED (a split pass only): the split pass and the combine in one launch (merge_group, or
// publish_rows and wait_and_combine). ROWS: the entry point of 2 or 4 m-tiles (`rows_` names);
// the others hold the one-m-tile path alone. A kernel holding every path was twice the code,
// and after other kernels' code it paid 3-8 us more than back to back for instruction fetch;
// one path each, 0.3-1 (bench/NOTES.md round 16).
template <typename T, int D, int V, bool SPLIT, bool FUSED = false, bool ROWS = false>
__device__ __forceinline__ void sdpa_entry(const T* q, const T* k, const T* v, const void* mask,
                                           const T* sinks, T* out, float* partials, float* maxs,
                                           float* sums, const Params& p,
                                           Slot* flags = nullptr) {
  extern __shared__ __align__(16) char aotc_smem[];
  uint32_t dyn;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
  if ((ROWS ? p.m_tiles < 2 : p.m_tiles != 1) || p.m_tiles > Cfg<T, D, V>::MT_MAX ||
      p.stages < 2 || p.stages > Cfg<T, D, V>::MAX_STAGES ||
      dyn < (uint32_t)shared_bytes<T, D, V>(p.m_tiles, p.stages) ||
      blockDim.x != Cfg<T, D, V>::NT) {
    __trap();  // the plan and this header disagree
  }
  // The combine may launch at once: its blocks take SMs as ours leave and wait in-kernel for
  // the partials. Allowing it only at exit ran no faster than a plain launch (bench/NOTES.md,
  // round 26).
  if constexpr (SPLIT && !FUSED) allow_next_grid();
  if constexpr (FUSED) {
    if (p.combiners_from > 0 && (int)blockIdx.x >= p.combiners_from) {
      wait_and_combine<T, V>(partials, maxs, sums, flags, sinks, out, p,
                             blockIdx.x - p.combiners_from, aotc_smem);
      return;
    }
  }
  if constexpr (!ROWS) {
    if constexpr (Tr<T>::kMma)
      sdpa_block_warp_keys<T, D, V, 1, SPLIT>(q, k, v, mask, sinks, out, partials, maxs, sums, p,
                                              aotc_smem);
    else
      sdpa_block<T, D, V, 1, SPLIT>(q, k, v, mask, sinks, out, partials, maxs, sums, p, aotc_smem);
  } else if (p.m_tiles == 2) {
    // fp16/bf16 4-warp blocks of 17-64 rows (the plan's row groups of two m-tiles).
    if constexpr (kTwoTileRegisterPath && Tr<T>::kMma && Cfg<T, D, V>::NW == 4)
      sdpa_block_warp_keys<T, D, V, 2, SPLIT>(q, k, v, mask, sinks, out, partials, maxs, sums, p,
                                              aotc_smem);
    else
      sdpa_block<T, D, V, 2, SPLIT>(q, k, v, mask, sinks, out, partials, maxs, sums, p, aotc_smem);
  } else if constexpr (Cfg<T, D, V>::MT_MAX >= 4) {
    sdpa_block<T, D, V, 4, SPLIT>(q, k, v, mask, sinks, out, partials, maxs, sums, p, aotc_smem);
  }
  if constexpr (FUSED) {
    if (p.combiners_from > 0)
      publish_rows(flags, p, 16 * p.m_tiles);
    else
      merge_group<T, V, Cfg<T, D, V>::NT>(partials, maxs, sums, flags, sinks, out, p,
                                          16 * p.m_tiles, aotc_smem);
  }
}

// Drops a merged row's partials from L2 without writing them back: they are dead, and left
// dirty they cost the next kernel their write-back to DRAM. MLA B=8 leaves 16 MB of them, and
// the GEMM after it in a decode step ran 6 us slower for it (bench/NOTES.md round 16). Only
// lines wholly inside the row go: a neighbour row's combiner may still read the others.
__device__ __forceinline__ void discard_row(const void* row, long long bytes) {
  __syncthreads();  // every thread's loads of the row have returned
  const uintptr_t first = reinterpret_cast<uintptr_t>(row);
  const uintptr_t end = (first + bytes) & ~uintptr_t(127);
  for (uintptr_t line = ((first + 127) & ~uintptr_t(127)) + threadIdx.x * 128; line < end;
       line += blockDim.x * 128)
    asm volatile("discard.global.L2 [%0], 128;" ::"l"(line) : "memory");
}

// The combine kernel: one block per query row, of up to 512 threads (split groups of V / 4).
// Eight splits in flight per thread: sixteen took 99 registers and four waves of 256-thread
// blocks (bench/NOTES.md, round 12). Round 12's 55 registers are 80 now (76 reading T
// partials), six 128-thread blocks an SM: MLA B=8's 1024 rows take two waves. Capped at 64
// (one wave), the T partials' combine ran MLA B=8 N=8192 level, B=2-4 1.5-3% faster and B=1
// N=32768 1.6% slower (round 42).
// P: float (unnormalised partials), or T (each row O / l: half the bytes to store and to merge,
// for the seesaw's split passes; bench/NOTES.md round 42).
template <typename T, int V, typename P>
__device__ __forceinline__ void combine_entry(const P* __restrict__ partials,
                                              const float* __restrict__ maxs,
                                              const float* __restrict__ sums,
                                              const T* __restrict__ sinks, T* __restrict__ out,
                                              const CombineParams& p) {
  extern __shared__ __align__(16) char aotc_smem[];
  __shared__ float gm[64], gl[64];
  constexpr int U = kCombineSplitsInFlight;
  wait_for_previous_grid();  // the split pass's partials
  combine_row<T, V, U, false>(blockIdx.x, partials, maxs, sums, sinks, out, p.num_splits,
                              p.q_heads, p.q_len, p.has_sinks,
                              reinterpret_cast<float4*>(aotc_smem), gm, gl);
  discard_row(partials + blockIdx.x * (long long)p.num_splits * V,
              p.num_splits * V * (long long)sizeof(P));
}

}  // namespace aotc_sdpa

#define AOTC_SDPA_VECTOR_ENTRIES(PREFIX, TN, T, D, V, ROWS)                                    \
  extern "C" __global__ void __launch_bounds__(aotc_sdpa::Cfg<T, D, V>::NT,                    \
                                                aotc_sdpa::Cfg<T, D, V>::min_blocks(ROWS))     \
      PREFIX##TN##_##D##_##V(const T* q, const T* k, const T* v, const void* mask,              \
                             const T* sinks, T* out, const aotc_sdpa::Params p) {               \
    aotc_sdpa::sdpa_entry<T, D, V, false, false, ROWS>(q, k, v, mask, sinks, out, nullptr,      \
                                                       nullptr, nullptr, p);                    \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(aotc_sdpa::Cfg<T, D, V>::NT,                    \
                                                aotc_sdpa::Cfg<T, D, V>::min_blocks(ROWS))     \
      PREFIX##2pass_1_##TN##_##D##_##V(const T* q, const T* k, const T* v, const void* mask,    \
                                       const T* sinks, float* partials, float* maxs,            \
                                       float* sums, const aotc_sdpa::Params p) {                \
    aotc_sdpa::sdpa_entry<T, D, V, true, false, ROWS>(q, k, v, mask, sinks, nullptr, partials,  \
                                                      maxs, sums, p);                           \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(aotc_sdpa::Cfg<T, D, V>::NT,                    \
                                                aotc_sdpa::Cfg<T, D, V>::min_blocks(ROWS))     \
      PREFIX##2pass_fused_##TN##_##D##_##V(const T* q, const T* k, const T* v,                  \
                                           const void* mask, const T* sinks, float* scratch,    \
                                           T* out, const aotc_sdpa::Params p) {                 \
    const aotc_sdpa::FusedScratch s(scratch, p, V);                                             \
    aotc_sdpa::sdpa_entry<T, D, V, true, true, ROWS>(q, k, v, mask, sinks, out, s.partials,     \
                                                     s.maxs, s.sums, p, s.flags);               \
  }

// One (T, D, V): the one-m-tile entry points (sdpa_vector_..., the decode case: up to 16 query
// rows per KV head) and those of 2 or 4 m-tiles (sdpa_vector_rows_...).
#define AOTC_SDPA_VECTOR(TN, T, D, V)                  \
  AOTC_SDPA_VECTOR_ENTRIES(sdpa_vector_, TN, T, D, V, false) \
  AOTC_SDPA_VECTOR_ENTRIES(sdpa_vector_rows_, TN, T, D, V, true)

#define AOTC_SDPA_VECTOR_AGGREGATE(TN, T, V)                                               \
  extern "C" __global__ void __launch_bounds__(512) sdpa_vector_2pass_2_##TN##_##V(        \
      const float* partials, const float* maxs, const float* sums, const T* sinks, T* out, \
      const aotc_sdpa::CombineParams p) {                                                  \
    aotc_sdpa::combine_entry<T, V>(partials, maxs, sums, sinks, out, p);                   \
  }
// The combine of partials in T, each row O / l (the seesaw's split passes), 16-bit T.
#define AOTC_SDPA_VECTOR_AGGREGATE_T(TN, T, V)                                                \
  extern "C" __global__ void __launch_bounds__(512) sdpa_vector_2pass_2t_##TN##_##V(        \
      const T* partials, const float* maxs, const float* sums, const T* sinks, T* out,      \
      const aotc_sdpa::CombineParams p) {                                                   \
    static_assert(sizeof(T) == 2, "partials in T are 16-bit");                              \
    aotc_sdpa::combine_entry<T, V>(partials, maxs, sums, sinks, out, p);                    \
  }
