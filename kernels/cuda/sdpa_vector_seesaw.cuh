// aotc: MLA decode on two warpgroups that take turns with the key tiles ("seesaw").
//
// sdpa_vector_wgmma.cuh's block runs S and the softmax of every tile on warpgroup 0 while
// warpgroups 1 and 2 multiply P V, so a tile costs S + softmax + P V with little overlap
// (bench/NOTES.md round 32). Here a block is 64 query rows and two warpgroups (256 threads, so
// each may keep ~250 registers without `setmaxnreg`, which relocatable builds ignore). Tile 2j
// (slot 0) is warpgroup 0's, tile 2j + 1 (slot 1) warpgroup 1's: each computes S and the
// softmax of its own tile, and each owns half of O (V / 2 columns). The two softmaxes of a pair
// chain through the running max in shared memory (0 first, then 1), and each warpgroup
// multiplies its own P from registers and the other's from shared memory by its half of V, so
// one warpgroup's softmax runs under the other's MMAs.
//
// V is K's prefix (MLA: v = k[..., :V]); tiles come by TMA, an mbarrier per column atom, and
// Q too where Lq divides 64 (else by cp.async). Each atom of a slot is requested again as soon
// as its last reader is done: V's first half by warpgroup 0 after its P V, V's second half and
// the columns past V by warpgroup 1 after its.
// Q's last column atom lives in registers (S's register-A form), and its shared memory holds
// warpgroup 1's P. The schedule is the one deepseek-ai's FlashMLA describes for its sm90 dense
// decode kernel; this code is aotc's own. O leaves through the slots' shared memory, a bulk
// copy a row (stage_o).
//
// Entry points: sdpa_vector_wgmma_seesaw_<TN>_<D>_<V>, the wgmma split pass's arguments
// (partials in T, each row O / l, with maxs and sums for the combine of such partials; its
// launch's own kernel is the two-deep split pass that stores them so, _t_partials), and
// sdpa_vector_wgmma_seesaw_one_<TN>_<D>_<V>, the one pass's (out, sinks applied); 256
// threads, one block an SM. The plan makes them the view alternatives of those launches
// (docs/ARCHITECTURE.md): only evaluation sees that V is K's prefix, and every tensor map (K,
// V, Q) must be encoded; other blocks trap.
#pragma once

#include "sdpa_vector_wgmma.cuh"

