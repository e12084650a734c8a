// In-place orthogonal multiply W <- R * W without a second copy of W (CUDA C++).
//
// R * W needs a whole column of W before any entry of that column may be overwritten, so W is
// processed in column panels: panel j is multiplied into one of two workspace buffers on the
// compute stream, then copied back over W on the copy stream, while panel j+1 is already being
// computed into the other buffer (its columns are disjoint from those being written back).
// Events order the reuse of a buffer after its copy has finished.
//
// The panel GEMM is a shared-memory tiled kernel with fp32 accumulation; operands are float,
// half or bfloat16.  This file needs only the CUDA runtime headers, so CI compiles it with
// `nvcc -arch=sm_90 -c` even on machines without a GPU (tests/test_csrc_build.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr int TILE = 32;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// out[i, c] = sum_k R[i, k] * W[k, col0 + c]  for one panel of `ncols` columns.
// R: d x d (leading dimension ldr), W: d x d_in (row stride ldw, column stride cw),
// out: d x panel workspace (leading dimension ldo).
template <typename T>
__global__ void panel_gemm(const T* __restrict__ R, const T* __restrict__ W, T* __restrict__ out, int d, int ncols,
                           long long ldr, long long ldw, long long cw, long long col0, long long ldo) {
  __shared__ float r_tile[TILE][TILE];
  __shared__ float w_tile[TILE][TILE + 1];  // +1 avoids bank conflicts on the transposed read
  const int row = blockIdx.y * TILE + threadIdx.y;
  const int col = blockIdx.x * TILE + threadIdx.x;
  float acc = 0.f;
  for (int k0 = 0; k0 < d; k0 += TILE) {
    const int rk = k0 + threadIdx.x;
    const int wk = k0 + threadIdx.y;
    r_tile[threadIdx.y][threadIdx.x] = (row < d && rk < d) ? to_f32(R[row * ldr + rk]) : 0.f;
    w_tile[threadIdx.y][threadIdx.x] = (wk < d && col < ncols) ? to_f32(W[wk * ldw + (col0 + col) * cw]) : 0.f;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < TILE; ++k) acc += r_tile[threadIdx.y][k] * w_tile[k][threadIdx.x];
    __syncthreads();
  }
  if (row < d && col < ncols) out[row * ldo + col] = from_f32<T>(acc);
}

template <typename T>
__global__ void copy_back(const T* __restrict__ ws, T* __restrict__ W, int d, int ncols, long long ldo, long long ldw,
                          long long cw, long long col0) {
  const int row = blockIdx.y * blockDim.y + threadIdx.y;
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (row < d && col < ncols) W[row * ldw + (col0 + col) * cw] = ws[row * ldo + col];
}

template <typename T>
int orth_matmul_inplace(const T* R, T* W, int d, int d_in, long long ldr, long long ldw, long long cw, T* workspace,
                        int panel, cudaStream_t compute, cudaStream_t copy) {
  if (d <= 0 || d_in <= 0 || panel <= 0) return static_cast<int>(cudaErrorInvalidValue);
  T* buf[2] = {workspace, workspace + static_cast<long long>(d) * panel};
  cudaEvent_t computed[2], copied[2];
  for (int b = 0; b < 2; ++b) {
    cudaEventCreateWithFlags(&computed[b], cudaEventDisableTiming);
    cudaEventCreateWithFlags(&copied[b], cudaEventDisableTiming);
  }
  const dim3 block(TILE, TILE);
  int j = 0;
  for (long long col0 = 0; col0 < d_in; col0 += panel, ++j) {
    const int b = j & 1;
    const int ncols = static_cast<int>(d_in - col0 < panel ? d_in - col0 : panel);
    if (j >= 2) cudaStreamWaitEvent(compute, copied[b], 0);  // buffer b free again
    const dim3 grid((ncols + TILE - 1) / TILE, (d + TILE - 1) / TILE);
    panel_gemm<T><<<grid, block, 0, compute>>>(R, W, buf[b], d, ncols, ldr, ldw, cw, col0, panel);
    cudaEventRecord(computed[b], compute);
    cudaStreamWaitEvent(copy, computed[b], 0);
    copy_back<T><<<grid, block, 0, copy>>>(buf[b], W, d, ncols, panel, ldw, cw, col0);
    cudaEventRecord(copied[b], copy);
  }
  // the caller's compute stream sees W complete
  for (int b = 0; b < 2; ++b) cudaStreamWaitEvent(compute, copied[b], 0);
  const cudaError_t err = cudaGetLastError();
  for (int b = 0; b < 2; ++b) {
    cudaEventDestroy(computed[b]);
    cudaEventDestroy(copied[b]);
  }
  return static_cast<int>(err);
}

}  // namespace

// C entry points (dtype code: 0 float32, 1 float16, 2 bfloat16).  Workspace: 2 * d * panel
// elements.  Returns a cudaError_t code.
extern "C" int mose_orth_matmul_inplace(int dtype, const void* R, void* W, int d, int d_in, long long ldr,
                                        long long ldw, long long cw, void* workspace, int panel, cudaStream_t compute,
                                        cudaStream_t copy) {
  switch (dtype) {
    case 0:
      return orth_matmul_inplace(static_cast<const float*>(R), static_cast<float*>(W), d, d_in, ldr, ldw, cw,
                                 static_cast<float*>(workspace), panel, compute, copy);
    case 1:
      return orth_matmul_inplace(static_cast<const __half*>(R), static_cast<__half*>(W), d, d_in, ldr, ldw, cw,
                                 static_cast<__half*>(workspace), panel, compute, copy);
    case 2:
      return orth_matmul_inplace(static_cast<const __nv_bfloat16*>(R), static_cast<__nv_bfloat16*>(W), d, d_in, ldr,
                                 ldw, cw, static_cast<__nv_bfloat16*>(workspace), panel, compute, copy);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}
