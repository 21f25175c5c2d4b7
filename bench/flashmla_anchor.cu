// aotc bench: deepseek-ai's FlashMLA, the anchor issue #6 names for MLA decode, timed as aotc's
// harness times its own kernels, so that both run on the same GPU in the same call.
//
// Built by bench/flashmla_anchor.sh against a FlashMLA checkout (its sm90 dense decode, bf16)
// and the CUTLASS its csrc/cutlass submodule pins; neither is part of aotc. It calls FlashMLA's
// three host functions as its csrc/api/dense_decode.h does (same params, strides, split
// buffers and scheduler arguments), without PyTorch.
//
// Usage: build/flashmla/fmla_bench [BxN ...]   e.g. 8x8192 1x32768 (default: the shapes below)
//
// MLA decode: bf16, 128 query heads on one latent KV head, D = 576, V = K's first 512 columns,
// one query token, not causal, scale 1/sqrt(576), 64-key pages in an identity block table.
// Per shape it prints the maximum relative error of a few output rows against a float64
// reference computed here, then the time per call (FlashMLA's split pass and combine, its
// scheduler run once before, as a serving step reuses it across layers; and with the
// scheduler in every call) as CUDA-graph replays of 20 calls cycling over as many input sets as
// aotc's bench_sdpa uses (bench.shapes.set_count), so that K is not served from L2.

#include <cuda_runtime.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <cutlass/bfloat16.h>
#include <cutlass/fast_math.h>

#include "params.h"
#include "utils.h"
#include "sm90/decode/dense/splitkv_mla.h"
#include "smxx/decode/get_decoding_sched_meta/get_decoding_sched_meta.h"
#include "smxx/decode/combine/combine.h"

#define CK(call)                                                                              \
    do {                                                                                      \
        cudaError_t e_ = (call);                                                              \
        if (e_ != cudaSuccess) {                                                              \
            fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__,   \
                    __LINE__, cudaGetErrorString(e_));                                        \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

// ---------------------------------------------------------------- deterministic input fill
__host__ __device__ inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Uniform in [-1, 1), rounded to bf16. Depends only on (seed, index).
__global__ void fill_uniform_bf16(__nv_bfloat16* p, size_t n, uint64_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t h = splitmix64(seed * 0xD1B54A32D192ED03ull + i);
        float u = (float)(h >> 40) * (1.0f / 16777216.0f);  // [0, 1), exact in fp32
        p[i] = __float2bfloat16_rn(2.0f * u - 1.0f);
    }
}

static inline double bf16_bits_to_double(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return (double)f;
}

// ---------------------------------------------------------------- PDL-under-capture probe
__global__ void probe_primary(int* c) {
    if (threadIdx.x == 0) atomicAdd(c, 1);
}
__global__ void probe_secondary(int* c) {
    cudaGridDependencySynchronize();
    if (threadIdx.x == 0) atomicAdd(c, 1);
}