namespace aotc_sdpa {
namespace wg {

constexpr int kSeesawThreads = 256;
// Named barriers between the two warpgroups (each: one arrives, the other waits).
constexpr int kBarScale0 = 1;  // warpgroup 0's max and rescale factor of the pair are out
constexpr int kBarScale1 = 2;  // warpgroup 1's (the pair's max) are out
constexpr int kBarP0 = 3;      // warpgroup 0's P, at the pair's max, is in shared memory
constexpr int kBarP1 = 4;      // warpgroup 1's P is in shared memory and its P0 V is issued

template <int D, int V>
struct SeesawCfg {
  static constexpr int DA = D / 64, VA = V / 64, HA = VA / 2;  // atoms: row, V, half of V
  static constexpr int NV = V / 2;                             // O columns per warpgroup
  static constexpr int Q_BYTES = DA * kAtom;
  static constexpr int SLOT_BYTES = DA * kAtom;
  // Q, two slots, P0, four float rows (max, two rescale factors, sums), an mbarrier per atom
  // of each slot and Q's, alignment.
  static constexpr int SMEM = Q_BYTES + 2 * SLOT_BYTES + kAtom + 4 * kRows * 4 +
                              (2 * DA + 1) * 8 + 1024;
};

template <typename T, int D, int V>
__host__ __device__ constexpr bool seesaw_supported() {
  return !std::is_same<T, float>::value && D % 64 == 0 && V % 128 == 0 && V <= 512 && V < D &&
         SeesawCfg<D, V>::SMEM <= kSharedLimit;
}

// m64nNk16 with A (64 x 16) in registers: a thread's four 32-bit A registers hold rows
// (r, r + 8) x columns (2 quad, + 1) and (8 + 2 quad, + 1), as an accumulator's pairs do.
#define AOTC_WGMMA_RS_ASM(N, R, AB, IA0, IA1, IA2, IA3, IB, IS, IT)                         \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." AB "." AB " " AOTC_WG_REGS##R   \
               ", {%" #IA0 ", %" #IA1 ", %" #IA2 ", %" #IA3 "}, %" #IB ", p, 1, 1, %" #IT ";\n}\n" \
               : AOTC_WG_OUTS##R                                                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate), "n"(TB))
#define AOTC_WGMMA_RS_FN(N, R, ...)                                                            \
  template <bool BF16, int TB>                                                                 \
  __device__ __forceinline__ void wgmma_rs_m64n##N##k16(float(&d)[R], const uint32_t(&a)[4],  \
                                                        uint64_t db, int accumulate = 1) {     \
    if constexpr (BF16) AOTC_WGMMA_RS_ASM(N, R, "bf16", __VA_ARGS__);                         \
    else AOTC_WGMMA_RS_ASM(N, R, "f16", __VA_ARGS__);                                          \
  }
AOTC_WGMMA_RS_FN(64, 32, 32, 33, 34, 35, 36, 37, 38)
AOTC_WGMMA_RS_FN(128, 64, 64, 65, 66, 67, 68, 69, 70)
AOTC_WGMMA_RS_FN(192, 96, 96, 97, 98, 99, 100, 101, 102)
AOTC_WGMMA_RS_FN(256, 128, 128, 129, 130, 131, 132, 133, 134)
#undef AOTC_WGMMA_RS_FN
#undef AOTC_WGMMA_RS_ASM

template <bool BF16, int NV>
__device__ __forceinline__ void wgmma_rs_pv(float (&d)[NV / 2], const uint32_t (&a)[4],
                                            uint64_t db) {
  if constexpr (NV == 64) wgmma_rs_m64n64k16<BF16, 1>(d, a, db);
  else if constexpr (NV == 128) wgmma_rs_m64n128k16<BF16, 1>(d, a, db);
  else if constexpr (NV == 192) wgmma_rs_m64n192k16<BF16, 1>(d, a, db);
  else wgmma_rs_m64n256k16<BF16, 1>(d, a, db);
}

// `x` as a value the compiler cannot see through: descriptors built from it are built where
// used, not hoisted out of the tile loop into registers the O halves need.
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
  asm volatile("" : "+r"(x));
  return x;
}

// The seesaw block's shared memory and the views both warpgroups use.
template <int D, int V>
struct SeesawSmem {
  using C = SeesawCfg<D, V>;
  uint32_t q, slot0, p0, p1, bars;  // shared-window addresses
  char* gq;                          // Q's generic address (the rest by offset)
  float *m, *scale0, *scale1, *sums;
  __device__ explicit SeesawSmem(char* raw) {
    const uint32_t base = smem_u32(raw);
    q = (base + 1023) & ~1023u;
    gq = raw + (q - base);
    slot0 = q + C::Q_BYTES;
    p0 = slot0 + 2 * C::SLOT_BYTES;
    p1 = q + (C::DA - 1) * kAtom;  // Q's last atom, held in registers
    float* rows = reinterpret_cast<float*>(gq + (p0 + kAtom - q));
    m = rows;
    scale0 = rows + kRows;
    scale1 = rows + 2 * kRows;
    sums = rows + 3 * kRows;
    bars = smem_u32(rows + 4 * kRows);
  }
  __device__ uint32_t slot(int s) const { return slot0 + s * C::SLOT_BYTES; }
  __device__ uint32_t bar(int s, int atom) const { return bars + (s * C::DA + atom) * 8; }
  __device__ uint32_t qbar() const { return bars + 2 * C::DA * 8; }
};

// Atoms [A0, A1) of the K tile at key k0 into slot `s`, one box an atom, each on its mbarrier.
template <int A0, int A1, typename Smem>
__device__ __forceinline__ void seesaw_load(const Smem& sm, int s, const TensorMap* kmap, int k0,
                                            int kvh, int b) {
#pragma unroll
  for (int a = A0; a < A1; ++a) {
    mbar_arrive_expect(sm.bar(s, a), kAtom);
    tma_load_box(sm.slot(s) + a * kAtom, kmap, a * 64, k0, kvh, b, sm.bar(s, a),
                 l2_evict_first());
  }
}

