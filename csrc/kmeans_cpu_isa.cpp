// The CPU distance micro-kernel, compiled once per instruction set (see CMakeLists.txt): KCLIP_ISA_NS names
// the variant, KCLIP_MR the rows per micro-tile (12 with 32 vector registers, 6 with 16, 4 otherwise).
//
// Distances come from a GEMM-shaped product, blocked as a GEMM is: a block of kRows rows of x meets one
// 16-centroid panel at a time, in slices of kDepth coordinates so the panel slice stays in L1 and the row
// slice in L2. A micro-tile holds MR x 16 dot products in vector registers (one FMA per row and coordinate:
// the x value broadcast against one vector load of the panel). Every (row, centroid) dot is summed in
// coordinate order whatever the blocking and the thread count, so results are reproducible.
#include <cmath>
#include <cstring>
#include <vector>

#include "kmeans_common.h"
#include "kmeans_cpu.h"

namespace kclip::cpu::KCLIP_ISA_NS {

typedef float v16 __attribute__((vector_size(64), aligned(4)));
constexpr int MR = KCLIP_MR;
constexpr int64_t kRows = 192;   // rows per block (a multiple of every MR)
constexpr int64_t kDepth = 256;  // coordinates per slice: a 16 KB panel slice

// dots[r] += rows[r][0:depth] . panel[0:depth][0:16] for the MR rows of a micro-tile.
static inline void micro_tile(const float* const* rows, const float* panel, int64_t depth, v16* dots) {
  v16 a[MR];
  for (int r = 0; r < MR; ++r) a[r] = dots[r];
  for (int64_t j = 0; j < depth; ++j) {
    v16 p;
    std::memcpy(&p, panel + j * kPanel, sizeof(v16));
    for (int r = 0; r < MR; ++r) a[r] += rows[r][j] * p;
  }
  for (int r = 0; r < MR; ++r) dots[r] = a[r];
}

// sq_dist_from_dot (kmeans_common.h), sixteen lanes at a time: the same operations in the same order.
static inline v16 distances(float x_norm, v16 dots, v16 c_norm) {
  const v16 dist = (x_norm - 2.0f * dots) + c_norm;
  return dist > 0.0f ? dist : v16{};
}

// Calls visit(row, panel, distances) for every row of [0, n) and every panel, panel by panel within a block of
// rows, so visits to one row come in increasing centroid order. `distances` holds the 16 squared distances of
// the panel as one vector (lanes past k carry +inf through their infinite norm).
template <typename Visit>
static inline void for_each_panel(const float* x, int64_t n, const float* x_norm, const PackedCentroids& c,
                                  Visit visit) {
  const int64_t d = c.d;
  alignas(64) v16 dots[kRows];
  for (int64_t b0 = 0; b0 < n; b0 += kRows) {
    const int64_t nb = n - b0 < kRows ? n - b0 : kRows;
    for (int64_t p = 0; p < c.panels; ++p) {
      const float* panel = c.data.data() + p * d * kPanel;
      v16 cn;
      std::memcpy(&cn, c.norm.data() + p * kPanel, sizeof(v16));
      for (int64_t j0 = 0; j0 < d; j0 += kDepth) {
        const int64_t depth = d - j0 < kDepth ? d - j0 : kDepth;
        const bool first = j0 == 0, last = j0 + depth == d;
        for (int64_t r0 = 0; r0 < nb; r0 += MR) {
          const int64_t mr = nb - r0 < MR ? nb - r0 : MR;
          const float* rows[MR];
          v16 acc[MR];
          // Missing rows of the last micro-tile repeat its first row; their results are dropped.
          for (int r = 0; r < MR; ++r) {
            const int64_t rr = r0 + (r < mr ? r : 0);
            rows[r] = x + (b0 + rr) * d + j0;
            acc[r] = first ? v16{} : dots[rr];
          }
          micro_tile(rows, panel + j0 * kPanel, depth, acc);
          // The last slice turns its dots into distances straight from the registers (the only slice when
          // d <= kDepth); earlier slices park partial dots in dots[].
          for (int64_t r = 0; r < mr; ++r) {
            if (last) {
              visit(b0 + r0 + r, p, distances(x_norm[b0 + r0 + r], acc[r], cn));
            } else {
              dots[r0 + r] = acc[r];
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
