// aotc's CUDA launch primitive (see cuda_launch.h). Compiled only when MLX has
// a CUDA backend.
//
// It uses the CUDA driver API only (libcuda.so.1, which MLX links too): MLX
// links the CUDA runtime statically, so the runtime's symbols are not there for
// an extension to share, and a second copy of the runtime is not needed.
#include "cuda_launch.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <shared_mutex>
#include <typeinfo>
#include <unordered_map>

#include <cuda.h>

#include "mlx/allocator.h"
#include "mlx/backend/cuda/cuda.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"
#include "mlx/ops.h"

namespace aotc {

namespace mx = mlx::core;
namespace cu = mlx::core::cu;

namespace {

constexpr int kMaxDevices = 64;

[[noreturn]] void fail_invalid(const std::string& msg) {
  throw std::invalid_argument("[aotc.cuda_launch] " + msg);
}

std::string describe(CUresult r) {
  const char* name = nullptr;
  const char* text = nullptr;
  cuGetErrorName(r, &name);
  cuGetErrorString(r, &text);
  return std::string(name ? name : "CUDA error ") + std::to_string(int(r)) +
      (text ? std::string(": ") + text : std::string());
}

void check(CUresult r, const char* what) {
  if (r != CUDA_SUCCESS) {
    throw std::runtime_error(
        std::string("[aotc.cuda_launch] ") + what + " failed: " + describe(r));
  }
}

// ------------------------------------------------------------------ modules
// and kernels

using ParamInfoFn = CUresult (*)(CUfunction, size_t, size_t*, size_t*);

// cuFuncGetParamInfo (driver 12.4+), looked up at run time so that an older
// driver still loads the extension (it then skips the parameter-list check).
ParamInfoFn param_info_fn() {
  static ParamInfoFn fn = []() -> ParamInfoFn {
#if CUDA_VERSION >= 12000
    void* p = nullptr;
    CUdriverProcAddressQueryResult found;
    if (cuGetProcAddress(
            "cuFuncGetParamInfo",
            &p,
            12040,
            CU_GET_PROC_ADDRESS_DEFAULT,
            &found) == CUDA_SUCCESS &&
        found == CU_GET_PROC_ADDRESS_SUCCESS) {
      return reinterpret_cast<ParamInfoFn>(p);
    }
#endif
    return nullptr;
  }();
  return fn;
}

struct Kernel {
  CUfunction func{nullptr};
  int num_params{-1}; // -1: the driver cannot tell
  size_t params_size{
      0}; // bytes of the last parameter (Params) when num_params > 0
  std::atomic<uint32_t> smem_allowed{
      0}; // dynamic shared memory opted in so far
  std::mutex attr_mutex;
};

struct DeviceModule {
  CUmodule module{
      nullptr}; // never unloaded: CUDA graphs may still use its functions
  std::shared_mutex mutex;
  std::unordered_map<std::string, std::unique_ptr<Kernel>> kernels;
};

struct Modules {
  std::mutex load_mutex;
  std::array<std::atomic<DeviceModule*>, kMaxDevices> by_device{};
  ~Modules() {
    for (auto& m : by_device) {
      delete m.load();
    }
  }
};

} // namespace

struct CudaImageAccess {
  static Modules& modules(CudaImage& image) {
    std::call_once(
        image.once_, [&] { image.modules_ = std::make_shared<Modules>(); });
    return *static_cast<Modules*>(image.modules_.get());
  }
};

namespace {

DeviceModule& device_module(CudaImage& image, cu::Device& dev) {
  int d = dev.cuda_device();
  if (d < 0 || d >= kMaxDevices) {
    throw std::runtime_error(
        "[aotc.cuda_launch] CUDA device index out of range");
  }
  auto& mods = CudaImageAccess::modules(image);
  if (auto* m = mods.by_device[d].load(std::memory_order_acquire)) {
    return *m;
  }
  std::lock_guard lock(mods.load_mutex);
  if (auto* m = mods.by_device[d].load(std::memory_order_acquire)) {
    return *m;
  }
  dev.make_current(); // the device's primary context, as MLX uses it
  char log[4096] = {};
  CUjit_option options[] = {
      CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
  void* values[] = {log, reinterpret_cast<void*>(sizeof(log) - 1)};
  auto m = std::make_unique<DeviceModule>();
  CUresult r =
      cuModuleLoadDataEx(&m->module, image.data().data(), 2, options, values);
  if (r != CUDA_SUCCESS) {
    std::string msg = "loading the aotc fatbin (" +
        std::to_string(image.data().size()) + " bytes) on CUDA device " +
        std::to_string(d) + " (sm_" +
        std::to_string(dev.compute_capability_major()) +
        std::to_string(dev.compute_capability_minor()) +
        ") failed: " + describe(r);
    if (r == CUDA_ERROR_NO_BINARY_FOR_GPU) {
      msg +=
          " (the fatbin has neither SASS for this GPU nor PTX it can compile)";
    }
    if (log[0]) {
      msg += "; JIT log: " + std::string(log);
    }
    throw std::runtime_error("[aotc.cuda_launch] " + msg);
  }
  auto* raw = m.release();
  mods.by_device[d].store(raw, std::memory_order_release);
  return *raw;
}

Kernel&
find_kernel(CudaImage& image, cu::Device& dev, const std::string& name) {
  auto& dm = device_module(image, dev);
  {
    std::shared_lock lock(dm.mutex);
    if (auto it = dm.kernels.find(name); it != dm.kernels.end()) {
      return *it->second;
    }
  }
  std::unique_lock lock(dm.mutex);
  if (auto it = dm.kernels.find(name); it != dm.kernels.end()) {
    return *it->second;
  }
  auto k = std::make_unique<Kernel>();
  CUresult r = cuModuleGetFunction(&k->func, dm.module, name.c_str());
  if (r == CUDA_ERROR_NOT_FOUND) {
    fail_invalid(
        "the aotc fatbin has no kernel named '" + name +
        "' (kernels are extern \"C\" entry points named as in the library's index)");
  }
  check(r, "cuModuleGetFunction");
  if (auto info = param_info_fn()) {
    size_t offset = 0, size = 0;
    int n = 0;
    while (info(k->func, n, &offset, &size) == CUDA_SUCCESS) {
      k->params_size = size;
      ++n;
    }
    k->num_params = n;
  }
  return *dm.kernels.emplace(name, std::move(k)).first->second;
}

// ------------------------------------------------------------------ output
// buffers

enum AllocMode : int { kPool = 0, kMlx = 1 };

std::atomic<int>& alloc_mode() {
  static std::atomic<int> mode = [] {
    const char* env = std::getenv("AOTC_CUDA_ALLOC");
    return (env && std::string(env) == "mlx") ? kMlx : kPool;
  }();
  return mode;
}

struct Pools {
  std::mutex mutex;
  std::array<std::atomic<CUmemoryPool>, kMaxDevices> pool{};
};

Pools& pools() {
  static auto* p =
      new Pools; // leaked: buffers may be freed during interpreter teardown
  return *p;
}

CUmemoryPool device_pool(int device) {
  auto& ps = pools();
  if (auto p = ps.pool[device].load(std::memory_order_acquire)) {
    return p;
  }
  std::lock_guard lock(ps.mutex);
  if (auto p = ps.pool[device].load(std::memory_order_acquire)) {
    return p;
  }
  CUmemPoolProps props = {};
  props.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
  props.handleTypes = CU_MEM_HANDLE_TYPE_NONE;
  props.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  props.location.id = device;
  CUmemoryPool p = nullptr;
  check(cuMemPoolCreate(&p, &props), "cuMemPoolCreate");
  // Keep freed memory in the pool across synchronizations (the driver's default
  // releases it at each one, and every decode step would map memory again).
  cuuint64_t keep = ~cuuint64_t(0);
  check(
      cuMemPoolSetAttribute(p, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &keep),
      "cuMemPoolSetAttribute");
  ps.pool[device].store(p, std::memory_order_release);
  return p;
}

// Output buffers that are no longer used, per device: reused before the pool is
// asked again, so that a decode step costs no driver call for its outputs. A
// buffer comes back here only once no array refers to it; eval_gpu registers
// every output with the encoder as a temporary, so that is after the GPU work
// that used it has completed, and it can serve any stream.
struct FreeBuffers {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<void*>> by_size;
  size_t bytes{0};
};

std::array<FreeBuffers, kMaxDevices>& free_buffers() {
  static auto* f =
      new std::array<FreeBuffers, kMaxDevices>; // leaked, as the pools
  return *f;
}

size_t cache_limit() {
  static size_t limit = [] {
    const char* env = std::getenv("AOTC_CUDA_CACHE_MB");
    return size_t(env ? std::strtoull(env, nullptr, 10) : 512) << 20;
  }();
  return limit;
}

// Sizes are rounded as MLX's allocator rounds them, so that buffers are found
// again.
size_t rounded_size(size_t n) {
  constexpr size_t page = 16384;
  if (n <= page) {
    size_t p = 256;
    while (p < n) {
      p <<= 1;
    }
    return p;
  }
  return page * ((n + page - 1) / page);
}

void release_to_pool(int device, void* data) {
  cu::device(device).make_current();
  cuMemFreeAsync(reinterpret_cast<CUdeviceptr>(data), CU_STREAM_PER_THREAD);
}

// The deleter of aotc's output buffers.
void free_output(mx::allocator::Buffer b) {
  auto* buf = static_cast<cu::CudaBuffer*>(b.ptr());
  if (!buf) {
    return;
  }
  if (buf->data) {
    try {
      if (buf->device >= 0) {
        auto& f = free_buffers()[buf->device];
        std::unique_lock lock(f.mutex);
        if (f.bytes + buf->size <= cache_limit()) {
          f.by_size[buf->size].push_back(buf->data);
          f.bytes += buf->size;
        } else {
          lock.unlock();
          release_to_pool(buf->device, buf->data);
        }
      } else {
        // MLX moved the data to unified memory (a host read of the array, see
        // CudaAllocator::move_to_unified_memory) and freed our device memory;
        // free the unified memory the way MLX allocated it.
        auto ptr = reinterpret_cast<CUdeviceptr>(buf->data);
        unsigned int managed = 0;
        cuPointerGetAttribute(&managed, CU_POINTER_ATTRIBUTE_IS_MANAGED, ptr);
        if (managed) {
          cuMemFree(ptr);
        } else {
          cuMemFreeHost(buf->data);
        }
      }
    } catch (...) {
      // A deleter must not throw (the process may be shutting down).
    }
  }
  delete buf;
}

mx::allocator::Data alloc_output(size_t nbytes, cu::CommandEncoder& enc) {
  auto& dev = enc.device();
  if (alloc_mode().load(std::memory_order_relaxed) == kMlx ||
      !dev.memory_pools()) {
    return mx::allocator::malloc(nbytes);
  }
  if (nbytes == 0) {
    return mx::allocator::Data(
        mx::allocator::Buffer{new cu::CudaBuffer{nullptr, 0, -1}},
        &free_output);
  }
  const int d = dev.cuda_device();
  const size_t size = rounded_size(nbytes);
  void* data = nullptr;
  {
    auto& f = free_buffers()[d];
    std::lock_guard lock(f.mutex);
    if (auto it = f.by_size.find(size);
        it != f.by_size.end() && !it->second.empty()) {
      data = it->second.back();
      it->second.pop_back();
      f.bytes -= size;
    }
  }
  if (!data) {
    // Stream-ordered on MLX's stream: the kernel that writes it runs later on
    // that stream.
    CUdeviceptr ptr = 0;
    auto stream =
        static_cast<CUstream>(static_cast<cudaStream_t>(enc.stream()));
    CUresult r = cuMemAllocFromPoolAsync(&ptr, size, device_pool(d), stream);
    if (r == CUDA_ERROR_OUT_OF_MEMORY) {
      clear_cache();
      r = cuMemAllocFromPoolAsync(&ptr, size, device_pool(d), stream);
    }
    check(r, "cuMemAllocFromPoolAsync");
    data = reinterpret_cast<void*>(ptr);
  }
  return mx::allocator::Data(
      mx::allocator::Buffer{new cu::CudaBuffer{data, size, d}}, &free_output);
}

// A small stack buffer for the per-launch pointer and Params arrays.
template <typename T, size_t N>
class Scratch {
 public:
  explicit Scratch(size_t n) : n_(n) {
    if (n > N) {
      heap_ = std::make_unique<T[]>(n);
    }
  }
  T* data() {
    return heap_ ? heap_.get() : local_;
  }

 private:
  size_t n_;
  alignas(16) T local_[N];
  std::unique_ptr<T[]> heap_;
};

size_t align_up(size_t n, size_t to) {
  return (n + to - 1) / to * to;
}

// Encodes `map` of `in` into the 128 bytes at `out`; false where TMA cannot
// describe the input (its dtype, rank, an address or stride not a multiple of
// 16 bytes, a box wider than the swizzle...): the kernel then loads it
// otherwise.
bool encode_tensor_map(const mx::array& in, const TensorMapSpec& map, void* out) {
#if CUDA_VERSION >= 12000
  CUtensorMapDataType type;
  switch (in.dtype()) {
    case mx::float16:
      type = CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
      break;
    case mx::bfloat16:
      type = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
      break;
    case mx::float32:
      type = CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
      break;
    default:
      return false;
  }
  const int rank = int(in.ndim());
  if (rank < 2 || rank > 5 || in.strides().back() != 1) {
    return false;
  }
  const uint64_t size = in.itemsize();
  cuuint64_t dims[5], strides[4];
  cuuint32_t box[5], unit[5];
  // A box dimension over 1 that the array does not have would hold fewer bytes
  // than the kernel expects: no map.
  if (rank < 3 && map.box_planes > 1) {
    return false;
  }
  for (int i = 0; i < rank; ++i) {
    dims[i] = cuuint64_t(in.shape(rank - 1 - i));
    box[i] = i == 0 ? map.box_cols : i == 1 ? map.box_rows : i == 2 ? map.box_planes : 1;
    unit[i] = 1;
  }
  uint64_t largest = size * dims[0];
  for (int i = 1; i < rank; ++i) {
    const int64_t stride = in.strides()[rank - 1 - i];
    if (stride < 0) {
      return false;
    }
    // A dimension of one is never stepped: any legal stride does.
    strides[i - 1] = dims[i] > 1 ? uint64_t(stride) * size : align_up(largest, 16);
    largest = std::max<uint64_t>(largest, strides[i - 1]);
  }
  alignas(64) CUtensorMap encoded;
  if (cuTensorMapEncodeTiled(
          &encoded,
          type,
          cuuint32_t(rank),
          mx::gpu_ptr<void>(in),
          dims,
          strides,
          box,
          unit,
          CU_TENSOR_MAP_INTERLEAVE_NONE,
          CU_TENSOR_MAP_SWIZZLE_128B,
          CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
    return false;
  }
  std::memcpy(out, &encoded, sizeof(encoded));
  return true;
#else
  return false;
#endif
}

std::string launch_name(const std::string& kernel) {
  return "kernel '" + kernel + "'";
}

} // namespace

// ------------------------------------------------------------------ packing
// a launch

namespace {

// One kernel launch's argument array: a pointer per input and output, then
// Params (stack buffers for the usual sizes).
class PackedArgs {
 public:
  PackedArgs(const PackedArgs&) = delete; // args_ points into ptrs_ and params_
  PackedArgs& operator=(const PackedArgs&) = delete;
  PackedArgs(size_t n_ptrs, size_t param_bytes)
      : ptrs_(n_ptrs), args_(n_ptrs + 1), params_(param_bytes / 8) {
    std::memset(params_.data(), 0, param_bytes);
    for (size_t i = 0; i < n_ptrs; ++i) {
      args_.data()[i] = &ptrs_.data()[i];
    }
    args_.data()[n_ptrs] = params_.data();
  }
  void*& ptr(size_t i) {
    return ptrs_.data()[i];
  }
  char* params() {
    return reinterpret_cast<char*>(params_.data());
  }
  void** args() {
    return args_.data();
  }

 private:
  Scratch<void*, 32> ptrs_;
  Scratch<void*, 33> args_;
  Scratch<uint64_t, 128> params_;
};

// A link's kernel inputs and outputs among the primitive's arrays.
struct LinkArrays {
  const ChainLink& link;
  const std::vector<mx::array>& inputs;
  const std::vector<mx::array>& outputs;
  size_t first_output; // the link's first array among the primitive's outputs

  // Not for an input without an array (kNoSource): callers test unread first.
  const mx::array& in(size_t i) const {
    const int src = link.sources[i];
    return src >= 0 ? inputs[src] : outputs[~src];
  }
  size_t n_in() const {
    return link.sources.size();
  }
  // The kernel's outputs, scratch included.
  size_t n_out() const {
    return link.spec->output_shapes.size();
  }
  // The link's array output i (scratch outputs skipped).
  const mx::array& out(size_t i) const {
    return outputs[first_output + i];
  }
};

// Bytes of `spec`'s Params as kernel `k` takes them (checked against the
// kernel where the driver tells its parameters), a multiple of 16: the strides
// of the strided inputs, the static bytes, and the tensor maps at the next
// 64-byte boundary with their bit word. The kernel's struct may end with
// padding that Python's struct.pack does not write.
size_t params_bytes(const LinkArrays& a, const Kernel& k, size_t* maps_at) {
  const LaunchSpec& spec = *a.link.spec;
  const size_t n_in = a.n_in(), n_out = a.n_out();
  if (k.num_params >= 0 && size_t(k.num_params) != n_in + n_out + 1) {
    fail_invalid(
        launch_name(spec.kernel) + " takes " + std::to_string(k.num_params) +
        " parameters, but the launch passes " + std::to_string(n_in) +
        " inputs, " + std::to_string(n_out) + " outputs and Params");
  }
  size_t n_strides = 0;
  for (int i : spec.strided_inputs) {
    n_strides += a.in(i).ndim();
  }
  const size_t packed = n_strides * sizeof(int64_t) + spec.params.size();
  *maps_at = align_up(packed, 64);
  const size_t n_maps = spec.tensor_maps.size();
  const size_t blob =
      n_maps ? align_up(*maps_at + 128 * n_maps + sizeof(uint32_t), 64) : packed;
  size_t size = align_up(blob, 16);
  if (k.num_params > 0) {
    if (blob > k.params_size || k.params_size - blob >= 16) {
      fail_invalid(
          launch_name(spec.kernel) + " takes a " + std::to_string(k.params_size) +
          "-byte Params, but the launch packs " + std::to_string(blob) +
          " bytes (" + std::to_string(n_strides) + " strides + " +
          std::to_string(spec.params.size()) + " bytes" +
          (n_maps ? " + " + std::to_string(n_maps) + " tensor maps" : "") + ")");
    }
    size = std::max(size, align_up(k.params_size, 16));
  }
  return size;
}

// Inputs that get no strides must be row-contiguous (launch_chain() makes them
// so), unless the kernel does not read them; earlier links' outputs are.
void check_contiguous(const LinkArrays& a) {
  const LaunchSpec& spec = *a.link.spec;
  for (size_t i = 0; i < a.n_in(); ++i) {
    if (a.link.sources[i] >= 0 && !a.in(i).flags().row_contiguous &&
        !listed(spec.strided_inputs, i) && !listed(spec.unread_inputs, i)) {
      fail_invalid(
          "input " + std::to_string(i) + " of " + launch_name(spec.kernel) +
          " is not row-contiguous and gets no strides");
    }
  }
}

// A buffer for scratch output `o` of `spec` (its device address), held until
// the GPU is done with the evaluation.
void* scratch_buffer(cu::CommandEncoder& enc, const LaunchSpec& spec, int o) {
  const size_t nbytes = size_t(mx::size_of(spec.output_dtypes[o])) *
      std::accumulate(spec.output_shapes[o].begin(),
                      spec.output_shapes[o].end(),
                      size_t(1),
                      std::multiplies<size_t>());
  auto data = std::make_shared<mx::allocator::Data>(alloc_output(nbytes, enc));
  void* address = static_cast<cu::CudaBuffer*>(data->buffer().ptr())->data;
  enc.add_completed_handler([data = std::move(data)] {});
  return address;
}

// Fills `packed` for a link whose outputs have their buffers; its scratch
// outputs get theirs here. Returns whether every tensor map was encoded.
bool pack(
    cu::CommandEncoder& enc,
    PackedArgs& packed,
    const LinkArrays& a,
    size_t maps_at) {
  const LaunchSpec& spec = *a.link.spec;
  auto* strides = reinterpret_cast<int64_t*>(packed.params());
  for (int i : spec.strided_inputs) {
    for (auto st : a.in(i).strides()) {
      *strides++ = st;
    }
  }
  if (!spec.params.empty()) {
    std::memcpy(strides, spec.params.data(), spec.params.size());
  }
  bool all_maps = true;
  if (const size_t n_maps = spec.tensor_maps.size()) {
    char* bytes = packed.params();
    uint32_t encoded = 0;
    for (size_t m = 0; m < n_maps; ++m) {
      auto& map = spec.tensor_maps[m];
      if (encode_tensor_map(a.in(map.input), map, bytes + maps_at + 128 * m)) {
        encoded |= 1u << m;
      }
    }
    std::memcpy(bytes + maps_at + 128 * n_maps, &encoded, sizeof(encoded));
    all_maps = encoded == (1u << n_maps) - 1;
  }
  for (size_t i = 0; i < a.n_in(); ++i) {
    const bool unread = listed(spec.unread_inputs, i);
    packed.ptr(i) = !unread && a.in(i).buffer().ptr()
        ? mx::gpu_ptr<void>(a.in(i))
        : nullptr;
  }
  for (size_t i = 0, array = 0; i < a.n_out(); ++i) {
    packed.ptr(a.n_in() + i) = spec.is_scratch(i)
        ? scratch_buffer(enc, spec, int(i))
        : mx::gpu_ptr<void>(a.out(array++));
  }
  return all_maps;
}

// Opts kernel `k` in to `bytes` of dynamic shared memory (once per size).
void allow_shared_memory(Kernel& k, uint32_t bytes) {
  if (bytes <= k.smem_allowed.load(std::memory_order_acquire)) {
    return;
  }
  std::lock_guard lock(k.attr_mutex);
  if (bytes > k.smem_allowed.load(std::memory_order_relaxed)) {
    check(
        cuFuncSetAttribute(
            k.func, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(bytes)),
        "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)");
    k.smem_allowed.store(bytes, std::memory_order_release);
  }
}

// Whether `view` is a prefix view of `base`: the same address, type, dimensions
// and strides, the innermost dimension no longer (ViewAlternative).
bool is_prefix_view(const mx::array& view, const mx::array& base) {
  const size_t n = view.ndim();
  if (n == 0 || n != base.ndim() || view.dtype() != base.dtype() ||
      view.strides() != base.strides() ||
      !view.buffer().ptr() || !base.buffer().ptr() ||
      mx::gpu_ptr<void>(view) != mx::gpu_ptr<void>(base)) {
    return false;
  }
  for (size_t i = 0; i + 1 < n; ++i) {
    if (view.shape(i) != base.shape(i)) {
      return false;
    }
  }
  return view.shape(n - 1) <= base.shape(n - 1);
}

std::atomic<uint64_t>& alternative_launches() {
  static std::atomic<uint64_t> count{0};
  return count;
}

// A checked link, then packed: ready to become a graph node. The kernel, block
// and shared memory are the spec's, or its view alternative's (choose()).
struct ReadyLaunch {
  Kernel* kernel;
  const LaunchSpec* spec;
  size_t params_bytes;
  size_t maps_at;
  std::unique_ptr<PackedArgs> packed;
  Kernel* alternative = nullptr;  // where the view condition holds
  bool took_alternative = false;

  // After packing: the alternative if it applies and every map was encoded.
  void choose(bool all_maps) {
    if (alternative && all_maps) {
      kernel = alternative;
      took_alternative = true;
      alternative_launches().fetch_add(1, std::memory_order_relaxed);
    }
  }
  const Dim3& block() const {
    return took_alternative ? spec->alternative->block : spec->block;
  }
  uint32_t shared_memory() const {
    return took_alternative ? spec->alternative->shared_memory : spec->shared_memory;
  }
};

// Everything that can refuse a link's launch: its kernel (and its view
// alternative's where the inputs take it), its Params' size, its inputs'
// layout, its shared memory.
ReadyLaunch check_link(const LinkArrays& a, cu::Device& dev) {
  const LaunchSpec& spec = *a.link.spec;
  Kernel& k = find_kernel(*spec.image, dev, spec.kernel);
  size_t maps_at;
  const size_t bytes = params_bytes(a, k, &maps_at);
  check_contiguous(a);
  allow_shared_memory(k, spec.shared_memory);
  Kernel* alt = nullptr;
  if (auto& va = spec.alternative; va && is_prefix_view(a.in(va->view), a.in(va->base))) {
    alt = &find_kernel(*spec.image, dev, va->kernel);
    if (alt->num_params >= 0 && k.num_params >= 0 &&
        (alt->num_params != k.num_params || alt->params_size != k.params_size)) {
      fail_invalid(
          launch_name(va->kernel) + " (the view alternative of " + launch_name(spec.kernel) +
          ") takes other parameters");
    }
    allow_shared_memory(*alt, va->shared_memory);
  }
  return {&k, &spec, bytes, maps_at, nullptr, alt};
}

// The outputs' buffers, and the arrays MLX's encoder must keep and order by.
void allocate_and_register(
    cu::CommandEncoder& enc,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    out.set_data(alloc_output(out.nbytes(), enc));
  }
  for (auto& in : inputs) {
    enc.set_input_array(in);
  }
  for (auto& out : outputs) {
    enc.set_output_array(out);
    // Hold the buffer until the GPU work completes, whatever happens to the
    // array.
    enc.add_temporary(out);
  }
}

// One field of every link's array outputs (the scratch left out), in the
// chain's output order.
template <typename T>
std::vector<T> chain_outputs(const Chain& chain, std::vector<T> LaunchSpec::*field) {
  std::vector<T> all;
  for (auto& link : chain) {
    const LaunchSpec& spec = *link.spec;
    auto& more = spec.*field;
    for (size_t i = 0; i < more.size(); ++i) {
      if (!spec.is_scratch(i)) {
        all.push_back(more[i]);
      }
    }
  }
  return all;
}

// A chain's only array output: its spec and its index among the spec's
// outputs. Nothing where the chain has more.
struct LinkOutput {
  const LaunchSpec* spec;
  size_t index;
};
std::optional<LinkOutput> single_array_output(const Chain& chain) {
  std::optional<LinkOutput> found;
  for (auto& link : chain) {
    const LaunchSpec& spec = *link.spec;
    for (size_t i = 0; i < spec.output_shapes.size(); ++i) {
      if (!spec.is_scratch(i)) {
        if (found) {
          return std::nullopt;
        }
        found = LinkOutput{&spec, i};
      }
    }
  }
  return found;
}

// "kernel 'a'", or "kernels 'a', 'b'" for a chain (error messages).
std::string chain_name(const Chain& chain) {
  std::string names;
  for (auto& link : chain) {
    names += (names.empty() ? "'" : ", '") + link.spec->kernel + "'";
  }
  return (chain.size() == 1 ? "kernel " : "kernels ") + names;
}

// The links as one child graph of kernel nodes, each after the one before it:
// by a programmatic edge where it overlaps_previous and the GPU has
// programmatic dependent launch, else by a full one. MLX's encoder copies the
// graph into its own.
void add_chain_graph(
    cu::CommandEncoder& enc,
    const std::vector<ReadyLaunch>& ready) {
  CUgraph graph;
  check(cuGraphCreate(&graph, 0), "cuGraphCreate");
  std::unique_ptr<CUgraph_st, CUresult (*)(CUgraph)> owned(graph, cuGraphDestroy);
  const bool programmatic = enc.device().compute_capability_major() >= 9;
  CUgraphNode previous = nullptr;
  for (auto& r : ready) {
    CUDA_KERNEL_NODE_PARAMS params = {};
    params.func = r.kernel->func;
    params.gridDimX = r.spec->grid[0];
    params.gridDimY = r.spec->grid[1];
    params.gridDimZ = r.spec->grid[2];
    params.blockDimX = r.block()[0];
    params.blockDimY = r.block()[1];
    params.blockDimZ = r.block()[2];
    params.sharedMemBytes = r.shared_memory();
    params.kernelParams = r.packed->args();
    CUgraphNode node;
    check(
        cuGraphAddKernelNode(&node, graph, nullptr, 0, &params),
        "cuGraphAddKernelNode");
    if (previous) {
#if CUDA_VERSION >= 12030
      // Edge data came with CUDA 12.3 as cuGraphAddDependencies_v2, the plain
      // name from CUDA 13; older toolkits get a full edge.
      CUgraphEdgeData edge = {};
      if (programmatic && r.spec->overlaps_previous) {
        edge.from_port = CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC;
        edge.type = CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC;
      }
      check(
          cuGraphAddDependencies_v2(graph, &previous, &node, &edge, 1),
          "cuGraphAddDependencies");
#else
      check(
          cuGraphAddDependencies(graph, &previous, &node, 1),
          "cuGraphAddDependencies");
#endif
    }
    previous = node;
  }
  enc.add_graph_node(reinterpret_cast<cudaGraph_t>(graph));
}

} // namespace

// ------------------------------------------------------------------ the
// primitive

std::vector<mx::Shape> CudaLaunch::output_shapes(const std::vector<mx::array>&) {
  return chain_outputs(*chain_, &LaunchSpec::output_shapes);
}

void CudaLaunch::eval_cpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error(
      "[aotc.CudaLaunch] " + chain_name(*chain_) +
      " has no CPU implementation: it runs only on MLX's CUDA backend (a GPU stream)");
}

void CudaLaunch::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& s = stream();
  auto& enc = cu::get_command_encoder(s);
  auto& dev = enc.device();
  dev.make_current();