// S += Q K^T over atoms [A0, A1) of slot `s` (fill parity `par`), each atom once it lands and
// as its own commit group; FIRST: S = instead of +=, by the first MMA's scale-d (zeroing S with
// other instructions while a P V is in flight makes ptxas serialise every wgmma, C7515). Q's
// last atom comes from registers (`rq`).
template <bool BF16, int DA, int A0, int A1, bool FIRST, typename Smem>
__device__ __forceinline__ void seesaw_s(float (&s)[32], const Smem& sm, int slot, int par,
                                         const uint32_t (&rq)[4][4]) {
  const uint64_t qd = sw128_desc(opaque(sm.q), 16, 1024);
  const uint64_t kd = sw128_desc(opaque(sm.slot(slot)), 16, 1024);
#pragma unroll
  for (int a = A0; a < A1; ++a) {
    mbar_wait(sm.bar(slot, a), par);
    wgmma_fence();
#pragma unroll
    for (int kk = 4 * a; kk < 4 * a + 4; ++kk) {
      const uint64_t off = ((kk >> 2) * kAtom + (kk & 3) * 32) >> 4;
      const int acc = FIRST && kk == 4 * A0 ? 0 : 1;
      if (a == DA - 1) wgmma_rs_m64n64k16<BF16, 0>(s, rq[kk & 3], kd + off, acc);
      else wgmma_m64n64k16<BF16, 0>(s, qd + off, kd + off, acc);
    }
    wgmma_commit();
  }
}

// O (this warpgroup's V / 2 columns) += P V(slot) with P in registers (`pa`: four k-steps).
template <bool BF16, int NV>
__device__ __forceinline__ void seesaw_pv_regs(float (&o)[NV / 2], const uint32_t (&pa)[4][4],
                                               uint32_t vcols) {
  const uint64_t vd = sw128_desc(opaque(vcols), kAtom, 1024);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) wgmma_rs_pv<BF16, NV>(o, pa[kk], vd + ((kk * 2048) >> 4));
  wgmma_commit();
}

// The same with P from shared memory (the other warpgroup's, swizzled 64 x 64 at `p`).
template <bool BF16, int NV>
__device__ __forceinline__ void seesaw_pv_smem(float (&o)[NV / 2], uint32_t p, uint32_t vcols) {
  const uint64_t pd = sw128_desc(opaque(p), 16, 1024);
  const uint64_t vd = sw128_desc(opaque(vcols), kAtom, 1024);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk)
    wgmma_pv<BF16, NV>(o, pd + ((kk * 32) >> 4), vd + ((kk * 2048) >> 4));
  wgmma_commit();
}

// Row h's max over this thread's scores, across its quad.
__device__ __forceinline__ float quad_row_max(const float (&s)[32], int h) {
  float x = -INFINITY;
#pragma unroll
  for (int n = 0; n < 8; ++n) x = fmaxf(x, fmaxf(s[4 * n + 2 * h], s[4 * n + 2 * h + 1]));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// P = 2^(s - m) of row h (m the running max, -inf -> 0) in place; returns this thread's sum.
__device__ __forceinline__ float exp_row(float (&s)[32], int h, float m) {
  const float mu = m == -INFINITY ? 0.f : m;
  float sum = 0.f;
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    s[4 * n + 2 * h] = fast_exp2(s[4 * n + 2 * h] - mu);
    s[4 * n + 2 * h + 1] = fast_exp2(s[4 * n + 2 * h + 1] - mu);
    sum += s[4 * n + 2 * h] + s[4 * n + 2 * h + 1];
  }
  return sum;
}

// P (accumulator layout, times f[h] per row) as register-A operands of four k-steps.
template <typename T>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[4][4], const float (&s)[32], float f0,
                                       float f1) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    pa[kk][0] = pack2<T>(s[8 * kk] * f0, s[8 * kk + 1] * f0);
    pa[kk][1] = pack2<T>(s[8 * kk + 2] * f1, s[8 * kk + 3] * f1);
    pa[kk][2] = pack2<T>(s[8 * kk + 4] * f0, s[8 * kk + 5] * f0);
    pa[kk][3] = pack2<T>(s[8 * kk + 6] * f1, s[8 * kk + 7] * f1);
  }
}

