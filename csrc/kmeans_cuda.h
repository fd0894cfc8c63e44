// CUDA k-means entry points of kclip._C. Every pointer is device memory owned by the caller (kclip allocates
// through torch); nothing here allocates device memory or synchronises the host. All work is queued on
// `stream` (a cudaStream_t passed as an integer handle; 0 is the legacy default stream).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kmeans_common.h"

namespace kclip::cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// What the CUDA runtime linked into the module says about this machine. Never throws.
struct DeviceStatus {
  int device_count = 0;
  int driver_version = 0;   // cudaDriverGetVersion, 0 without a driver
  int runtime_version = 0;  // cudaRuntimeGetVersion of the runtime linked in
  std::string error;        // empty when device_count > 0; otherwise the runtime's own words
};
DeviceStatus device_status();

// The device ordinal of the memory `p` points into (device or managed memory), -1 for host memory or a pointer
// the runtime does not know; and the calling thread's current device (-1 when there is none). Never throw.
int pointer_device(const void* p);
int current_device();

// Rows per block of the 16-bit distance kernels (assign, distances): 128 (cp.async into a 3-slice ring) needs
// 16-byte rows (`vec`: d a multiple of 8, both arrays 16-byte aligned) and pays off once its blocks fill two waves
// of the `sms` multiprocessors at two blocks each; otherwise 64 (register-staged). `forced` is the value of the
// environment variable KCLIP_CUDA_TILE_ROWS: empty or "auto" for that rule, "64" or "128" to choose (128 without
// `vec` still takes 64, which reads any width). Host code, so the tests can check the rule without a GPU.
inline int wmma_tile_rows(int64_t n, bool vec, int sms, const std::string& forced) {
  if (forced != "" && forced != "auto" && forced != "64" && forced != "128") {
    throw std::invalid_argument("KCLIP_CUDA_TILE_ROWS='" + forced + "': expected auto, 64 or 128");
  }
  if (!vec || forced == "64") return 64;
  if (forced == "128") return 128;
  return tile_count(n, 128) >= 4 * static_cast<int64_t>(sms > 0 ? sms : 1) ? 128 : 64;
}

// Nearest centroid of every row of x.
//   x [n, d] and c [k, d], both of dtype `dt`, row-major and contiguous; c_norm [k] fp32 holds ||c_j||^2
//   computed from the values in c. Writes labels [n] int64 and dist [n] fp32 (squared distance, >= 0).
//   The n x k distance matrix is never written: each block keeps a running argmin per row.
void assign(const void* x, const void* c, const float* c_norm, DType dt, int64_t n, int64_t d, int64_t k,
            int64_t* labels, float* dist, std::uintptr_t stream);

// Squared distances of every row of x to every centroid, written to out [n, k] fp32 with row stride ldo.
// Used for soft assignment over a bounded chunk of rows.
void distances(const void* x, const void* c, const float* c_norm, DType dt, int64_t n, int64_t d, int64_t k,
               float* out, int64_t ldo, std::uintptr_t stream);

// Per-cluster sums and counts for the centroid update: sums [k, d] fp32 and counts [k] int64 must be zeroed
// by the caller; x [n, d] of dtype `dt`; labels [n] int64 in [0, k).
void accumulate(const void* x, DType dt, int64_t n, int64_t d, const int64_t* labels, int64_t k, float* sums,
                int64_t* counts, std::uintptr_t stream);

// Row-wise softmax of -dist * inv_temperature over k entries, dist [n, k] fp32 (row stride ldd).
//   top_k == 0: dense probabilities into dense_out [n, k] (may alias dist).
//   top_k > 0:  the top_k largest probabilities per row, renormalised to sum to 1, into topk_idx [n, top_k]
//               int64 and topk_w [n, top_k] fp32, sorted by descending weight (ties: lower index first).
void soft_assign(const float* dist, int64_t ldd, int64_t n, int64_t k, float inv_temperature, int64_t top_k,
                 float* dense_out, int64_t* topk_idx, float* topk_w, std::uintptr_t stream);

}  // namespace kclip::cuda
