// The CPU distance micro-kernel, compiled once per instruction set (see CMakeLists.txt): KCLIP_ISA_NS names
// the variant, KCLIP_MR the rows per micro-tile (12 with 32 vector registers, 6 with 16, 4 otherwise) and
// KCLIP_NP its 16-centroid panels (2 with 32 vector registers, else 1). The centroid update's row sums and the
// row norms are here too, so they are vectorised for the same instruction set.
//
// Distances come from a GEMM-shaped product, blocked as a GEMM is: a block of kRows rows of x is taken one slice
// of kDepth coordinates at a time, and each slice meets every centroid panel, NP 16-centroid panels at a time;
// a panel slice (16 KB) stays in L1 while the block's row slice streams past it from L2. A micro-tile holds
// MR x NP x 16 dot products in vector registers: each x value is broadcast once and multiplied into NP panel
// vectors. Every (row, centroid) dot is summed in coordinate order whatever the blocking and the thread count,
// so results are reproducible.
//
// Measured on 2 Zen 4 cores (bench/kmeans_cpu_harness.cpp: assign_rows over 20k rows, K = 100): about 170 GFLOP/s
// at D = 576 and at D = 4096 (13.5-13.8 ms, 93-95 ms), where numpy's OpenBLAS matmul of the same product reached
// 137-142 at D = 576 (x @ c.T, timed in turn with the C calls). Before the packing below, row widths that are multiples of 1024 fell to 125 (D = 1024: 33.5 -> 29.5
// ms; D = 4096: 116-137 -> 106-116 ms, interleaved runs); before the in-place reads lost their run-time copy test
// and the last panel its 8-lane form, D = 576 took 16.3-16.4 ms and D = 4096 102-104 (interleaved runs). The AVX2
// variant (KCLIP_CPU_ISA=avx2, or the harness built with -DKCLIP_ISA_NS=avx2 -DKCLIP_MR=6 -DKCLIP_NP=1): 16-18 ms
// and 105-115 ms on the same cores (129 and 840-930 while its vectors were 16 lanes wide).
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kmeans_common.h"
#include "kmeans_cpu.h"

namespace kclip::cpu::KCLIP_ISA_NS {

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));
// The micro-tile's vectors are the instruction set's own width: GCC lowers a 16-lane vector without AVX-512 into
// halves that go through the stack at every operation (the AVX2 build took 115-130 ms for 20k x 576 x 100, the
// AVX-512 one 14), so there a panel's 16 lanes are two (AVX2) or four (SSE) registers.
#if defined(__AVX512F__)
using vnative = v16;
#elif defined(__AVX__)
using vnative = v8;
#else
using vnative = v4;
#endif
// A last panel of at most 8 centroids: 8 lanes, in registers of at most 8.
using vhalf = std::conditional_t<sizeof(vnative) >= sizeof(v8), v8, v4>;
constexpr int MR = KCLIP_MR;
constexpr int NP = KCLIP_NP;
constexpr int64_t kRows = 192;   // rows per block (a multiple of every MR)
constexpr int64_t kDepth = 256;  // coordinates per slice: a 16 KB panel slice

// Part h of a wider vector w as a vector N (lanes [h * lanes(N), (h + 1) * lanes(N))), and back.
template <typename N, typename W>
static inline N part(const W& w, int h) {
  N n;
  std::memcpy(&n, reinterpret_cast<const char*>(&w) + h * sizeof(N), sizeof(N));
  return n;
}
template <typename N, typename W>
static inline void set_part(W& w, int h, const N& n) {
  std::memcpy(reinterpret_cast<char*>(&w) + h * sizeof(N), &n, sizeof(N));
}

// Where a micro-tile reads its rows: in place through MR row pointers (kInPlace), the same while copying them
// coordinate-major to xp[j * MR + r] (kCopy), or from that copy (kPacked), so that the later panels of a slice
// read one stream instead of MR. kInPlace is apart from kCopy so its loads fold into the broadcasts (with a
// run-time test for the copy, each row value took a scalar load, a broadcast and a branch).
enum class Src { kInPlace, kCopy, kPacked };