// Register-A operands into the swizzled 64 x 64 P at `gp` (rows wrow, wrow + 8).
__device__ __forceinline__ void store_p(char* gp, const uint32_t (&pa)[4][4], int wrow,
                                        int quad) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = wrow + 8 * (j & 1), n = 2 * kk + (j >> 1);  // chunk n: keys 8n..8n+7
      *reinterpret_cast<uint32_t*>(gp + r * 128 + ((n ^ (r & 7)) << 4) + quad * 4) = pa[kk][j];
    }
}

// ONE: the block is its row group's only split and writes `out` (sinks applied) in place of
// partials for the combine.
template <typename T, int D, int V, bool ONE>
__device__ __forceinline__ void seesaw_block(const T* __restrict__ q, const T* __restrict__ k,
                                             const void* __restrict__ mask,
                                             const T* __restrict__ sinks, T* __restrict__ out,
                                             float* __restrict__ partials,
                                             float* __restrict__ maxs, float* __restrict__ sums,
                                             const WParams& wp, char* smem_raw) {
  using C = SeesawCfg<D, V>;
  constexpr bool BF16 = std::is_same<T, __nv_bfloat16>::value;
  constexpr int NV = C::NV, DA = C::DA, HA = C::HA;
  const Params& p = wp.p;
  const int tid = threadIdx.x, wg = tid >> 7, lt = tid & 127, lane = tid & 31;
  const int quad = lane & 3;
  const int wrow = (lt >> 5) * 16 + (lane >> 2);  // this thread's rows: wrow, wrow + 8
  const BlockWork w = block_work(p);
  const int split = w.split, kvh = w.kvh, b = w.b, S = p.num_splits;
  const int R = p.q_heads / p.kv_heads * p.q_len;
  const int row0 = w.rg * kRows, key_begin = w.key_begin, key_end = w.key_end;
  const int tiles = cdiv(key_end - key_begin, kKeys), pairs = cdiv(tiles, 2);
  const SeesawSmem<D, V> sm(smem_raw);
  const TensorMap* const kmap = &wp.maps[0];

  if (tid <= 2 * DA) mbar_init(sm.bars + tid * 8, 1);
  if (tid < kRows) sm.m[tid] = -INFINITY;
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncthreads();
  // Q by TMA where its boxes (64 columns x Lq tokens x 64 / Lq heads) hold whole row groups
  // (Lq divides 64), else by cp.async (speculative decoding's 3, 5, 6 or 7 tokens).
  const bool q_tma = kRows % p.q_len == 0;
  if (tid == 0) {
    // Q's boxes, then tiles 0 and 1 (1 may lie past the split: masked, and zeros past the
    // array).
    if (q_tma) load_q_boxes<DA>(sm.q, wp, sm.qbar(), kvh, row0, b);
    seesaw_load<0, DA>(sm, 0, kmap, key_begin, kvh, b);
    seesaw_load<0, DA>(sm, 1, kmap, key_begin + kKeys, kvh, b);
  }
  if (q_tma) {
    mbar_wait(sm.qbar(), 0);
  } else {
    stage_q<T, D, kSeesawThreads>(sm.q, sm.gq, q, p, b, kvh, row0, R);
    cp_async_commit();
    cp_async_wait<0>();
    fence_async_shared();  // generic-proxy writes, read by wgmma
    __syncthreads();
  }
  // Q's last atom into registers (A fragments of four k-steps), then its shared memory is P1's.
  uint32_t rq[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = wrow + 8 * (j & 1), c = 16 * kk + 8 * (j >> 1) + 2 * quad;  // column in atom
      rq[kk][j] = *reinterpret_cast<const uint32_t*>(
          sm.gq + (DA - 1) * kAtom + r * 128 + (((c >> 3) ^ (r & 7)) << 4) + (c & 7) * 2);
    }
  __syncthreads();

  const float scale2 = p.scale * kLog2e;
  // The rows' mask facts, worked out where a tile needs them, not kept: registers are short.
  auto rows = [&] { return row_facts(p, b, kvh, row0 + wrow, R); };
  char* const gp0 = sm.gq + (sm.p0 - sm.q);
  char* const gp1 = sm.gq + (sm.p1 - sm.q);
  float o[NV / 2];
#pragma unroll
  for (int i = 0; i < NV / 2; ++i) o[i] = 0.f;
  float l[2] = {0.f, 0.f};
  float s[32];
  uint32_t pa[4][4];
  // Each warpgroup's first S: tile wg in slot wg.
  seesaw_s<BF16, DA, 0, DA, true>(s, sm, wg, 0, rq);
  wgmma_wait<0>();
  fence_regs(s);
  const uint32_t vhalf = wg * HA * kAtom;  // this warpgroup's half of V in a slot

  // A pair's body is compiled four times: with the next pair's loads and S (MORE) and
  // without, MORE in a call with no mask (FAST: both tiles are whole, so the scores need only
  // their scale, and the hot loop holds no mask code: 1.5-3% faster, bench/NOTES.md round 40),
  // and the last pair without its second tile (HALF). Chosen where no MMA is in flight: a
  // branch among the MMAs made ptxas serialise every wgmma (C7515).
  auto scores = [&](auto fast, int k0) {
    if constexpr (decltype(fast)::value) {
#pragma unroll
      for (int e = 0; e < 32; ++e) s[e] *= scale2;
    } else {
      scores_log2<T>(s, p, mask, rows, k0, key_end, quad, scale2);
    }
  };
  auto wg0_pair = [&](int j, auto more, auto fast, auto half) {
    constexpr bool MORE = decltype(more)::value, HALF = decltype(half)::value;
    const int k0 = key_begin + 2 * j * kKeys;  // tile 2j's first key
    const int npar = (j + 1) & 1;              // the fill parity of the next pair's tiles
    // ---- tile 2j's softmax; P0 V0 (own half); rescale to the pair's max; P1 V1.
    scores(fast, k0);
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_old = sm.m[wrow + 8 * h];
      const float m_new = fmaxf(m_old, quad_row_max(s, h));
      alpha[h] = fast_exp2(m_old - (m_new == -INFINITY ? 0.f : m_new));
      l[h] = l[h] * alpha[h] + exp_row(s, h, m_new);
      __syncwarp();
      if (quad == 0) {
        sm.m[wrow + 8 * h] = m_new;
        sm.scale0[wrow + 8 * h] = alpha[h];
      }
    }
    bar_arrive<kBarScale0, kSeesawThreads>();
    rescale<NV>(o, alpha[0], alpha[1]);
    pack_p<T>(pa, s, 1.f, 1.f);
    seesaw_pv_regs<BF16, NV>(o, pa, sm.slot(0) + vhalf);
    if constexpr (HALF) {  // no tile 2j + 1: P0 is at the pair's max already
      bar_sync<kBarScale1, kSeesawThreads>();  // warpgroup 1's last P0 V0 is done with P0
      store_p(gp0, pa, wrow, quad);
      fence_async_shared();
      bar_arrive<kBarP0, kSeesawThreads>();
      bar_sync<kBarP1, kSeesawThreads>();  // (as a whole pair: both pass the same barriers)
      wgmma_wait<0>();
      fence_regs(o);
      return;
    }
    wgmma_wait<0>();
    fence_regs(o);
    bar_sync<kBarScale1, kSeesawThreads>();  // tile 2j + 1's max: the pair's
    if (MORE && lt == 0) seesaw_load<0, HA>(sm, 0, kmap, k0 + 2 * kKeys, kvh, b);
    const float f0 = sm.scale1[wrow], f1 = sm.scale1[wrow + 8];
    pack_p<T>(pa, s, f0, f1);
    store_p(gp0, pa, wrow, quad);
    fence_async_shared();
    bar_arrive<kBarP0, kSeesawThreads>();
    bar_sync<kBarP1, kSeesawThreads>();  // P1 is in shared memory
    rescale<NV>(o, f0, f1);
    l[0] *= f0;
    l[1] *= f1;
    seesaw_pv_smem<BF16, NV>(o, sm.p1, sm.slot(1) + vhalf);
    if constexpr (MORE) {
      seesaw_s<BF16, DA, 0, HA, true>(s, sm, 0, npar, rq);
      wgmma_wait<HA>();  // P1 V1 is done with slot 1's first half
      if (lt == 0) seesaw_load<0, HA>(sm, 1, kmap, k0 + 3 * kKeys, kvh, b);
      seesaw_s<BF16, DA, HA, DA, false>(s, sm, 0, npar, rq);
    }
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs(s);
  };
  auto wg1_pair = [&](int j, auto more, auto fast, auto half) {
    constexpr bool MORE = decltype(more)::value, HALF = decltype(half)::value;
    const int k0 = key_begin + 2 * j * kKeys;  // tile 2j's first key
    const int npar = (j + 1) & 1;              // the fill parity of the next pair's tiles
    // ---- tile 2j + 1's softmax at the pair's max; P1 V1 (own half); P0 V0.
    bar_sync<kBarScale0, kSeesawThreads>();
    if constexpr (HALF) {  // no tile 2j + 1: O to tile 2j's max, then P0 V0
      const float f0 = sm.scale0[wrow], f1 = sm.scale0[wrow + 8];
      bar_arrive<kBarScale1, kSeesawThreads>();
      rescale<NV>(o, f0, f1);
      l[0] *= f0;
      l[1] *= f1;
      bar_sync<kBarP0, kSeesawThreads>();
      seesaw_pv_smem<BF16, NV>(o, sm.p0, sm.slot(0) + vhalf);
      bar_arrive<kBarP1, kSeesawThreads>();
      wgmma_wait<0>();
      fence_regs(o);
      return;
    }
    scores(fast, k0 + kKeys);
    float f[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_old = sm.m[wrow + 8 * h];  // after tile 2j
      const float m_new = fmaxf(m_old, quad_row_max(s, h));
      const float a = fast_exp2(m_old - (m_new == -INFINITY ? 0.f : m_new));
      f[h] = a * sm.scale0[wrow + 8 * h];  // O was at the max before tile 2j
      l[h] = l[h] * f[h] + exp_row(s, h, m_new);
      __syncwarp();
      if (quad == 0) {
        sm.m[wrow + 8 * h] = m_new;
        sm.scale1[wrow + 8 * h] = a;
      }
    }
    bar_arrive<kBarScale1, kSeesawThreads>();
    rescale<NV>(o, f[0], f[1]);
    pack_p<T>(pa, s, 1.f, 1.f);
    store_p(gp1, pa, wrow, quad);
    seesaw_pv_regs<BF16, NV>(o, pa, sm.slot(1) + vhalf);
    fence_async_shared();
    bar_sync<kBarP0, kSeesawThreads>();
    seesaw_pv_smem<BF16, NV>(o, sm.p0, sm.slot(0) + vhalf);
    bar_arrive<kBarP1, kSeesawThreads>();
    if constexpr (MORE) {
      wgmma_wait<1>();  // P1 V1 is done with slot 1's second half
      if (lt == 0) seesaw_load<HA, DA>(sm, 1, kmap, k0 + 3 * kKeys, kvh, b);
      wgmma_wait<0>();  // P0 V0 is done with slot 0's second half
      if (lt == 0) seesaw_load<HA, DA>(sm, 0, kmap, k0 + 2 * kKeys, kvh, b);
      seesaw_s<BF16, DA, HA, DA, true>(s, sm, 1, npar, rq);
      seesaw_s<BF16, DA, 0, HA, false>(s, sm, 1, npar, rq);
    }
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs(s);
  };
  const bool unmasked = p.mask_kind == 0;
  // The last pair of an odd tile count has no second tile (HALF): its S (on keys past the
  // split, masked) was issued with the loads, but its softmax and both P1 V1 are skipped.
  const bool half = tiles & 1;
  using Yes = std::true_type;
  using No = std::false_type;
  auto pair_body = [&](auto body, int j) {  // body(j, MORE, FAST, HALF)
    if (j + 1 < pairs && unmasked) body(j, Yes{}, Yes{}, No{});
    else if (j + 1 < pairs) body(j, Yes{}, No{}, No{});
    else if (half) body(j, No{}, No{}, Yes{});
    else body(j, No{}, No{}, No{});
  };
  for (int j = 0; j < pairs; ++j) {
    if (wg == 0) pair_body(wg0_pair, j);
    else pair_body(wg1_pair, j);
  }

  // ---- the split's rows: O halves at the final max; sums of both warpgroups' P.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  if (wg == 1 && quad == 0) {
    sm.sums[wrow] = l[0];
    sm.sums[wrow + 8] = l[1];
  }
  __syncthreads();  // (also: every warpgroup's last update of the running max)
  // Each row's sum, or with one split its output scale (the combine's for one split, sinks
  // included, over scale0).
  if (wg == 0 && quad == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wrow + 8 * h;
      if constexpr (ONE)
        sm.scale0[r] = one_split_scale(p, sinks, kvh, row0 + r, R, sm.m[r], l[h] + sm.sums[r]);
      else
        sm.sums[r] += l[h];
    }
  }
  __syncthreads();
  // O leaves through the slots' shared memory, free now (stage_o).
  static_assert(kStageBytes<T, V> <= 2 * C::SLOT_BYTES, "O's staging must fit the two slots");
  // One split: O scaled to the output (scale0); else partials in T, O / l (partial_scale).
  const float f0 = ONE ? sm.scale0[wrow] : partial_scale(sm.sums[wrow]);
  const float f1 = ONE ? sm.scale0[wrow + 8] : partial_scale(sm.sums[wrow + 8]);
  stage_o<T, T, V>(sm.gq + (sm.slot(0) - sm.q), o, wrow, quad, wg * NV, f0, f1);
  fence_async_shared();  // generic-proxy writes, read by the bulk copies
  __syncthreads();
  const int rr = row0 + tid;
  if (tid < kRows && rr < R) {
    const long long row = out_row(p, b, kvh, rr);
    if constexpr (ONE) {
      copy_staged_row<T, V>(out + row * V, sm.slot(0), tid);
    } else {
      maxs[row * S + split] = sm.m[tid];
      sums[row * S + split] = sm.sums[tid];
      copy_staged_row<T, V>(reinterpret_cast<T*>(partials) + (row * S + split) * V, sm.slot(0),
                            tid);
    }
  }
}

