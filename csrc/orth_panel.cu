// Shared-memory tiled panel GEMM for the in-place orthogonal multiply (CUDA C++).
//
// out = R * W[:, col0 : col0 + ncols] for one column panel.  R is float32 (never narrowed to W's
// dtype); W is float, half or bfloat16 with any strides (a transposed view included) and is widened
// to float32 as it is loaded; accumulation and out are float32, rounded once to W's dtype by the
// caller's copy back.  csrc/binding.cpp runs the panel loop (two workspace buffers, two streams)
// and uses cuBLAS by default; this kernel is its gemm="tiled" alternative: an independent
// implementation to check cuBLAS against on the GPU, and a path with no cuBLAS dependency.  This
// file needs only the CUDA runtime headers, so CI compiles it with `nvcc -arch=sm_90 -c` even on
// machines without a GPU (tests/test_csrc_build.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr int TILE = 32;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// out[i, c] = sum_k R[i, k] * W[k, col0 + c]  for one panel of `ncols` columns.
// R: d x d float32 (leading dimension ldr), W: d x d_in (row stride ldw, column stride cw),
// out: d x panel float32 workspace (leading dimension ldo).
template <typename T>
__global__ void panel_gemm(const float* __restrict__ R, const T* __restrict__ W, float* __restrict__ out, int d,
                           int ncols, long long ldr, long long ldw, long long cw, long long col0, long long ldo) {
  __shared__ float r_tile[TILE][TILE];
  __shared__ float w_tile[TILE][TILE + 1];  // +1 avoids bank conflicts on the transposed read
  const int row = blockIdx.y * TILE + threadIdx.y;
  const int col = blockIdx.x * TILE + threadIdx.x;
  float acc = 0.f;
  for (int k0 = 0; k0 < d; k0 += TILE) {
    const int rk = k0 + threadIdx.x;
    const int wk = k0 + threadIdx.y;
    r_tile[threadIdx.y][threadIdx.x] = (row < d && rk < d) ? R[row * ldr + rk] : 0.f;
    w_tile[threadIdx.y][threadIdx.x] = (wk < d && col < ncols) ? to_f32(W[wk * ldw + (col0 + col) * cw]) : 0.f;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < TILE; ++k) acc += r_tile[threadIdx.y][k] * w_tile[k][threadIdx.x];
    __syncthreads();
  }
  if (row < d && col < ncols) out[row * ldo + col] = acc;
}

template <typename T>
int launch(const float* R, const T* W, float* out, int d, int ncols, long long ldr, long long ldw, long long cw,
           long long col0, long long ldo, cudaStream_t stream) {
  if (d <= 0 || ncols <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 block(TILE, TILE);
  const dim3 grid((ncols + TILE - 1) / TILE, (d + TILE - 1) / TILE);
  panel_gemm<T><<<grid, block, 0, stream>>>(R, W, out, d, ncols, ldr, ldw, cw, col0, ldo);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// C entry point (W dtype code: 0 float32, 1 float16, 2 bfloat16).  Returns a cudaError_t code.
extern "C" int mose_panel_gemm_tiled(int w_dtype, const float* R, const void* W, float* out, int d, int ncols,
                                     long long ldr, long long ldw, long long cw, long long col0, long long ldo,
                                     cudaStream_t stream) {
  switch (w_dtype) {
    case 0:
      return launch(R, static_cast<const float*>(W), out, d, ncols, ldr, ldw, cw, col0, ldo, stream);
    case 1:
      return launch(R, static_cast<const __half*>(W), out, d, ncols, ldr, ldw, cw, col0, ldo, stream);
    case 2:
      return launch(R, static_cast<const __nv_bfloat16*>(W), out, d, ncols, ldr, ldw, cw, col0, ldo, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}
