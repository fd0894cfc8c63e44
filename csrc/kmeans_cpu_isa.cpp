// The CPU distance micro-kernel, compiled once per instruction set (see CMakeLists.txt): KCLIP_ISA_NS names
// the variant, KCLIP_MR the rows per micro-tile (12 with 32 vector registers, 6 with 16, 4 otherwise).
//
// Distances come from a GEMM-shaped product, blocked as a GEMM is: a block of kRows rows of x meets one
// 16-centroid panel at a time, in slices of kDepth coordinates so the panel slice stays in L1 and the row
// slice in L2. A micro-tile holds MR x 16 dot products in vector registers (one FMA per row and coordinate:
// the x value broadcast against one vector load of the panel). Every (row, centroid) dot is summed in
// coordinate order whatever the blocking and the thread count, so results are reproducible.
#include <cstring>

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

// Calls visit(row, panel, distances[16]) for every row of [0, n) and every panel, panel by panel within a
// block of rows, so visits to one row come in increasing centroid order.
template <typename Visit>
static inline void for_each_panel(const float* x, int64_t n, const float* x_norm, const PackedCentroids& c,
                                  Visit visit) {
  const int64_t d = c.d;
  alignas(64) v16 dots[kRows];
  for (int64_t b0 = 0; b0 < n; b0 += kRows) {
    const int64_t nb = n - b0 < kRows ? n - b0 : kRows;
    for (int64_t p = 0; p < c.panels; ++p) {
      const float* panel = c.data.data() + p * d * kPanel;
      for (int64_t r = 0; r < nb; ++r) dots[r] = v16{};
      for (int64_t j0 = 0; j0 < d; j0 += kDepth) {
        const int64_t depth = d - j0 < kDepth ? d - j0 : kDepth;
        for (int64_t r0 = 0; r0 < nb; r0 += MR) {
          const int64_t mr = nb - r0 < MR ? nb - r0 : MR;
          const float* rows[MR];
          v16 acc[MR];
          // Missing rows of the last micro-tile repeat its first row; their results are dropped.
          for (int r = 0; r < MR; ++r) {
            const int64_t rr = r0 + (r < mr ? r : 0);
            rows[r] = x + (b0 + rr) * d + j0;
            acc[r] = dots[rr];
          }
          micro_tile(rows, panel + j0 * kPanel, depth, acc);
          for (int64_t r = 0; r < mr; ++r) dots[r0 + r] = acc[r];
        }
      }
      const float* cn = c.norm.data() + p * kPanel;
      for (int64_t r = 0; r < nb; ++r) {
        float dist[kPanel];
        for (int j = 0; j < kPanel; ++j) dist[j] = sq_dist_from_dot(x_norm[b0 + r], cn[j], dots[r][j]);
        visit(b0 + r, p, dist);
      }
    }
  }
}

static void assign_rows(const float* x, int64_t n, const float* x_norm, const PackedCentroids& c, int64_t* labels,
                        float* dist) {
  for (int64_t r = 0; r < n; ++r) {
    labels[r] = -1;
    dist[r] = argmin_init().value;
  }
  for_each_panel(x, n, x_norm, c, [&](int64_t r, int64_t p, const float* dv) {
    ArgMin best{dist[r], labels[r]};
    const int64_t valid = tile_extent(c.k, kPanel, p);
    for (int64_t j = 0; j < valid; ++j) best = argmin_update(best, dv[j], p * kPanel + j);
    labels[r] = best.index;
    dist[r] = best.value;
  });
}

static void dist_rows(const float* x, int64_t n, const float* x_norm, const PackedCentroids& c, float* out,
                      int64_t ldo) {
  for_each_panel(x, n, x_norm, c, [&](int64_t r, int64_t p, const float* dv) {
    std::memcpy(out + r * ldo + p * kPanel, dv, sizeof(float) * tile_extent(c.k, kPanel, p));
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
