// Times the CPU distance micro-kernel alone (one ISA variant of csrc/kmeans_cpu_isa.cpp, assign_rows over
// random rows in 768-row OpenMP tasks, as kclip::cpu::assign schedules them), outside Python and outside the
// rest of Lloyd's iteration: for work on the micro-kernel, where the whole benchmark's noise hides a few percent.
// Prints the median of 9 passes, the rate in GFLOP/s (2 N K D) and a checksum of the labels (equal between
// variants of the same arithmetic). Build and run from the repository root:
//
//   g++ -O3 -ffp-contract=fast -mavx512f -mavx2 -mfma -fopenmp -Icsrc -DKCLIP_ISA_NS=avx512 -DKCLIP_MR=12 \
//       -DKCLIP_NP=2 bench/kmeans_cpu_harness.cpp csrc/kmeans_cpu_isa.cpp -o /tmp/kmeans_harness
//   /tmp/kmeans_harness 4096          # D; optional N (default 20000) and K (default 100)
//
// (for the AVX2 variant: -mavx2 -mfma -DKCLIP_ISA_NS=avx2 -DKCLIP_MR=6 -DKCLIP_NP=1; generic: no -m flags,
// -DKCLIP_ISA_NS=generic -DKCLIP_MR=4 -DKCLIP_NP=1). To compare two versions of the kernel, build each from its
// own copy of kmeans_cpu_isa.cpp (`git show REV:csrc/kmeans_cpu_isa.cpp > /tmp/old.cpp`) and run them in
// turn several times: this machine's speed drifts over minutes.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kmeans_cpu.h"

#define KCLIP_CAT2(a, b) a##b
#define KCLIP_CAT(a, b) KCLIP_CAT2(a, b)

namespace kclip::cpu {
extern const IsaKernels KCLIP_CAT(KCLIP_ISA_NS, _kernels);

// kmeans_cpu.cpp's packing, without its ISA dispatch (this harness links one variant only).
PackedCentroids pack_centroids(const float* c, int64_t k, int64_t d) {
  PackedCentroids p;
  p.k = k;
  p.d = d;
  p.panels = (k + kPanel - 1) / kPanel;
  p.data.assign(p.panels * d * kPanel, 0.0f);
  p.norm.assign(p.panels * kPanel, INFINITY);
  KCLIP_CAT(KCLIP_ISA_NS, _kernels).sq_norms(c, k, d, p.norm.data());
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < d; ++t) p.data[(j / kPanel) * d * kPanel + t * kPanel + j % kPanel] = c[j * d + t];
  }
  return p;
}
}  // namespace kclip::cpu

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s D [N [K]]\n", argv[0]);
    return 2;
  }
  const int64_t d = std::atoll(argv[1]);
  const int64_t n = argc > 2 ? std::atoll(argv[2]) : 20000;
  const int64_t k = argc > 3 ? std::atoll(argv[3]) : 100;
  constexpr int64_t kBlock = 768;
  const kclip::cpu::IsaKernels& isa = kclip::cpu::KCLIP_CAT(KCLIP_ISA_NS, _kernels);
  std::vector<float> x(n * d);
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(gen);
  std::vector<float> x_norm(n);
  isa.sq_norms(x.data(), n, d, x_norm.data());
  const kclip::cpu::PackedCentroids packed = kclip::cpu::pack_centroids(x.data(), k, d);  // the first k rows
  std::vector<int64_t> labels(n);
  std::vector<float> dist(n);
  std::vector<double> seconds;
  for (int rep = 0; rep < 9; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t b = 0; b < (n + kBlock - 1) / kBlock; ++b) {
      const int64_t r0 = b * kBlock, rows = std::min(kBlock, n - r0);
      isa.assign_rows(x.data() + r0 * d, rows, x_norm.data() + r0, packed, labels.data() + r0, dist.data() + r0);
    }
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(seconds.begin(), seconds.end());
  int64_t checksum = 0;
  for (int64_t l : labels) checksum += l;
  std::printf("%s n=%ld d=%ld k=%ld threads=%d: median %.2f ms, %.0f GFLOP/s, label checksum %ld\n", isa.name, n, d,
              k, omp_get_max_threads(), seconds[4] * 1e3, 2.0 * n * k * d / seconds[4] / 1e9, checksum);
  return 0;
}