// Capture primary (plain launch) + secondary/primary launched with cudaLaunchKernelEx and
// cudaLaunchAttributeProgrammaticStreamSerialization (as FlashMLA does), replay, check result.
static bool probe_pdl_capture(cudaStream_t stream, std::string& why) {
    int* d = nullptr;
    CK(cudaMalloc(&d, sizeof(int)));
    CK(cudaMemset(d, 0, sizeof(int)));
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {dim3(4), dim3(32), 0, stream, attr, 1};
    cudaGraph_t g = nullptr;
    cudaGraphExec_t ge = nullptr;
    bool ok = true;
    cudaError_t e = cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal);
    if (e != cudaSuccess) { why = std::string("BeginCapture: ") + cudaGetErrorString(e); ok = false; }
    if (ok) {
        for (int i = 0; i < 3 && e == cudaSuccess; ++i) {
            probe_primary<<<4, 32, 0, stream>>>(d);
            e = cudaGetLastError();
            if (e == cudaSuccess) e = cudaLaunchKernelEx(&cfg, probe_secondary, d);
            if (e == cudaSuccess) e = cudaLaunchKernelEx(&cfg, probe_primary, d);
        }
        if (e != cudaSuccess) { why = std::string("LaunchKernelEx(PDL) under capture: ") + cudaGetErrorString(e); ok = false; }
        cudaError_t e2 = cudaStreamEndCapture(stream, &g);
        if (ok && e2 != cudaSuccess) { why = std::string("EndCapture: ") + cudaGetErrorString(e2); ok = false; }
    }
    if (ok) {
        e = cudaGraphInstantiate(&ge, g, 0);
        if (e != cudaSuccess) { why = std::string("GraphInstantiate: ") + cudaGetErrorString(e); ok = false; }
    }
    if (ok) {
        e = cudaGraphLaunch(ge, stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
        if (e != cudaSuccess) { why = std::string("GraphLaunch: ") + cudaGetErrorString(e); ok = false; }
    }
    if (ok) {
        int h = -1;
        CK(cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost));
        if (h != 3 * 3 * 4) { why = "graph replay gave wrong count " + std::to_string(h); ok = false; }
    }
    if (ge) cudaGraphExecDestroy(ge);
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();  // clear any sticky-free error from the probe
    cudaStreamCaptureStatus st;
    if (cudaStreamIsCapturing(stream, &st) == cudaSuccess && st != cudaStreamCaptureStatusNone) {
        cudaGraph_t junk = nullptr;
        cudaStreamEndCapture(stream, &junk);
        if (junk) cudaGraphDestroy(junk);
        cudaGetLastError();
    }
    CK(cudaFree(d));
    return ok;
}