// dots[q * MR + r] += x[r][0:depth] . panels[q][0:depth][0:LANES] for the MR rows and P panels of a micro-tile,
// each panel's first LANES lanes as LANES / (lanes of V) vectors V. LANES is 16, or 8 for a last panel of at most
// 8 centroids (k % 16 in 1..8; K = 100 leaves 4): half the multiply-adds. Every lane is the same operations in the
// same order whatever V and LANES, so the bits are the same; lanes past LANES stay as they came (zero), and their
// distances are +inf through the panel's norms.
template <typename V, int LANES, int P, Src S>
static inline void micro_tile(const float* const* rows, float* xp, const float* const* panels, int64_t depth,
                              v16* dots) {
  constexpr int L = sizeof(V) / sizeof(float), H = LANES / L;
  static_assert(LANES % L == 0 && LANES <= kPanel, "a panel's lanes must split into whole vectors");
  V a[P][H][MR];
  for (int q = 0; q < P; ++q)
    for (int h = 0; h < H; ++h)
      for (int r = 0; r < MR; ++r) a[q][h][r] = part<V>(dots[q * MR + r], h);
  for (int64_t j = 0; j < depth; ++j) {
    V p[P][H];
    for (int q = 0; q < P; ++q)
      for (int h = 0; h < H; ++h) std::memcpy(&p[q][h], panels[q] + j * kPanel + h * L, sizeof(V));
    for (int r = 0; r < MR; ++r) {
      float xv;
      if constexpr (S == Src::kPacked) {
        xv = xp[j * MR + r];
      } else {
        xv = rows[r][j];
        if constexpr (S == Src::kCopy) xp[j * MR + r] = xv;
      }
      for (int q = 0; q < P; ++q)
        for (int h = 0; h < H; ++h) a[q][h][r] += xv * p[q][h];
    }
  }
  for (int q = 0; q < P; ++q)
    for (int h = 0; h < H; ++h)
      for (int r = 0; r < MR; ++r) set_part(dots[q * MR + r], h, a[q][h][r]);
}

// The micro-tile for P panels of LANES lanes, reading its rows as `src` says.
template <int LANES, int P>
static inline void micro_tile(Src src, const float* const* rows, float* xp, const float* const* panels,
                              int64_t depth, v16* dots) {
  using V = std::conditional_t<LANES == kPanel, vnative, vhalf>;
  switch (src) {
    case Src::kInPlace:
      return micro_tile<V, LANES, P, Src::kInPlace>(rows, xp, panels, depth, dots);
    case Src::kCopy:
      return micro_tile<V, LANES, P, Src::kCopy>(rows, xp, panels, depth, dots);
    case Src::kPacked:
      return micro_tile<V, LANES, P, Src::kPacked>(rows, xp, panels, depth, dots);
  }
}

constexpr int kLanes = sizeof(vnative) / sizeof(float);
typedef int32_t inative __attribute__((vector_size(sizeof(vnative)), aligned(4)));

// sq_dist_from_dot (kmeans_common.h), sixteen lanes at a time: the same operations in the same order.
static inline v16 distances(float x_norm, const v16& dots, const v16& c_norm) {
  v16 out;
  for (int h = 0; h < kPanel / kLanes; ++h) {
    const vnative dist = (x_norm - 2.0f * part<vnative>(dots, h)) + part<vnative>(c_norm, h);
    set_part(out, h, vnative(dist > 0.0f ? dist : vnative{}));
  }
  return out;
}