  // What can refuse a launch comes before MLX's encoder sees any of it.
  const Chain& links = *chain_;
  if (links.size() == 1) {
    // The common case, on the stack.
    const LinkArrays a{links[0], inputs, outputs, 0};
    ReadyLaunch r = check_link(a, dev);
    allocate_and_register(enc, inputs, outputs);
    PackedArgs packed(a.n_in() + a.n_out(), r.params_bytes);
    r.choose(pack(enc, packed, a, r.maps_at));
    const LaunchSpec& spec = *r.spec;
    enc.add_kernel_node_raw(
        r.kernel->func,
        dim3(spec.grid[0], spec.grid[1], spec.grid[2]),
        dim3(r.block()[0], r.block()[1], r.block()[2]),
        {},
        r.shared_memory(),
        packed.args());
    return;
  }
  std::vector<LinkArrays> arrays;
  std::vector<ReadyLaunch> ready;
  arrays.reserve(links.size());
  ready.reserve(links.size());
  size_t first_output = 0;
  for (auto& link : links) {
    arrays.push_back({link, inputs, outputs, first_output});
    ready.push_back(check_link(arrays.back(), dev));
    first_output += link.spec->array_outputs();
  }
  allocate_and_register(enc, inputs, outputs);
  for (size_t i = 0; i < links.size(); ++i) {
    auto& r = ready[i];
    r.packed = std::make_unique<PackedArgs>(
        arrays[i].n_in() + arrays[i].n_out(), r.params_bytes);
    r.choose(pack(enc, *r.packed, arrays[i], r.maps_at));
  }
  add_chain_graph(enc, ready);
}

