// In-place orthogonal multiply W <- R * W on the GPU, without a second copy of W (CUDA C++).
//
// R * W needs a whole column of W before any entry of that column may be overwritten, so W is
// processed in column panels.  Panel j is multiplied into one of two workspace buffers on the
// compute stream, then copied back over W on a second stream while panel j+1 is already being
// multiplied into the other buffer (its columns are disjoint from those being written back).
// Events order the reuse of a buffer after its copy has finished.  Workspace: two buffers, sized
// by the caller (mose_fast/cuda_ext.py) to stay within 1/8 of W's bytes.
//
// Precision: R is float32, never rounded to W's dtype (a bf16 R is orthogonal only to ~2^-8 and
// makes ||W||_F grow every edit).  The product is float32: with cuBLAS, a half-precision panel is
// first widened into a float32 part of the buffer and multiplied by a float32 GEMM with TF32 off
// (at::NoTF32Guard: CUBLAS_DEFAULT_MATH / CUBLAS_COMPUTE_32F whatever the global TF32 flags say);
// the copy back rounds it once to W's dtype (round to nearest even).
//
// gemm = "tiled" swaps cuBLAS for the shared-memory kernel in orth_panel.cu, which reads W in its
// own dtype and widens it in registers: an independent implementation the GPU tests compare
// against, and a path with no cuBLAS dependency.
//
// Built lazily on CUDA machines by mose_fast/cuda_ext.py (torch.utils.cpp_extension.load + ninja);
// tests/test_csrc_build.py syntax-checks this file and compiles orth_panel.cu for sm_90 in CI.
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <string>

extern "C" int mose_panel_gemm_tiled(int w_dtype, const float* R, const void* W, float* out, int d, int ncols,
                                     long long ldr, long long ldw, long long cw, long long col0, long long ldo,
                                     cudaStream_t stream);

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

int dtype_code(at::ScalarType t) {
  return t == at::kFloat ? 0 : t == at::kHalf ? 1 : t == at::kBFloat16 ? 2 : -1;
}

}  // namespace

// W <- R W in place; W may be a transposed view (GPT-2 Conv1D).  `panel` columns per buffer.
// Workspace: 2 buffers of d x panel float32, twice that when a half-precision W goes through cuBLAS
// (the widened panel beside the product).  Returns W.
torch::Tensor orth_matmul_inplace(torch::Tensor W, torch::Tensor R, int64_t panel, const std::string& gemm) {
  TORCH_CHECK(W.is_cuda() && R.is_cuda(), "W and R must be CUDA tensors");
  TORCH_CHECK(W.device() == R.device(), "W and R must be on the same device");
  TORCH_CHECK(W.dim() == 2 && R.dim() == 2 && R.size(0) == R.size(1) && R.size(0) == W.size(0),
              "need W (d x n) and R (d x d), got W ", W.sizes(), " and R ", R.sizes());
  TORCH_CHECK(R.scalar_type() == at::kFloat, "R must be float32 (never W's half precision), got ", R.scalar_type());
  TORCH_CHECK(dtype_code(W.scalar_type()) >= 0, "W's dtype must be float32, float16 or bfloat16");
  TORCH_CHECK(panel > 0, "panel width must be positive");
  TORCH_CHECK(gemm == "cublas" || gemm == "tiled", "gemm must be 'cublas' or 'tiled', got ", gemm);
  R = R.contiguous();
  const c10::cuda::CUDAGuard device_guard(W.device());
  const at::NoTF32Guard no_tf32;   // this thread's cuBLAS calls: full float32, whatever the global flags
  const int64_t d = W.size(0), d_in = W.size(1);
  panel = std::min(panel, d_in);
  const bool widen = gemm == "cublas" && W.scalar_type() != at::kFloat;
  const int64_t per_buffer = (widen ? 2 : 1) * d * panel;
  // flat buffers, so the last (narrower) panel is still a contiguous d x n matrix for cuBLAS
  auto workspace = at::empty({2, per_buffer}, W.options().dtype(at::kFloat));
  auto compute = c10::cuda::getCurrentCUDAStream();
  auto copy = c10::cuda::getStreamFromPool();
  cudaEvent_t computed[2], copied[2];
  for (int b = 0; b < 2; ++b) {
    check_cuda(cudaEventCreateWithFlags(&computed[b], cudaEventDisableTiming), "cudaEventCreate");
    check_cuda(cudaEventCreateWithFlags(&copied[b], cudaEventDisableTiming), "cudaEventCreate");
  }
  // the copy stream must not touch W before work already queued on the compute stream
  check_cuda(cudaEventRecord(copied[1], compute.stream()), "cudaEventRecord");
  check_cuda(cudaStreamWaitEvent(copy.stream(), copied[1], 0), "cudaStreamWaitEvent");
  int j = 0;
  for (int64_t col0 = 0; col0 < d_in; col0 += panel, ++j) {
    const int b = j & 1;
    const int64_t n = std::min(panel, d_in - col0);
    auto product = workspace[b].narrow(0, 0, d * n).view({d, n});
    auto columns = W.narrow(1, col0, n);
    if (j >= 2) check_cuda(cudaStreamWaitEvent(compute.stream(), copied[b], 0), "cudaStreamWaitEvent");
    {
      const c10::cuda::CUDAStreamGuard on_compute(compute);
      if (gemm == "cublas") {
        if (widen) {
          auto wide = workspace[b].narrow(0, d * panel, d * n).view({d, n});
          wide.copy_(columns);   // exact: every bf16/fp16 value is a float32 value
          at::mm_out(product, R, wide);
        } else {
          at::mm_out(product, R, columns);
        }
      } else {
        check_cuda(static_cast<cudaError_t>(mose_panel_gemm_tiled(
                       dtype_code(W.scalar_type()), R.data_ptr<float>(), W.data_ptr(), product.data_ptr<float>(),
                       static_cast<int>(d), static_cast<int>(n), R.stride(0), W.stride(0), W.stride(1), col0, n,
                       compute.stream())),
                   "tiled panel GEMM");
      }
      check_cuda(cudaEventRecord(computed[b], compute.stream()), "cudaEventRecord");
    }
    check_cuda(cudaStreamWaitEvent(copy.stream(), computed[b], 0), "cudaStreamWaitEvent");
    {
      const c10::cuda::CUDAStreamGuard on_copy(copy);
      columns.copy_(product, /*non_blocking=*/true);   // the one rounding to W's dtype
      check_cuda(cudaEventRecord(copied[b], copy.stream()), "cudaEventRecord");
    }
  }
  // the caller's stream sees W complete; the workspace is freed only after the copy stream is done
  for (int b = 0; b < 2; ++b) check_cuda(cudaStreamWaitEvent(compute.stream(), copied[b], 0), "cudaStreamWaitEvent");
  workspace.record_stream(copy);
  for (int b = 0; b < 2; ++b) {
    cudaEventDestroy(computed[b]);
    cudaEventDestroy(copied[b]);
  }
  check_cuda(cudaGetLastError(), "orth_matmul_inplace");
  return W;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("orth_matmul_inplace", &orth_matmul_inplace, "W <- R W in place, float32 R, column panels, two streams",
        pybind11::arg("W"), pybind11::arg("R"), pybind11::arg("panel"), pybind11::arg("gemm") = "cublas");
}
