#include "cuda/lt_gemm.h"

#include <ATen/cuda/CUDAContext.h>
#include <cublasLt.h>

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>

namespace fastdni::cuda {
namespace {

#define FASTDNI_CUBLASLT_CHECK(call)                                                                            \
  do {                                                                                                          \
    const cublasStatus_t status_ = (call);                                                                      \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, #call " failed: ", cublasLtGetStatusString(status_), " (", \
                static_cast<int>(status_), ")");                                                              \
  } while (0)

// Owners of the cuBLASLt descriptors, destroyed however the call ends (a failed check throws).
using MatmulDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, decltype(&cublasLtMatmulDescDestroy)>;
using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, decltype(&cublasLtMatrixLayoutDestroy)>;
using Preference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, decltype(&cublasLtMatmulPreferenceDestroy)>;

cudaDataType_t data_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    default: TORCH_CHECK(false, "x: the CUDA backend takes float32, bfloat16 or float16 tensors, got ", t);
  }
}

// A column-major rows x cols matrix with leading dimension ld (cuBLASLt's convention).
Layout layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t raw = nullptr;
  FASTDNI_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&raw, type, rows, cols, ld));
  return Layout(raw, &cublasLtMatrixLayoutDestroy);
}

// The largest power of two up to 256 that divides the address. cuBLASLt's heuristic assumes 256-byte-aligned
// operands unless told otherwise, and a tensor view (a slice of rows) can start anywhere.
uint32_t alignment(const void* ptr) {
  uint32_t align = 256;
  while (align > 1 && reinterpret_cast<uintptr_t>(ptr) % align != 0) align /= 2;
  return align;
}

template <typename V>
void set_preference(cublasLtMatmulPreference_t preference, cublasLtMatmulPreferenceAttributes_t attribute, const V& value) {
  FASTDNI_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, attribute, &value, sizeof(value)));
}

template <typename V>
void set(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const V& value) {
  FASTDNI_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)));
}

// How many of the heuristic's ranked algorithms to look through for one that runs as a single kernel.
constexpr int kCandidates = 8;

template <typename V>
V algo_config(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attribute) {
  V value{};
  size_t written = 0;
  FASTDNI_CUBLASLT_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&algo, attribute, &value, sizeof(value), &written));
  return value;
}

// The best-ranked algorithm that is one launch: no split-K (on an H200, fp32 at the tests' 'tiles' shape, the
// first pick split K into a scaling kernel, the GEMM and a reduction carrying the epilogue: 3 launches per GEMM).
// These GEMMs are a layer step's (batch x width, width <= a few thousand), where launches, not FLOPs, set the
// time. The first candidate when none is single-kernel.
const cublasLtMatmulAlgo_t& one_launch_algo(const cublasLtMatmulHeuristicResult_t* candidates, int found) {
  for (int i = 0; i < found; ++i) {
    const cublasLtMatmulAlgo_t& algo = candidates[i].algo;
    if (algo_config<int32_t>(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM) <= 1 &&
        algo_config<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME) == CUBLASLT_REDUCTION_SCHEME_NONE) {
      return algo;
    }
  }
  return candidates[0].algo;
}

// The heuristic's pick per problem: cublasLtMatmulAlgoGetHeuristic costs tens of microseconds of host time, as
// much as a layer step's GEMMs at the sizes these ops run, and a training loop asks the same few problems every step.
struct AlgoKey {
  int device;
  cudaDataType_t type;
  int64_t m, k, n;
  bool rhs_transposed;
  cublasLtEpilogue_t epilogue;
  std::array<uint32_t, 3> alignments;  // A, B, C (= D)
  size_t workspace_size;

  bool operator==(const AlgoKey& o) const {
    return device == o.device && type == o.type && m == o.m && k == o.k && n == o.n && rhs_transposed == o.rhs_transposed &&
           epilogue == o.epilogue && alignments == o.alignments && workspace_size == o.workspace_size;
  }
};

