// The CPU distance micro-kernel, compiled once per instruction set (see CMakeLists.txt): KCLIP_ISA_NS names
// the variant, KCLIP_MR the rows per micro-tile (12 with 32 vector registers, 6 with 16, 4 otherwise) and
// KCLIP_NP its 16-centroid panels (2 with 32 vector registers, else 1).
//
// Distances come from a GEMM-shaped product, blocked as a GEMM is: a block of kRows rows of x meets NP
// 16-centroid panels at a time, in slices of kDepth coordinates so the panel slices stay in L1 and the row
// slice in L2. A micro-tile holds MR x NP x 16 dot products in vector registers: each x value is broadcast once
// and multiplied into NP panel vectors (at 20k x 4096 x 100 on Zen 4, NP = 2 took the distance pass from 167 to
// 142 ms). Every (row, centroid) dot is summed in coordinate order whatever the blocking and the thread count,
// so results are reproducible.
#include <cmath>
#include <cstring>
#include <vector>

#include "kmeans_common.h"
#include "kmeans_cpu.h"

namespace kclip::cpu::KCLIP_ISA_NS {

typedef float v16 __attribute__((vector_size(64), aligned(4)));
constexpr int MR = KCLIP_MR;
constexpr int NP = KCLIP_NP;
constexpr int64_t kRows = 192;   // rows per block (a multiple of every MR)
constexpr int64_t kDepth = 256;  // coordinates per slice: a 16 KB panel slice

// dots[q * MR + r] += rows[r][0:depth] . panels[q][0:depth][0:16] for the MR rows and P panels of a micro-tile.
template <int P>
static inline void micro_tile(const float* const* rows, const float* const* panels, int64_t depth, v16* dots) {
  v16 a[P][MR];
  for (int q = 0; q < P; ++q)
    for (int r = 0; r < MR; ++r) a[q][r] = dots[q * MR + r];
  for (int64_t j = 0; j < depth; ++j) {
    v16 p[P];
    for (int q = 0; q < P; ++q) std::memcpy(&p[q], panels[q] + j * kPanel, sizeof(v16));
    for (int r = 0; r < MR; ++r) {
      const float xv = rows[r][j];
      for (int q = 0; q < P; ++q) a[q][r] += xv * p[q];
    }
  }
  for (int q = 0; q < P; ++q)
    for (int r = 0; r < MR; ++r) dots[q * MR + r] = a[q][r];
}

// sq_dist_from_dot (kmeans_common.h), sixteen lanes at a time: the same operations in the same order.
static inline v16 distances(float x_norm, v16 dots, v16 c_norm) {
  const v16 dist = (x_norm - 2.0f * dots) + c_norm;
  return dist > 0.0f ? dist : v16{};
}

// Calls visit(row, panel, distances) for every row of [0, n) and every panel, NP panels at a time within a block
// of rows, so visits to one row come in increasing centroid order. `distances` holds the 16 squared distances of
// the panel as one vector (lanes past k carry +inf through their infinite norm).
template <typename Visit>
static inline void for_each_panel(const float* x, int64_t n, const float* x_norm, const PackedCentroids& c,
                                  Visit visit) {
  const int64_t d = c.d;
  alignas(64) v16 dots[NP][kRows];
  for (int64_t b0 = 0; b0 < n; b0 += kRows) {
    const int64_t nb = n - b0 < kRows ? n - b0 : kRows;
    for (int64_t p0 = 0; p0 < c.panels; p0 += NP) {
      const int64_t np = c.panels - p0 < NP ? c.panels - p0 : NP;
      const float* panels[NP];
      v16 cn[NP];
      for (int q = 0; q < np; ++q) {
        panels[q] = c.data.data() + (p0 + q) * d * kPanel;
        std::memcpy(&cn[q], c.norm.data() + (p0 + q) * kPanel, sizeof(v16));
      }
      for (int64_t j0 = 0; j0 < d; j0 += kDepth) {
        const int64_t depth = d - j0 < kDepth ? d - j0 : kDepth;
        const bool first = j0 == 0, last = j0 + depth == d;
        for (int64_t r0 = 0; r0 < nb; r0 += MR) {
          const int64_t mr = nb - r0 < MR ? nb - r0 : MR;
          const float* rows[MR];
          const float* slices[NP];
          v16 acc[NP * MR];  // [panel][row]
          // Missing rows of the last micro-tile repeat its first row; their results are dropped.
          for (int r = 0; r < MR; ++r) {
            const int64_t rr = r0 + (r < mr ? r : 0);
            rows[r] = x + (b0 + rr) * d + j0;
            for (int64_t q = 0; q < np; ++q) acc[q * MR + r] = first ? v16{} : dots[q][rr];
          }
          for (int64_t q = 0; q < np; ++q) slices[q] = panels[q] + j0 * kPanel;
          // A last step with fewer panels runs the one-panel tile (k-means++ scores one centroid at a time).
          if (np == NP) {
            micro_tile<NP>(rows, slices, depth, acc);
          } else {
            micro_tile<1>(rows, slices, depth, acc);
          }
          // The last slice turns its dots into distances straight from the registers (the only slice when
          // d <= kDepth); earlier slices park partial dots in dots[].
          for (int64_t r = 0; r < mr; ++r) {
            for (int64_t q = 0; q < np; ++q) {
              if (last) {
                visit(b0 + r0 + r, p0 + q, distances(x_norm[b0 + r0 + r], acc[q * MR + r], cn[q]));
              } else {
                dots[q][r0 + r] = acc[q * MR + r];
              }
            }
          }
        }
      }
    }
  }
}

static void assign_rows(const float* x, int64_t n, const float* x_norm, const PackedCentroids& c, int64_t* labels,
                        float* dist) {
  // A running minimum per lane (centroid 16p + lane of the best panel p so far); panels come in increasing
  // order and only a strictly smaller distance replaces, so each lane keeps the lowest index of its minimum.
  typedef int32_t i16v __attribute__((vector_size(64), aligned(4)));
  std::vector<v16> best(n);
  std::vector<i16v> best_panel(n);
  for (int64_t r = 0; r < n; ++r) {
    best[r] = v16{} + INFINITY;
    best_panel[r] = i16v{};
  }
  for_each_panel(x, n, x_norm, c, [&](int64_t r, int64_t p, v16 dv) {
    const auto better = dv < best[r];
    best[r] = better ? dv : best[r];
    best_panel[r] = better ? (i16v{} + static_cast<int32_t>(p)) : best_panel[r];
  });
  for (int64_t r = 0; r < n; ++r) {
    ArgMin a = argmin_init();
    for (int lane = 0; lane < kPanel; ++lane) {
      const int64_t index = static_cast<int64_t>(best_panel[r][lane]) * kPanel + lane;
      if (index < c.k) a = argmin_update(a, best[r][lane], index);
    }
    labels[r] = a.index;
    dist[r] = a.value;
  }
}

static void dist_rows(const float* x, int64_t n, const float* x_norm, const PackedCentroids& c, float* out,
                      int64_t ldo) {
  for_each_panel(x, n, x_norm, c, [&](int64_t r, int64_t p, v16 dv) {
    float lanes[kPanel];
    std::memcpy(lanes, &dv, sizeof(lanes));
    std::memcpy(out + r * ldo + p * kPanel, lanes, sizeof(float) * tile_extent(c.k, kPanel, p));
  });
}

}  // namespace kclip::cpu::KCLIP_ISA_NS

#define KCLIP_CAT2(a, b) a##b
#define KCLIP_CAT(a, b) KCLIP_CAT2(a, b)
#define KCLIP_STR2(x) #x
#define KCLIP_STR(x) KCLIP_STR2(x)

namespace kclip::cpu {
extern const IsaKernels KCLIP_CAT(KCLIP_ISA_NS, _kernels);
const IsaKernels KCLIP_CAT(KCLIP_ISA_NS, _kernels) = {KCLIP_STR(KCLIP_ISA_NS), KCLIP_ISA_NS::MR,
                                                       &KCLIP_ISA_NS::assign_rows, &KCLIP_ISA_NS::dist_rows};
}  // namespace kclip::cpu