std::vector<mx::array> CudaLaunch::jvp(
    const std::vector<mx::array>&,
    const std::vector<mx::array>&,
    const std::vector<int>&) {
  throw std::invalid_argument(
      "[aotc.CudaLaunch] " + chain_name(*chain_) +
      " has no derivatives (aotc uses MLX's own op when gradients are needed)");
}

std::vector<mx::array> CudaLaunch::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  if (!gradient_) {
    throw std::invalid_argument(
        "[aotc.CudaLaunch] " + chain_name(*chain_) +
        " has no gradient (aotc uses MLX's own op when gradients are needed)");
  }
  // The gradient differentiates the last link: its kernel inputs (chain inputs
  // or earlier links' outputs), then the gradient inputs.
  const ChainLink& last = chain_->back();
  const size_t last_outputs = last.spec->array_outputs();
  std::vector<mx::array> link_primals, link_cotangents(
      cotangents.end() - last_outputs, cotangents.end());
  for (int src : last.sources) {
    // An unread input without an array gets a placeholder: its cotangent is
    // dropped below.
    link_primals.push_back(
        src == kNoSource ? mx::array(0.0f)
            : src >= 0   ? primals[src]
                         : outputs[~src]);
  }
  link_primals.insert(
      link_primals.end(), primals.begin() + kernel_inputs_, primals.end());
  auto all = gradient_(link_primals, link_cotangents);
  if (all.size() != link_primals.size()) {
    throw std::runtime_error(
        "[aotc.CudaLaunch] the gradient of " + chain_name(*chain_) +
        " returned " + std::to_string(all.size()) + " cotangents for " +
        std::to_string(link_primals.size()) + " inputs");
  }
  // Back to the primitive's inputs: a chain input the last link does not read
  // gets zeros, and earlier links' outputs get none.
  std::vector<std::optional<mx::array>> by_input(primals.size());
  for (size_t i = 0; i < last.sources.size(); ++i) {
    if (int src = last.sources[i]; src >= 0) {
      by_input[src] = by_input[src] ? mx::add(*by_input[src], all[i]) : all[i];
    }
  }
  for (size_t i = kernel_inputs_; i < primals.size(); ++i) {
    by_input[i] = all[last.sources.size() + i - kernel_inputs_];
  }
  std::vector<mx::array> result;
  result.reserve(argnums.size());
  for (int i : argnums) {
    result.push_back(by_input[i] ? *by_input[i] : mx::zeros_like(primals[i]));
  }
  return result;
}