template <typename T, int D, int V, bool ONE>
__device__ __forceinline__ void seesaw_entry(const T* q, const T* k, const void* mask,
                                             const T* sinks, T* out, float* partials, float* maxs,
                                             float* sums, const WParams& p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (seesaw_supported<T, D, V>()) {
    extern __shared__ __align__(1024) char aotc_ss_smem[];
    uint32_t dyn;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    const unsigned need = kAllMaps | kQMap;
    if (dyn < (uint32_t)SeesawCfg<D, V>::SMEM || blockDim.x != kSeesawThreads ||
        (p.maps_ok & need) != need || (ONE && p.p.num_splits != 1) ||
        !bulk_aligned(ONE ? (void*)out : (void*)partials))
      __trap();  // (O's bulk copies need a 16-byte aligned output, as allocators give)
    // The combine may launch at once where the launcher overlaps it (the torch harness): its
    // blocks take idle SMs and wait in-kernel. MLA's split plans ran up to 2.4% faster so
    // (bench/NOTES.md round 43); a no-op in a plain launch (MLX's plans).
    if constexpr (!ONE) allow_next_grid();
    prefetch_maps(p);
    seesaw_block<T, D, V, ONE>(q, k, mask, sinks, out, partials, maxs, sums, p, aotc_ss_smem);
    return;
  }
#endif
  __trap();  // no wgmma here: the plan only picks this kernel from an sm_90a image
}

}  // namespace wg
}  // namespace aotc_sdpa