// ---------------------------------------------------------------- one shape
struct Result {
    double us_per_call = 0, us_per_call_with_meta = 0, max_rel_err = 0;
    int num_sm_parts = 0, sets = 1;
};

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static Result run_shape(int B, int N, int num_sms, bool use_graph, cudaStream_t stream) {
    // Problem constants
    const int h_q = 128, h_k = 1, d = 576, dv = 512, s_q = 1, page_block_size = 64;
    const float softmax_scale = 1.0f / sqrtf((float)d);
    const bool is_causal_in = false;

    const int max_num_blocks_per_seq = (N + page_block_size - 1) / page_block_size;
    const int num_blocks = B * max_num_blocks_per_seq;

    // ---- inputs (q: [B, s_q, h_q, d]; kcache: [num_blocks, page_block_size, h_k, d])
    const size_t q_elems = (size_t)B * s_q * h_q * d;
    const size_t k_elems = (size_t)num_blocks * page_block_size * h_k * d;
    // Input sets cycled call by call, as aotc's bench_sdpa does (bench.shapes.set_count): enough
    // that a call's K is mostly not in the 50 MiB L2 from the calls before it, at most 8.
    const double kv_bytes = (double)k_elems * 2;
    const int sets = std::max(1, std::min(8, (int)std::ceil(4.0 * 50 * 1048576 / kv_bytes)));
    __nv_bfloat16 *q = nullptr, *kcache = nullptr;
    CK(cudaMalloc(&q, q_elems * 2 * sets));
    CK(cudaMalloc(&kcache, k_elems * 2 * sets));
    fill_uniform_bf16<<<1024, 256, 0, stream>>>(q, q_elems * sets, 1234567ull + 1000003ull * B + N);
    CK(cudaGetLastError());
    fill_uniform_bf16<<<4096, 256, 0, stream>>>(kcache, k_elems * sets, 7654321ull + 1000003ull * B + N);
    CK(cudaGetLastError());

    std::vector<int> h_bt((size_t)B * max_num_blocks_per_seq), h_seqlens(B, N);
    for (int b = 0; b < B; ++b)
        for (int i = 0; i < max_num_blocks_per_seq; ++i)
            h_bt[(size_t)b * max_num_blocks_per_seq + i] = b * max_num_blocks_per_seq + i;
    int *block_table = nullptr, *seqlens_k = nullptr;
    CK(cudaMalloc(&block_table, h_bt.size() * sizeof(int)));
    CK(cudaMalloc(&seqlens_k, B * sizeof(int)));
    CK(cudaMemcpy(block_table, h_bt.data(), h_bt.size() * sizeof(int), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(seqlens_k, h_seqlens.data(), B * sizeof(int), cudaMemcpyHostToDevice));

    // ---- as in dense_attn_decode_interface
    bool is_causal = is_causal_in;
    if (s_q == 1) is_causal = false;
    const int num_q_heads_per_hk = h_q / h_k;
    const int q_seq_per_hk = s_q * num_q_heads_per_hk;
    const int num_heads = h_k;
    // q.view({B, s_q, h_k, qh_per_hk, d}).transpose(2, 3).reshape({B, q_seq_per_hk, h_k, d}):
    // for s_q == 1 (and h_k == 1) this is a view of the contiguous q.
    const int64_t q_batch_stride = (int64_t)s_q * h_q * d;
    const int64_t q_row_stride = d;
    const int64_t q_head_stride = (int64_t)num_q_heads_per_hk * d;
    const int num_sm_parts = std::max(num_sms / h_k / cutlass::ceil_div(s_q * h_q / h_k, 64), 1);

    // out: [B, h_k, q_seq_per_hk, dv] bf16; lse: [B, h_k, q_seq_per_hk] fp32
    __nv_bfloat16* out = nullptr;
    float* lse = nullptr;
    CK(cudaMalloc(&out, (size_t)B * num_heads * q_seq_per_hk * dv * 2));
    CK(cudaMalloc(&lse, (size_t)B * num_heads * q_seq_per_hk * sizeof(float)));

    // tile_scheduler_metadata: [num_sm_parts, sizeof(DecodingSchedMeta)/4] int32; num_splits: [B+1] int32
    DecodingSchedMeta* tile_scheduler_metadata = nullptr;
    int* num_splits = nullptr;
    CK(cudaMalloc(&tile_scheduler_metadata, (size_t)num_sm_parts * sizeof(DecodingSchedMeta)));
    CK(cudaMalloc(&num_splits, (size_t)(B + 1) * sizeof(int)));

    GetDecodeSchedMetaParams get_sched_meta_params = {
        B, s_q,
        64,
        5,
        -1, -1,
        nullptr, nullptr,
        seqlens_k,
        tile_scheduler_metadata,
        num_splits,
        num_sm_parts,
        stream
    };

    const int total_num_splits = B + num_sm_parts;
    float *lse_accum = nullptr, *out_accum = nullptr;
    // lse_accum: [total_num_splits, h_k, q_seq_per_hk]; out_accum: [total_num_splits, h_k, q_seq_per_hk, dv]
    CK(cudaMalloc(&lse_accum, (size_t)total_num_splits * num_heads * q_seq_per_hk * sizeof(float)));
    CK(cudaMalloc(&out_accum, (size_t)total_num_splits * num_heads * q_seq_per_hk * dv * sizeof(float)));

    // FlashMLA's params, in their declaration order. Strides in elements: kcache is contiguous
    // [num_blocks, 64, h_k, d], out contiguous [B, h_k, q_seq_per_hk, dv].
    DenseAttnDecodeParams params{
        .b = B, .s_q = s_q, .q_seq_per_hk = q_seq_per_hk, .d = d, .d_v = dv, .h_q = h_q,
        .h_k = h_k, .num_blocks = num_blocks, .q_head_per_hk = num_q_heads_per_hk,
        .is_causal = is_causal, .scale_softmax = softmax_scale,
        .scale_softmax_log2 = float(softmax_scale * M_LOG2E), .q_ptr = q, .k_ptr = kcache,
        .o_ptr = out, .softmax_lse_ptr = lse, .q_batch_stride = q_batch_stride,
        .k_batch_stride = (int64_t)page_block_size * h_k * d,
        .o_batch_stride = (int64_t)num_heads * q_seq_per_hk * dv, .q_row_stride = q_row_stride,
        .k_row_stride = (int64_t)h_k * d, .o_row_stride = dv, .q_head_stride = q_head_stride,
        .k_head_stride = d, .o_head_stride = (int64_t)q_seq_per_hk * dv,
        .block_table = block_table, .block_table_batch_stride = max_num_blocks_per_seq,
        .page_block_size = page_block_size, .seqlens_k_ptr = seqlens_k,
        .tile_scheduler_metadata_ptr = tile_scheduler_metadata, .num_sm_parts = num_sm_parts,
        .num_splits_ptr = num_splits, .total_num_splits = total_num_splits,
        .softmax_lseaccum_ptr = lse_accum, .oaccum_ptr = out_accum, .stream = stream};

    CombineParams combine_params = {
        B, s_q,
        h_q, dv,

        params.softmax_lse_ptr,
        params.o_ptr,
        num_heads * q_seq_per_hk, h_q,
        h_q * s_q * dv, h_q * dv, dv,

        params.softmax_lseaccum_ptr,
        params.oaccum_ptr,
        num_heads * q_seq_per_hk, h_q,
        h_q * s_q * dv, h_q * dv, dv,

        params.tile_scheduler_metadata_ptr,
        params.num_splits_ptr,
        params.num_sm_parts,

        nullptr,
        stream
    };

    auto call = [&](bool with_meta) {
        if (with_meta) smxx::decode::run_get_decoding_sched_meta_kernel(get_sched_meta_params);
        sm90::run_flash_splitkv_mla_kernel<cutlass::bfloat16_t>(params);
        smxx::decode::run_flash_mla_combine_kernel<cutlass::bfloat16_t>(combine_params);
    };

    // ---- correctness: one full call (sched meta + splitkv + combine)
    CK(cudaMemsetAsync(out, 0xFF, (size_t)B * num_heads * q_seq_per_hk * dv * 2, stream));  // NaN-fill
    call(true);
    CK(cudaStreamSynchronize(stream));
    CK(cudaGetLastError());

    Result res;
    res.num_sm_parts = num_sm_parts;
    res.sets = sets;
    {
        std::vector<uint16_t> hq(q_elems), hout((size_t)B * h_q * dv);
        CK(cudaMemcpy(hq.data(), q, q_elems * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hout.data(), out, hout.size() * 2, cudaMemcpyDeviceToHost));
        const int check_batches[2] = {0, B - 1};
        const int check_heads[3] = {0, 77, 127};
        const size_t seq_elems = (size_t)max_num_blocks_per_seq * page_block_size * h_k * d;
        std::vector<uint16_t> hk(seq_elems);
        std::vector<double> kd((size_t)N * d), sc(N), ref(dv);
        double max_abs_diff = 0, max_abs_ref = 0;
        bool bad = false;
        for (int bi = 0; bi < (B > 1 ? 2 : 1); ++bi) {
            const int b = check_batches[bi];
            // Blocks of batch b (identity table) are contiguous: copy them back.
            CK(cudaMemcpy(hk.data(), kcache + (size_t)b * seq_elems, seq_elems * 2, cudaMemcpyDeviceToHost));
            for (int t = 0; t < N; ++t) {
                const int blk = h_bt[(size_t)b * max_num_blocks_per_seq + t / page_block_size] - b * max_num_blocks_per_seq;
                const uint16_t* row = hk.data() + ((size_t)blk * page_block_size + t % page_block_size) * h_k * d;
                for (int c = 0; c < d; ++c) kd[(size_t)t * d + c] = bf16_bits_to_double(row[c]);
            }
            for (int hh : check_heads) {
                const uint16_t* qr = hq.data() + ((size_t)b * s_q * h_q + hh) * d;
                double qd[576];
                for (int c = 0; c < d; ++c) qd[c] = bf16_bits_to_double(qr[c]);
                double m = -INFINITY;
                for (int t = 0; t < N; ++t) {
                    const double* kr = kd.data() + (size_t)t * d;
                    double s = 0;
                    for (int c = 0; c < d; ++c) s += qd[c] * kr[c];
                    sc[t] = s * (double)softmax_scale;
                    m = std::max(m, sc[t]);
                }
                double denom = 0;
                std::fill(ref.begin(), ref.end(), 0.0);
                for (int t = 0; t < N; ++t) {
                    const double p = std::exp(sc[t] - m);
                    denom += p;
                    const double* kr = kd.data() + (size_t)t * d;
                    for (int c = 0; c < dv; ++c) ref[c] += p * kr[c];
                }
                // FlashMLA output for (b, s=0, head hh): out[b, h_k=0, q_seq_per_hk=hh, :]
                const uint16_t* orow = hout.data() + ((size_t)b * h_q + hh) * dv;
                for (int c = 0; c < dv; ++c) {
                    const double r = ref[c] / denom;
                    const double o = bf16_bits_to_double(orow[c]);
                    if (!std::isfinite(o)) bad = true;
                    max_abs_diff = std::max(max_abs_diff, std::fabs(o - r));
                    max_abs_ref = std::max(max_abs_ref, std::fabs(r));
                }
            }
        }
        res.max_rel_err = bad ? NAN : max_abs_diff / max_abs_ref;
    }

    // ---- timing
    const int kCallsPerGraph = 20, kWarmup = 5, kReplays = 20;
    std::vector<cudaEvent_t> ev0(kReplays), ev1(kReplays);
    for (int i = 0; i < kReplays; ++i) {
        CK(cudaEventCreate(&ev0[i]));
        CK(cudaEventCreate(&ev1[i]));
    }
    // Sched meta once per step (reused across layers); it is already computed above, recompute once anyway.
    smxx::decode::run_get_decoding_sched_meta_kernel(get_sched_meta_params);
    CK(cudaStreamSynchronize(stream));

    auto time_it = [&](bool with_meta) -> double {
        if (use_graph) {
            cudaGraph_t g;
            cudaGraphExec_t ge;
            CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
            for (int i = 0; i < kCallsPerGraph; ++i) {
                params.q_ptr = q + (size_t)(i % sets) * q_elems;
                params.k_ptr = kcache + (size_t)(i % sets) * k_elems;
                call(with_meta);
            }
            params.q_ptr = q;
            params.k_ptr = kcache;
            CK(cudaStreamEndCapture(stream, &g));
            CK(cudaGraphInstantiate(&ge, g, 0));
            for (int i = 0; i < kWarmup; ++i) CK(cudaGraphLaunch(ge, stream));
            CK(cudaStreamSynchronize(stream));
            for (int r = 0; r < kReplays; ++r) {
                CK(cudaEventRecord(ev0[r], stream));
                CK(cudaGraphLaunch(ge, stream));
                CK(cudaEventRecord(ev1[r], stream));
            }
            CK(cudaStreamSynchronize(stream));
            std::vector<double> t(kReplays);
            for (int r = 0; r < kReplays; ++r) {
                float ms;
                CK(cudaEventElapsedTime(&ms, ev0[r], ev1[r]));
                t[r] = ms * 1e3 / kCallsPerGraph;
            }
            CK(cudaGraphExecDestroy(ge));
            CK(cudaGraphDestroy(g));
            return median(t);
        } else {
            // Fallback: plain stream loop of 200 calls, 5 repetitions, median.
            const int kLoop = 200, kReps = 5;
            for (int i = 0; i < 20; ++i) call(with_meta);
            CK(cudaStreamSynchronize(stream));
            std::vector<double> t(kReps);
            for (int r = 0; r < kReps; ++r) {
                CK(cudaEventRecord(ev0[r], stream));
                for (int i = 0; i < kLoop; ++i) call(with_meta);
                CK(cudaEventRecord(ev1[r], stream));
                CK(cudaStreamSynchronize(stream));
                float ms;
                CK(cudaEventElapsedTime(&ms, ev0[r], ev1[r]));
                t[r] = ms * 1e3 / kLoop;
            }
            return median(t);
        }
    };
    res.us_per_call = time_it(false);
    res.us_per_call_with_meta = time_it(true);
    CK(cudaGetLastError());

    for (int i = 0; i < kReplays; ++i) {
        CK(cudaEventDestroy(ev0[i]));
        CK(cudaEventDestroy(ev1[i]));
    }
    CK(cudaFree(q)); CK(cudaFree(kcache)); CK(cudaFree(block_table)); CK(cudaFree(seqlens_k));
    CK(cudaFree(out)); CK(cudaFree(lse)); CK(cudaFree(tile_scheduler_metadata)); CK(cudaFree(num_splits));
    CK(cudaFree(lse_accum)); CK(cudaFree(out_accum));
    return res;
}

int main(int argc, char** argv) {
    std::vector<std::pair<int, int>> shapes;
    for (int i = 1; i < argc; ++i) {
        int B = 0, N = 0;
        char extra;
        if (sscanf(argv[i], "%dx%d%c", &B, &N, &extra) != 2 || B <= 0 || N <= 0) {
            fprintf(stderr, "usage: %s [BxN ...]   (e.g. %s 8x8192 1x32768)\n", argv[0], argv[0]);
            return 2;
        }
        shapes.push_back({B, N});
    }
    if (shapes.empty())
        shapes = {{1, 8192}, {8, 8192}, {1, 32768}, {8, 32768}, {4, 32768}, {16, 8192}, {64, 4096}, {128, 4096}};

    int dev = 0;
    CK(cudaSetDevice(dev));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, dev));
    int drv = 0, rt = 0;
    CK(cudaDriverGetVersion(&drv));
    CK(cudaRuntimeGetVersion(&rt));
    const int num_sms = prop.multiProcessorCount;  // Arch().num_sms in FlashMLA
    printf("# device: %s | SMs: %d | cc %d.%d | driver %d.%d | runtime %d.%d | FlashMLA 9241ae3 sm90 dense bf16 decode\n",
           prop.name, num_sms, prop.major, prop.minor, drv / 1000, (drv % 1000) / 10, rt / 1000, (rt % 1000) / 10);
    if (!(prop.major == 9 && prop.minor == 0)) {
        fprintf(stderr, "error: FlashMLA dense decode needs sm_90a (Hopper); this device is cc %d.%d\n", prop.major, prop.minor);
        return 1;
    }

    cudaStream_t stream;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

    std::string why;
    const bool use_graph = probe_pdl_capture(stream, why);
    if (use_graph)
        printf("# timing: CUDA graph of 20 calls (PDL launches captured OK), 5 warm-up replays, median of 20 replays / 20\n");
    else
        printf("# timing: FALLBACK plain stream loop of 200 calls (median of 5 loops) -- PDL stream capture failed: %s\n", why.c_str());
    printf("# h_q=128 h_kv=1 d=576 dv=512 s_q=1 page=64 causal=0 scale=1/sqrt(576) bf16; err rows: batches {0,B-1} x heads {0,77,127}\n");
    printf("# cols: B N us_per_call tflops max_rel_err num_sm_parts | us_per_call_incl_sched_meta tflops_incl_sched_meta\n");
    fflush(stdout);

    for (auto [B, N] : shapes) {
        Result r = run_shape(B, N, num_sms, use_graph, stream);
        const double flop = 2.0 * 128 * (double)N * B * (576 + 512);
        printf("%d %d %.2f %.1f %.3e %d | %.2f %.1f | sets=%d\n", B, N, r.us_per_call,
               flop / (r.us_per_call * 1e-6) / 1e12, r.max_rel_err, r.num_sm_parts,
               r.us_per_call_with_meta, flop / (r.us_per_call_with_meta * 1e-6) / 1e12, r.sets);
        fflush(stdout);
    }
    CK(cudaStreamDestroy(stream));
    return 0;
}