std::pair<std::vector<mx::array>, std::vector<int>> CudaLaunch::vmap(
    const std::vector<mx::array>&,
    const std::vector<int>&) {
  throw std::invalid_argument(
      "[aotc.CudaLaunch] " + chain_name(*chain_) + " cannot be vmapped");
}

bool CudaLaunch::is_equivalent(const mx::Primitive& other) const {
  if (typeid(other) != typeid(CudaLaunch)) {
    return false;
  }
  auto& o = static_cast<const CudaLaunch&>(other);
  return (chain_ == o.chain_ || *chain_ == *o.chain_) &&
      kernel_inputs_ == o.kernel_inputs_ &&
      bool(gradient_) == bool(o.gradient_);
}

// ------------------------------------------------------------------ graph
// building

std::vector<mx::array> launch_chain(
    ChainPtr chain,
    std::vector<mx::array> inputs,
    std::vector<mx::array> gradient_inputs,
    Gradient gradient,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  const Chain& links = *chain;
  check_chain(links, inputs.size(), stream);

  // An input that a kernel reads without strides must be row-contiguous.
  // Known layouts pass as they are (evaluated arrays, outputs of this
  // primitive); others go through mx::contiguous, which shares the buffer when
  // it already is. Unread inputs pass as they are.
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!read_without_strides(links, i)) {
      continue;
    }
    auto& x = inputs[i];
    bool contiguous = x.status() != mx::array::unscheduled
        ? bool(x.flags().row_contiguous)
        : (x.has_primitive() && typeid(x.primitive()) == typeid(CudaLaunch));
    if (!contiguous) {
      x = mx::contiguous(x, false, stream);
    }
  }

  const size_t kernel_inputs = inputs.size();
  inputs.insert(inputs.end(), gradient_inputs.begin(), gradient_inputs.end());
  auto primitive = std::make_shared<CudaLaunch>(
      stream, std::move(chain), kernel_inputs, std::move(gradient));
  if (const auto only = single_array_output(links)) {
    // The common case: the array's own constructor takes the inputs by move,
    // where make_arrays copies them and builds sibling lists.
    std::vector<mx::array> out;
    out.emplace_back(
        only->spec->output_shapes[only->index],
        only->spec->output_dtypes[only->index],
        std::move(primitive),
        std::move(inputs));
    return out;
  }
  return mx::array::make_arrays(
      chain_outputs(links, &LaunchSpec::output_shapes),
      chain_outputs(links, &LaunchSpec::output_dtypes),
      primitive,
      inputs);
}