#define AOTC_SDPA_VECTOR_WGMMA_SEESAW(TN, T, D, V)                                                \
  extern "C" __global__ void __launch_bounds__(256, 1) sdpa_vector_wgmma_seesaw_##TN##_##D##_##V( \
      const T* q, const T* k, const T* v, const void* mask, const T* sinks, float* partials,    \
      float* maxs, float* sums, const __grid_constant__ aotc_sdpa::wg::WParams p) {             \
    aotc_sdpa::wg::seesaw_entry<T, D, V, false>(q, k, mask, nullptr, nullptr, partials, maxs,   \
                                                sums, p);                                       \
  }
// One split a row group: the block writes the output itself, sinks applied.
#define AOTC_SDPA_VECTOR_WGMMA_SEESAW_ONE(TN, T, D, V)                                           \
  extern "C" __global__ void __launch_bounds__(256, 1)                                           \
      sdpa_vector_wgmma_seesaw_one_##TN##_##D##_##V(const T* q, const T* k, const T* v,          \
                                                    const void* mask, const T* sinks, T* out,    \
                                                    const __grid_constant__ aotc_sdpa::wg::WParams p) { \
    aotc_sdpa::wg::seesaw_entry<T, D, V, true>(q, k, mask, sinks, out, nullptr, nullptr, nullptr, \
                                               p);                                              \
  }
