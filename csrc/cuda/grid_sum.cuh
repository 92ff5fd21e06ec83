// Deterministic sums for the CUDA backend's kernels (the SG loss): warp shuffles within a block, then one
// partial per block summed in block order by the last block to arrive. No atomics on the values, so the loss is
// the same bits on every run; no zero-filled accumulator, so no extra launch: the arrival counter is reset by
// the block that finishes the sum (host side: arrival_counter() in launch.h keeps one per device and stream).
#pragma once

#include <cstdint>

namespace fastdni::cuda {

constexpr int kWarp = 32;

// Sum over a block of kThreads threads, valid in thread 0. Every thread of the block must call it.
template <int kThreads>
__device__ float block_sum(float v) {
  static_assert(kThreads % kWarp == 0 && kThreads / kWarp <= kWarp, "one warp must hold the warps' sums");
  __shared__ float warp_sums[kThreads / kWarp];
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / kWarp ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  __syncthreads();  // warp_sums is free for the next call
  return v;
}

// The sum of `value` over every thread of `blocks` participating blocks (this one is number `block`): true, with
// the sum in `total`, in thread 0 of the last block to arrive; false everywhere else. `partials` holds `blocks`
// floats; *arrivals is zero on entry and zero again on exit. Every thread of a participating block must call it.
template <int kThreads>
__device__ bool grid_sum(float value, float* partials, unsigned* arrivals, unsigned block, unsigned blocks, float& total) {
  value = block_sum<kThreads>(value);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partials[block] = value;
    __threadfence();  // the partial is visible device-wide before this block counts itself in
    last = atomicAdd(arrivals, 1u) == blocks - 1;
  }
  __syncthreads();
  if (!last) return false;
  __threadfence();  // and the other blocks' partials are read after their arrivals
  float sum = 0.f;
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads) sum += static_cast<volatile float*>(partials)[b];
  sum = block_sum<kThreads>(sum);
  if (threadIdx.x != 0) return false;
  *arrivals = 0u;  // ready for the next launch on this counter
  total = sum;
  return true;
}

}  // namespace fastdni::cuda