bool cuda_available() {
  return cu::is_available();
}

uint64_t view_alternative_launches() {
  return alternative_launches().load(std::memory_order_relaxed);
}

int sm_count(int device) {
  // cu::device(ordinal) initialises the driver (and MLX's device) first.
  CUdevice handle;
  check(cuDeviceGet(&handle, cu::device(device).cuda_device()), "cuDeviceGet");
  int value = 0;
  check(
      cuDeviceGetAttribute(
          &value, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, handle),
      "cuDeviceGetAttribute");
  return value;
}

void set_output_allocator(const std::string& name) {
  if (name == "pool") {
    alloc_mode().store(kPool);
  } else if (name == "mlx") {
    alloc_mode().store(kMlx);
  } else {
    throw std::invalid_argument(
        "[aotc] unknown CUDA output allocator '" + name + "' (pool or mlx)");
  }
}

std::string output_allocator() {
  return alloc_mode().load() == kMlx ? "mlx" : "pool";
}

void clear_cache() {
  auto& ps = pools();
  for (int d = 0; d < kMaxDevices; ++d) {
    auto pool = ps.pool[d].load();
    if (!pool) {
      continue;
    }
    std::unordered_map<size_t, std::vector<void*>> buffers;
    {
      auto& f = free_buffers()[d];
      std::lock_guard lock(f.mutex);
      buffers.swap(f.by_size);
      f.bytes = 0;
    }
    for (auto& [size, list] : buffers) {
      for (void* data : list) {
        release_to_pool(d, data);
      }
    }
    cuStreamSynchronize(CU_STREAM_PER_THREAD);
    cuMemPoolTrimTo(pool, 0);
  }
}

} // namespace aotc