struct AlgoKeyHash {
  size_t operator()(const AlgoKey& key) const {
    size_t h = 0;
    auto mix = [&h](uint64_t v) { h ^= std::hash<uint64_t>{}(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
    for (uint64_t v : {uint64_t(key.device), uint64_t(key.type), uint64_t(key.m), uint64_t(key.k), uint64_t(key.n),
                       uint64_t(key.rhs_transposed), uint64_t(key.epilogue), uint64_t(key.alignments[0]),
                       uint64_t(key.alignments[1]), uint64_t(key.alignments[2]), uint64_t(key.workspace_size)}) {
      mix(v);
    }
    return h;
  }
};

class AlgoCache {
 public:
  bool find(const AlgoKey& key, cublasLtMatmulAlgo_t* algo) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = algos_.find(key);
    if (it == algos_.end()) return false;
    *algo = it->second;
    return true;
  }
  void insert(const AlgoKey& key, const cublasLtMatmulAlgo_t& algo) {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (algos_.size() >= kMaxEntries) algos_.clear();  // a sweep over many shapes: start over rather than grow
    algos_.emplace(key, algo);
  }

 private:
  static constexpr size_t kMaxEntries = 4096;
  std::mutex mutex_;
  std::unordered_map<AlgoKey, cublasLtMatmulAlgo_t, AlgoKeyHash> algos_;
};

AlgoCache& algo_cache() {
  static AlgoCache cache;
  return cache;
}

}  // namespace

void lt_gemm(const at::Tensor& lhs, const at::Tensor& rhs, bool rhs_transposed, const at::Tensor& out, LtEpilogue epilogue,
             const at::Tensor& bias, float beta) {
  const int64_t m = lhs.size(0), k = lhs.size(1), n = out.size(1);
  if (m == 0 || n == 0) return;
  if (k == 0) {  // no product to take (cuBLASLt rejects k = 0): the epilogue alone
    beta == 0.f ? out.zero_() : out.mul_(beta);
    if (epilogue != LtEpilogue::kNone) out.add_(bias);
    if (epilogue == LtEpilogue::kReluBias) out.relu_();
    return;
  }
  // Row-major out = lhs @ R is column-major out^T = R^T lhs^T: cuBLASLt's A is R^T ([n, k]), its B is lhs^T
  // ([k, m], which is lhs's memory as it is), its D is out^T ([n, m]). R^T is rhs[n, k] read transposed when
  // rhs_transposed, else rhs[k, n] as it is.
  const cudaDataType_t type = data_type(out.scalar_type());
  cublasLtMatmulDesc_t raw_desc = nullptr;
  FASTDNI_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&raw_desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const MatmulDesc desc(raw_desc, &cublasLtMatmulDescDestroy);
  set(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, rhs_transposed ? CUBLAS_OP_T : CUBLAS_OP_N);
  set(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  cublasLtEpilogue_t lt_epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  if (epilogue != LtEpilogue::kNone) {
    lt_epilogue = epilogue == LtEpilogue::kReluBias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
    set(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias.data_ptr());  // bias is along D's rows: out's columns
  }
  set(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE, lt_epilogue);

  const Layout a = rhs_transposed ? layout(type, k, n, k) : layout(type, n, k, n);
  const Layout b = layout(type, k, m, k);
  const Layout d = layout(type, n, m, n);

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  const AlgoKey key{out.get_device(), type, m, k, n, rhs_transposed, lt_epilogue,
                    {alignment(rhs.data_ptr()), alignment(lhs.data_ptr()), alignment(out.data_ptr())}, workspace_size};
  cublasLtMatmulAlgo_t algo;
  if (!algo_cache().find(key, &algo)) {
    cublasLtMatmulPreference_t raw_pref = nullptr;
    FASTDNI_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref));
    const Preference preference(raw_pref, &cublasLtMatmulPreferenceDestroy);
    set_preference(preference.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(workspace_size));
    set_preference(preference.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.alignments[0]);
    set_preference(preference.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.alignments[1]);
    set_preference(preference.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.alignments[2]);
    set_preference(preference.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.alignments[2]);
    std::array<cublasLtMatmulHeuristicResult_t, kCandidates> candidates{};
    int found = 0;
    FASTDNI_CUBLASLT_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, desc.get(), a.get(), b.get(), d.get(), d.get(), preference.get(),
                                                          kCandidates, candidates.data(), &found));
    TORCH_CHECK(found > 0, "cublasLtMatmulAlgoGetHeuristic found no algorithm for a ", m, "x", k, "x", n, " ", out.scalar_type(),
                " GEMM with this epilogue");
    algo = one_launch_algo(candidates.data(), found);
    algo_cache().insert(key, algo);
  }
  const float alpha = 1.f;
  FASTDNI_CUBLASLT_CHECK(cublasLtMatmul(handle, desc.get(), &alpha, rhs.data_ptr(), a.get(), lhs.data_ptr(), b.get(), &beta,
                                        out.data_ptr(), d.get(), out.data_ptr(), d.get(), &algo, workspace, workspace_size,
                                        at::cuda::getCurrentCUDAStream()));
}

}  // namespace fastdni::cuda
