// CPU k-means: dispatch to the per-ISA distance kernels, OpenMP over blocks of rows, and the parts of Lloyd's
// algorithm and k-means++ that are not distance computations. Every reduction runs in a fixed order over
// fixed blocks, so a seed gives bitwise-identical results for any OMP_NUM_THREADS.
#include "kmeans_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <stdexcept>
#include <string>

#include "kmeans_common.h"

namespace kclip::cpu {

extern const IsaKernels generic_kernels;
#if defined(KCLIP_HAVE_X86_ISA)
extern const IsaKernels avx2_kernels;
extern const IsaKernels avx512_kernels;
#endif

// The widest variant this CPU runs, or the one KCLIP_CPU_ISA names (avx512, avx2, generic), so the narrower
// variants can be tested and timed on a machine that would not pick them; chosen once per process.
const IsaKernels& isa_kernels() {
  static const IsaKernels& chosen = []() -> const IsaKernels& {
    std::vector<const IsaKernels*> runnable;
#if defined(KCLIP_HAVE_X86_ISA)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) runnable.push_back(&avx512_kernels);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) runnable.push_back(&avx2_kernels);
#endif
    runnable.push_back(&generic_kernels);
    const char* forced = std::getenv("KCLIP_CPU_ISA");
    if (forced == nullptr || *forced == '\0') return *runnable.front();
    std::string names;
    for (const IsaKernels* k : runnable) {
      if (std::string(k->name) == forced) return *k;
      names += std::string(names.empty() ? "" : ", ") + k->name;
    }
    throw std::invalid_argument(std::string("KCLIP_CPU_ISA='") + forced + "': this CPU runs " + names);
  }();
  return chosen;
}

namespace {

constexpr int64_t kBlock = 768;        // rows per OpenMP task in distance passes
constexpr int64_t kSumBlock = 4096;    // rows per block in fixed-order reductions
constexpr int kOrderedThreads = 4;     // at most this many threads: assign_accumulate's one-pass form
constexpr int64_t kSumColumns = 512;   // coordinates per task in the centroid update (a 4 KB accumulator)
// Below this many multiply-adds a loop runs on one thread: waking the team costs more than it saves, and far
// more when the machine is oversubscribed and the other threads are not running.
constexpr int64_t kParallelWork = int64_t{1} << 20;

// SplitMix64: small, fast, and the same sequence everywhere for a seed.
struct Rng {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  int64_t below(int64_t n) { return static_cast<int64_t>(uniform() * static_cast<double>(n)) % n; }
};

// Sum of f(i) for i in [0, n), by fixed blocks summed in order: independent of the thread count.
template <typename F>
double fixed_order_sum(int64_t n, F f) {
  const int64_t blocks = tile_count(n, kSumBlock);
  std::vector<double> partial(blocks);
#pragma omp parallel for schedule(static) if (n > kParallelWork)
  for (int64_t b = 0; b < blocks; ++b) {
    double s = 0.0;
    const int64_t end = std::min(n, (b + 1) * kSumBlock);
    for (int64_t i = b * kSumBlock; i < end; ++i) s += f(i);
    partial[b] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

// Squared distances of every row to each of the `m` packed centroids: out [n][m].
void distances_to(const float* x, int64_t n, const float* x_norm, const PackedCentroids& c, float* out) {
  const IsaKernels& isa = isa_kernels();
#pragma omp parallel for schedule(dynamic, 1) if (n * c.k * c.d > kParallelWork)
  for (int64_t b = 0; b < tile_count(n, kBlock); ++b) {
    const int64_t r0 = b * kBlock;
    isa.dist_rows(x + r0 * c.d, tile_extent(n, kBlock, b), x_norm + r0, c, out + r0 * c.k, c.k);
  }
}

}  // namespace

PackedCentroids pack_centroids(const float* c, int64_t k, int64_t d) {
  PackedCentroids p;
  p.k = k;
  p.d = d;
  p.panels = tile_count(k, kPanel);
  p.data.assign(p.panels * d * kPanel, 0.0f);
  p.norm.assign(p.panels * kPanel, INFINITY);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t panel = j / kPanel, lane = j % kPanel;
    float* dst = p.data.data() + panel * d * kPanel + lane;
    const float* src = c + j * d;
    for (int64_t t = 0; t < d; ++t) dst[t * kPanel] = src[t];
  }
  isa_kernels().sq_norms(c, k, d, p.norm.data());  // the rows' own formula: a row and its copy agree
  return p;
}

void row_sq_norms(const float* x, int64_t n, int64_t d, float* out) {
  const IsaKernels& isa = isa_kernels();
#pragma omp parallel for schedule(static) if (n * d > kParallelWork)
  for (int64_t b = 0; b < tile_count(n, kBlock); ++b) {
    isa.sq_norms(x + b * kBlock * d, tile_extent(n, kBlock, b), d, out + b * kBlock);
  }
}

namespace {

// The caller's row norms, or ones computed into `own`.
const float* norms_or_own(const float* x, int64_t n, int64_t d, const float* x_norm, std::vector<float>& own) {
  if (x_norm != nullptr) return x_norm;
  own.resize(n);
  row_sq_norms(x, n, d, own.data());
  return own.data();
}

}  // namespace

void assign(const float* x, int64_t n, int64_t d, const float* c, int64_t k, int64_t* labels, float* dist,
            const float* x_norm) {
  const PackedCentroids packed = pack_centroids(c, k, d);
  std::vector<float> own_norm;
  x_norm = norms_or_own(x, n, d, x_norm, own_norm);
  const IsaKernels& isa = isa_kernels();
#pragma omp parallel for schedule(dynamic, 1) if (n * k * d > kParallelWork)
  for (int64_t b = 0; b < tile_count(n, kBlock); ++b) {
    const int64_t r0 = b * kBlock;
    isa.assign_rows(x + r0 * d, tile_extent(n, kBlock, b), x_norm + r0, packed, labels + r0, dist + r0);
  }
}

namespace {

void count_labels(const int64_t* labels, int64_t n, int64_t k, int64_t* counts) {
  std::fill(counts, counts + k, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = labels[i];
    if (l < 0 || l >= k) {
      throw std::invalid_argument("labels: entry " + std::to_string(i) + " is " + std::to_string(l) +
                                  ", outside [0, " + std::to_string(k) + ")");
    }
    ++counts[l];
  }
}

}  // namespace

void accumulate(const float* x, int64_t n, int64_t d, const int64_t* labels, int64_t k, double* sums,
                int64_t* counts) {
  count_labels(labels, n, k, counts);
  // The rows of each cluster, in row order (a counting sort): each (cluster, column slice) is then one task that
  // sums its rows in that order into a float64 accumulator in L1 and writes it once. No partial sums to add up
  // (at K = 100, D = 4096 the per-range partials were 3.3 MB each, past L2, and every row went through them).
  std::vector<int64_t> start(k + 1, 0);
  for (int64_t j = 0; j < k; ++j) start[j + 1] = start[j] + counts[j];
  std::vector<int64_t> order(n);
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[next[labels[i]]++] = i;
  }
  const int64_t slices = tile_count(d, kSumColumns);
  const IsaKernels& isa = isa_kernels();
#pragma omp parallel for schedule(dynamic, 1) if (n * d > kParallelWork)
  for (int64_t task = 0; task < k * slices; ++task) {
    const int64_t cluster = task / slices, slice = task % slices;
    const int64_t c0 = slice * kSumColumns, width = tile_extent(d, kSumColumns, slice);
    double acc[kSumColumns] = {};
    isa.sum_rows(x, d, order.data() + start[cluster], counts[cluster], c0, width, acc);
    std::copy(acc, acc + width, sums + cluster * d + c0);
  }
}

void assign_accumulate(const float* x, int64_t n, int64_t d, const float* c, int64_t k, int64_t* labels,
                       float* dist, double* sums, int64_t* counts, const float* x_norm) {
  if (omp_get_max_threads() > kOrderedThreads) {
    assign(x, n, d, c, k, labels, dist, x_norm);
    accumulate(x, n, d, labels, k, sums, counts);
    return;
  }
  // One pass on a few threads: each block of rows is assigned in parallel, then added to the sums in block order
  // (an ordered section) while it is still in cache, saving accumulate()'s second read of x. Every sum still
  // adds its rows in row order from zero, so the result is bitwise accumulate()'s. The adds are serial: with
  // more threads than kOrderedThreads they would hold up the distance work, and the two passes run instead.
  const PackedCentroids packed = pack_centroids(c, k, d);
  std::vector<float> own_norm;
  x_norm = norms_or_own(x, n, d, x_norm, own_norm);
  std::fill(sums, sums + k * d, 0.0);
  const IsaKernels& isa = isa_kernels();
#pragma omp parallel for ordered schedule(dynamic, 1) if (n * k * d > kParallelWork)
  for (int64_t b = 0; b < tile_count(n, kBlock); ++b) {
    const int64_t r0 = b * kBlock, r1 = r0 + tile_extent(n, kBlock, b);
    isa.assign_rows(x + r0 * d, r1 - r0, x_norm + r0, packed, labels + r0, dist + r0);
#pragma omp ordered
    for (int64_t i = r0; i < r1; ++i) isa.sum_rows(x, d, &i, 1, 0, d, sums + labels[i] * d);
  }
  count_labels(labels, n, k, counts);
}

void kmeanspp(const float* x, int64_t n, int64_t d, int64_t k, uint64_t seed, int n_trials, int64_t* out) {
  if (n_trials < 1) throw std::invalid_argument("n_trials: must be at least 1, got " + std::to_string(n_trials));
  Rng rng{seed};
  std::vector<float> x_norm(n);
  row_sq_norms(x, n, d, x_norm.data());

  out[0] = rng.below(n);
  std::vector<float> closest(n);
  distances_to(x, n, x_norm.data(), pack_centroids(x + out[0] * d, 1, d), closest.data());
  double potential = fixed_order_sum(n, [&](int64_t i) { return static_cast<double>(closest[i]); });

  std::vector<double> cumulative(n);
  std::vector<float> cand_rows(static_cast<size_t>(n_trials) * d), cand_dist(static_cast<size_t>(n) * n_trials);
  std::vector<int64_t> cand(n_trials);
  const int64_t blocks = tile_count(n, kSumBlock);
  std::vector<double> partial(static_cast<size_t>(blocks) * n_trials);
  const IsaKernels& isa = isa_kernels();
  const bool parallel = n * n_trials * d > kParallelWork;
  for (int64_t c = 1; c < k; ++c) {
    // Draw candidates with probability proportional to the squared distance to the closest chosen centre.
    double run = 0.0;
    for (int64_t i = 0; i < n; ++i) cumulative[i] = (run += closest[i]);
    for (int t = 0; t < n_trials; ++t) {
      if (potential > 0.0) {
        const double r = rng.uniform() * run;
        const int64_t i = std::upper_bound(cumulative.begin(), cumulative.end(), r) - cumulative.begin();
        cand[t] = std::min(i, n - 1);
      } else {
        cand[t] = rng.below(n);  // every point already sits on a centre
      }
      std::copy(x + cand[t] * d, x + (cand[t] + 1) * d, cand_rows.begin() + t * d);
    }
    const PackedCentroids packed = pack_centroids(cand_rows.data(), n_trials, d);
    // One parallel pass: distances to the candidates and, per fixed block of rows, the potential each candidate
    // would leave, summed in row order (blocks are then summed in order: thread-count independent).
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t r0 = b * kSumBlock, nr = tile_extent(n, kSumBlock, b);
      isa.dist_rows(x + r0 * d, nr, x_norm.data() + r0, packed, cand_dist.data() + r0 * n_trials, n_trials);
      for (int t = 0; t < n_trials; ++t) {
        double sum = 0.0;
        for (int64_t i = r0; i < r0 + nr; ++i) sum += std::min(closest[i], cand_dist[i * n_trials + t]);
        partial[b * n_trials + t] = sum;
      }
    }
    // Keep the candidate that lowers the potential most (ties: the earlier candidate).
    int best = 0;
    double best_potential = INFINITY;
    for (int t = 0; t < n_trials; ++t) {
      double pot = 0.0;
      for (int64_t b = 0; b < blocks; ++b) pot += partial[b * n_trials + t];
      if (pot < best_potential) {
        best_potential = pot;
        best = t;
      }
    }
    out[c] = cand[best];
    potential = best_potential;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t i = 0; i < n; ++i) closest[i] = std::min(closest[i], cand_dist[i * n_trials + best]);
  }
}