// Calls visit(row, panel, distances) for every row of [0, n) and every panel, NP panels at a time within a block
// of rows, so visits to one row come in increasing centroid order. `distances` holds the 16 squared distances of
// the panel as one vector (lanes past k carry +inf through their infinite norm).
template <typename Visit>
static inline void for_each_panel(const float* x, int64_t n, const float* x_norm, const PackedCentroids& c,
                                  Visit visit) {
  const int64_t d = c.d;
  // Rows whose stride is a multiple of 4 KB (d a multiple of 1024, as Llama's 4096) map to one L1 set, so
  // reading MR of them side by side evicts its own lines: then the first panels of a slice copy the rows into
  // micro-tiles (MR rows, coordinate-major) as they read them, and the later panels read the copy. Other widths
  // read in place (the copy costs a few percent there: D = 576, 14.3 -> 14.8 ms).
  const bool pack = d % 1024 == 0;
  std::vector<float> xp(pack ? kRows * kDepth : 0);
  // Partial dots [panel][row] of the block, carried from one coordinate slice to the next.
  std::vector<v16> dots(d > kDepth ? c.panels * kRows : 0);
  for (int64_t b0 = 0; b0 < n; b0 += kRows) {
    const int64_t nb = n - b0 < kRows ? n - b0 : kRows;
    for (int64_t j0 = 0; j0 < d; j0 += kDepth) {
      const int64_t depth = d - j0 < kDepth ? d - j0 : kDepth;
      const bool first = j0 == 0, last = j0 + depth == d;
      for (int64_t p0 = 0; p0 < c.panels; p0 += NP) {
        const int64_t np = c.panels - p0 < NP ? c.panels - p0 : NP;
        const bool half = np == 1 && c.k - p0 * kPanel <= kPanel / 2;  // the last panel, at most 8 centroids
        const float* slices[NP];
        v16 cn[NP];
        for (int q = 0; q < np; ++q) {
          slices[q] = c.data.data() + ((p0 + q) * d + j0) * kPanel;
          std::memcpy(&cn[q], c.norm.data() + (p0 + q) * kPanel, sizeof(v16));
        }
        for (int64_t r0 = 0; r0 < nb; r0 += MR) {
          const int64_t mr = nb - r0 < MR ? nb - r0 : MR;
          v16 acc[NP * MR];  // [panel][row]
          for (int r = 0; r < MR; ++r)
            for (int64_t q = 0; q < np; ++q)
              acc[q * MR + r] = first ? v16{} : dots[(p0 + q) * kRows + r0 + (r < mr ? r : 0)];
          // Missing rows of the last micro-tile repeat its first row (their results are dropped). A last step with
          // fewer panels runs the one-panel tile, or its 8-lane half for a last panel of at most 8 centroids
          // (k-means++ scores one centroid, then 2 + ln k candidates, at a time).
          const float* rows[MR];
          for (int r = 0; r < MR; ++r) rows[r] = x + (b0 + r0 + (r < mr ? r : 0)) * d + j0;
          float* tile = pack ? xp.data() + r0 * depth : nullptr;
          const Src src = !pack ? Src::kInPlace : p0 == 0 ? Src::kCopy : Src::kPacked;
          if (half) {
            micro_tile<kPanel / 2, 1>(src, rows, tile, slices, depth, acc);
          } else if (np == NP) {
            micro_tile<kPanel, NP>(src, rows, tile, slices, depth, acc);
          } else {
            micro_tile<kPanel, 1>(src, rows, tile, slices, depth, acc);
          }
          // The last slice turns its dots into distances straight from the registers (the only slice when
          // d <= kDepth); earlier slices park partial dots in dots[].
          for (int64_t r = 0; r < mr; ++r) {
            for (int64_t q = 0; q < np; ++q) {
              if (last) {
                visit(b0 + r0 + r, p0 + q, distances(x_norm[b0 + r0 + r], acc[q * MR + r], cn[q]));
              } else {
                dots[(p0 + q) * kRows + r0 + r] = acc[q * MR + r];
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
  for_each_panel(x, n, x_norm, c, [&](int64_t r, int64_t p, const v16& dv) {
    for (int h = 0; h < kPanel / kLanes; ++h) {
      const vnative d = part<vnative>(dv, h), b = part<vnative>(best[r], h);
      const inative better = d < b;
      set_part(best[r], h, vnative(better ? d : b));
      const inative panel = inative{} + static_cast<int32_t>(p);
      set_part(best_panel[r], h, inative(better ? panel : part<inative>(best_panel[r], h)));
    }
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
  for_each_panel(x, n, x_norm, c, [&](int64_t r, int64_t p, const v16& dv) {
    float lanes[kPanel];
    std::memcpy(lanes, &dv, sizeof(lanes));
    std::memcpy(out + r * ldo + p * kPanel, lanes, sizeof(float) * tile_extent(c.k, kPanel, p));
  });
}

// One running sum per lane instead of one per row: a single sum is a chain of dependent adds, latency-bound (at
// 20k x 576 on two cores the Lloyd iteration that computed the norms so took 27-29 ms, the others 19-20; with
// sixteen sums, 19-21 against 17: KMeans(...).fit(x).stats[i].seconds). The order is fixed per row, so any
// thread count gives the same bits.
static void sq_norms(const float* x, int64_t n, int64_t d, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float* row = x + i * d;
    vnative acc[kPanel / kLanes] = {};
    int64_t t = 0;
    for (; t + kPanel <= d; t += kPanel) {
      for (int h = 0; h < kPanel / kLanes; ++h) {
        vnative v;
        std::memcpy(&v, row + t + h * kLanes, sizeof(vnative));
        acc[h] += v * v;
      }
    }
    float s = 0.0f;
    for (int lane = 0; lane < kPanel; ++lane) s += acc[lane / kLanes][lane % kLanes];
    // Fused where the instruction set has it, explicitly: GCC vectorises this loop with rounded products on AVX2
    // and fuses them on AVX-512, which made the two variants' norms differ in the last bit.
#if defined(__FMA__)
    for (; t < d; ++t) s = __builtin_fmaf(row[t], row[t], s);
#else
    for (; t < d; ++t) s += row[t] * row[t];
#endif
    out[i] = s;
  }
}

// Elementwise in float64, so every ISA adds the same values in the same order: bitwise the same sums.
static void sum_rows(const float* x, int64_t d, const int64_t* rows, int64_t count, int64_t c0, int64_t width,
                     double* acc) {
  for (int64_t e = 0; e < count; ++e) {
    const float* src = x + rows[e] * d + c0;
    for (int64_t t = 0; t < width; ++t) acc[t] += src[t];
  }
}

}  // namespace kclip::cpu::KCLIP_ISA_NS

#define KCLIP_CAT2(a, b) a##b
#define KCLIP_CAT(a, b) KCLIP_CAT2(a, b)
#define KCLIP_STR2(x) #x
#define KCLIP_STR(x) KCLIP_STR2(x)

namespace kclip::cpu {
extern const IsaKernels KCLIP_CAT(KCLIP_ISA_NS, _kernels);
const IsaKernels KCLIP_CAT(KCLIP_ISA_NS, _kernels) = {KCLIP_STR(KCLIP_ISA_NS), KCLIP_ISA_NS::MR,
                                                       &KCLIP_ISA_NS::assign_rows, &KCLIP_ISA_NS::dist_rows,
                                                       &KCLIP_ISA_NS::sq_norms, &KCLIP_ISA_NS::sum_rows};
}  // namespace kclip::cpu
