// Tile arithmetic shared by the CPU and CUDA k-means: written once as __host__ __device__ functions so the
// CUDA kernels and the CPU tests (through kclip._C._tile_assign_host) run exactly the same code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KCLIP_HD __host__ __device__ __forceinline__
#else
#define KCLIP_HD inline
#endif

namespace kclip {

// Number of tiles of size `tile` that cover `n` items.
KCLIP_HD int64_t tile_count(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// Items of tile `t` that exist: the last tile may be partial.
KCLIP_HD int64_t tile_extent(int64_t n, int64_t tile, int64_t t) {
  const int64_t rest = n - t * tile;
  return rest < tile ? (rest > 0 ? rest : 0) : tile;
}

// ||x - c||^2 from the expanded form ||x||^2 - 2 x.c + ||c||^2. Rounding can make the expansion slightly
// negative for a point sitting on its centroid; a squared distance never is.
KCLIP_HD float sq_dist_from_dot(float x_norm, float c_norm, float dot) {
  const float d = x_norm - 2.0f * dot + c_norm;
  return d > 0.0f ? d : 0.0f;
}

// Running argmin with ties going to the lower index, so the result does not depend on the order in which
// tiles are visited (CPU panels, CUDA thread groups) and matches numpy/torch argmin.
struct ArgMin {
  float value;
  int64_t index;
};

KCLIP_HD ArgMin argmin_init() { return ArgMin{3.402823466e+38f, -1}; }

KCLIP_HD ArgMin argmin_update(ArgMin best, float value, int64_t index) {
  if (value < best.value || (value == best.value && index < best.index) || best.index < 0) {
    return ArgMin{value, index};
  }
  return best;
}

KCLIP_HD ArgMin argmin_merge(ArgMin a, ArgMin b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  return argmin_update(a, b.value, b.index);
}

// Top-k selection in the order (value ascending, index ascending), NaN never kept. The CUDA soft assignment keeps
// one such list per thread over the entries it strides through, then merges the lists' heads block-wide with
// argmin_merge, top_k times: one read of the row instead of one per pick. kclip._C._topk_select_host runs the
// same on the host for the tests.
KCLIP_HD bool ranks_before(float a, int64_t ia, float b, int64_t ib) { return a < b || (a == b && ia < ib); }

// Offers (value, index) to the sorted list v/j holding `size` of at most `cap` (>= 1) entries.
KCLIP_HD void top_insert(float* v, int32_t* j, int& size, int cap, float value, int32_t index) {
  if (value != value) return;
  if (size == cap && !ranks_before(value, index, v[cap - 1], j[cap - 1])) return;
  int s = size < cap ? size++ : cap - 1;
  for (; s > 0 && ranks_before(value, index, v[s - 1], j[s - 1]); --s) {
    v[s] = v[s - 1];
    j[s] = j[s - 1];
  }
  v[s] = value;
  j[s] = index;
}

}  // namespace kclip