void soft_assign(const float* x, int64_t n, int64_t d, const float* c, int64_t k, float inv_temperature,
                 int64_t top_k, float* dense_out, int64_t* topk_idx, float* topk_w) {
  const PackedCentroids packed = pack_centroids(c, k, d);
  std::vector<float> x_norm(n);
  row_sq_norms(x, n, d, x_norm.data());
  const IsaKernels& isa = isa_kernels();
  // Rows per task so one task's distance scratch stays near 1 MB even for k = 65536.
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(kBlock, (int64_t{1} << 18) / k));
#pragma omp parallel if (n * k * d > kParallelWork)
  {
    std::vector<float> scratch(static_cast<size_t>(rows) * k);
    std::vector<int64_t> idx(top_k > 0 ? k : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < tile_count(n, rows); ++b) {
      const int64_t r0 = b * rows, nr = tile_extent(n, rows, b);
      isa.dist_rows(x + r0 * d, nr, x_norm.data() + r0, packed, scratch.data(), k);
      for (int64_t r = 0; r < nr; ++r) {
        const float* dist = scratch.data() + r * k;
        const float dmin = *std::min_element(dist, dist + k);
        if (top_k == 0) {
          float* p = dense_out + (r0 + r) * k;
          double total = 0.0;
          for (int64_t j = 0; j < k; ++j) total += (p[j] = std::exp(-(dist[j] - dmin) * inv_temperature));
          const float inv = static_cast<float>(1.0 / total);
          for (int64_t j = 0; j < k; ++j) p[j] *= inv;
        } else {
          std::iota(idx.begin(), idx.end(), int64_t{0});
          std::partial_sort(idx.begin(), idx.begin() + top_k, idx.end(), [&](int64_t a, int64_t b2) {
            return dist[a] < dist[b2] || (dist[a] == dist[b2] && a < b2);
          });
          float* w = topk_w + (r0 + r) * top_k;
          int64_t* ix = topk_idx + (r0 + r) * top_k;
          double total = 0.0;
          for (int64_t t = 0; t < top_k; ++t) {
            ix[t] = idx[t];
            total += (w[t] = std::exp(-(dist[idx[t]] - dmin) * inv_temperature));
          }
          const float inv = static_cast<float>(1.0 / total);
          for (int64_t t = 0; t < top_k; ++t) w[t] *= inv;
        }
      }
    }
  }
}

}  // namespace kclip::cpu
