// CPU k-means of kclip._C. Arrays are row-major float32 and contiguous; checks happen in the bindings.
#pragma once

#include <cstdint>
#include <vector>

namespace kclip::cpu {

// Width of a centroid panel: the micro-kernel computes MR rows x kPanel centroids at a time.
constexpr int kPanel = 16;

// Centroids packed for the distance micro-kernel: panel p holds centroids [16p, 16p+16) transposed to
// [d][16], so the kernel reads one contiguous 16-float vector per coordinate. Missing centroids in the last
// panel are zero and carry an infinite norm so they never win an argmin.
struct PackedCentroids {
  int64_t k = 0, d = 0, panels = 0;
  std::vector<float> data;  // [panels][d][16]
  std::vector<float> norm;  // [panels * 16]
};
PackedCentroids pack_centroids(const float* c, int64_t k, int64_t d);

// Per-ISA kernels (kmeans_cpu_isa.cpp compiled once per instruction set). Rows [0, n) of x.
struct IsaKernels {
  const char* name;
  int mr;
  // labels [n], dist [n]: nearest packed centroid.
  void (*assign_rows)(const float* x, int64_t n, const float* x_norm, const PackedCentroids& c, int64_t* labels,
                      float* dist);
  // out [n][ldo]: squared distance to every centroid (first c.k columns written).
  void (*dist_rows)(const float* x, int64_t n, const float* x_norm, const PackedCentroids& c, float* out,
                    int64_t ldo);
  // out[i] = ||x[i]||^2 for rows [0, n): sixteen running partial sums a row, added lane by lane at the end.
  void (*sq_norms)(const float* x, int64_t n, int64_t d, float* out);
  // acc[0:width] += x[rows[e]][c0:c0 + width] for e in [0, count), in that order (the centroid update).
  void (*sum_rows)(const float* x, int64_t d, const int64_t* rows, int64_t count, int64_t c0, int64_t width,
                   double* acc);
};
const IsaKernels& isa_kernels();  // the best this processor runs

// ||x_i||^2 of every row (IsaKernels::sq_norms over OpenMP blocks of rows): the same bits for any thread count.
void row_sq_norms(const float* x, int64_t n, int64_t d, float* out);

// Nearest centroid per row; OpenMP over blocks of rows. Deterministic: each row's result depends only on it.
// x_norm: the rows' squared norms (row_sq_norms), or nullptr to compute them here; Lloyd's loop passes them
// once computed, since x does not change between its iterations (at D = 4096 a pass over x each time).
void assign(const float* x, int64_t n, int64_t d, const float* c, int64_t k, int64_t* labels, float* dist,
            const float* x_norm = nullptr);

// Sum of the rows of each cluster (float64) and the cluster sizes. Every sum is accumulated in row order, so
// the result is bitwise independent of the thread count.
void accumulate(const float* x, int64_t n, int64_t d, const int64_t* labels, int64_t k, double* sums,
                int64_t* counts);

// assign() then accumulate(): one call for Lloyd's loop (bitwise the two calls).
void assign_accumulate(const float* x, int64_t n, int64_t d, const float* c, int64_t k, int64_t* labels,
                       float* dist, double* sums, int64_t* counts, const float* x_norm = nullptr);

// Greedy k-means++ (Arthur & Vassilvitskii, with n_trials candidates per step as scikit-learn does).
// Writes the indices of the chosen rows to out [k]. Deterministic for a seed.
void kmeanspp(const float* x, int64_t n, int64_t d, int64_t k, uint64_t seed, int n_trials, int64_t* out);

// softmax(-||x - c_j||^2 * inv_temperature) over the k centroids.
//   top_k == 0: dense [n, k] into dense_out.
//   top_k > 0: the top_k entries per row, renormalised to sum to 1, sorted by descending weight.
void soft_assign(const float* x, int64_t n, int64_t d, const float* c, int64_t k, float inv_temperature,
                 int64_t top_k, float* dense_out, int64_t* topk_idx, float* topk_w);

}  // namespace kclip::cpu
