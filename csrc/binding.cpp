// Torch binding of csrc/orth_panel.cu, built lazily on CUDA machines by mose_fast/csrc.py
// (torch.utils.cpp_extension.load + ninja).
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

extern "C" int mose_orth_matmul_inplace(int dtype, const void* R, void* W, int d, int d_in, long long ldr,
                                        long long ldw, long long cw, void* workspace, int panel, cudaStream_t compute,
                                        cudaStream_t copy);

// W <- R W in place; W may be a transposed view (GPT-2 Conv1D).  Workspace: two panels.
torch::Tensor orth_matmul_inplace(torch::Tensor W, torch::Tensor R, int64_t panel) {
  TORCH_CHECK(W.is_cuda() && R.is_cuda(), "W and R must be CUDA tensors");
  TORCH_CHECK(W.dim() == 2 && R.dim() == 2 && R.size(0) == R.size(1) && R.size(0) == W.size(0),
              "need W (d x n) and R (d x d)");
  TORCH_CHECK(W.scalar_type() == R.scalar_type(), "W and R must share a dtype");
  TORCH_CHECK(R.stride(1) == 1, "R must be row-major contiguous");
  int code = W.scalar_type() == at::kFloat ? 0 : W.scalar_type() == at::kHalf ? 1 : W.scalar_type() == at::kBFloat16 ? 2 : -1;
  TORCH_CHECK(code >= 0, "dtype must be float32, float16 or bfloat16");
  auto ws = at::empty({2 * W.size(0) * panel}, W.options());
  auto compute = c10::cuda::getCurrentCUDAStream();
  auto copy = c10::cuda::getStreamFromPool();
  int err = mose_orth_matmul_inplace(code, R.data_ptr(), W.data_ptr(), W.size(0), W.size(1), R.stride(0), W.stride(0),
                                     W.stride(1), ws.data_ptr(), static_cast<int>(panel), compute.stream(), copy.stream());
  TORCH_CHECK(err == 0, "mose_orth_matmul_inplace failed with CUDA error ", err);
  // the workspace may be freed only once the copy stream is done with it
  ws.record_stream(copy);
  return W;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("orth_matmul_inplace", &orth_matmul_inplace, "W <- R W in place"); }
