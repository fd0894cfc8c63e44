// CUDA k-means kernels of kclip._C: nearest-centroid assignment, distance tiles, centroid sums and the
// soft-assignment softmax. The contract of every entry point is in kmeans_cuda.h; the tile arithmetic
// (distance from a dot product, argmin with ties to the lower index) comes from kmeans_common.h so the CPU
// and CUDA paths agree to the rounding of the dot products.
#include "kmeans_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kmeans_common.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kclip's CUDA kernels need sm_80 or newer (bf16 tensor cores)"
#endif

namespace kclip::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(kFullMask, v, lane_mask); }
__device__ __forceinline__ ArgMin shfl_xor(ArgMin v, int lane_mask) {
  const long long index = __shfl_xor_sync(kFullMask, static_cast<long long>(v.index), lane_mask);
  return ArgMin{shfl_xor(v.value, lane_mask), static_cast<int64_t>(index)};
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += shfl_xor(v, off);
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// Distance tiles. A block owns kBM rows of x and walks over all centroids in tiles of kBN; each centroid tile
// is a small GEMM over d in slices of kBK, staged through shared memory with register prefetch (the next slice
// is read from global memory while the current one is multiplied, so one barrier per slice suffices), or, for
// 16-bit rows of 16-byte multiples, copied by cp.async into a ring of slices (AsyncWmmaMainloop). A
// mainloop policy computes the kBM x kBN dot tile and hands every thread a kTM x kTN grid of (row, column,
// dot) values; an epilogue policy turns them into distances and either folds them into a running argmin per
// row (assign) or stores them (distances).
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct TileArgs {
  const T* x;            // [n, d]
  const T* c;            // [k, d]
  const float* c_norm;   // [k]
  int64_t n, d, k;
  bool vec;              // rows of x and c start on 16-byte boundaries: one 16-byte load per run
};

// Copies a ROWS x BK slice of a row-major [rows, d] matrix from global memory into registers. Thread `tid`
// owns kPerThread runs of kVec consecutive elements (16 bytes, held packed in a uint4) of one row. Rows >= rows
// and columns >= d read as zero (all-zero bits are +0 in fp32, fp16 and bf16), so they add nothing to a dot.
template <typename T, int ROWS, int BK, int THREADS>
struct TileLoader {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kRunsPerRow = BK / kVec;
  static constexpr int kPerThread = ROWS * kRunsPerRow / THREADS;
  static_assert(BK % kVec == 0 && (ROWS * kRunsPerRow) % THREADS == 0, "slice must split evenly into runs");
  using Bits = std::conditional_t<sizeof(T) == 2, unsigned short, unsigned int>;
  static_assert(sizeof(Bits) == sizeof(T), "fp32, fp16 or bf16 only");

  uint4 run[kPerThread];

  KCLIP_HD static int row(int tid, int r) { return (tid + r * THREADS) / kRunsPerRow; }
  KCLIP_HD static int col(int tid, int r) { return (tid + r * THREADS) % kRunsPerRow * kVec; }

  // tile points at row 0 of the slice owner (x + row0 * d or c + col0 * d); k0 is the first column.
  __device__ __forceinline__ void load(const T* tile, int64_t rows, int64_t d, int64_t k0, bool vec, int tid) {
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const int64_t rr = row(tid, r);
      const int64_t kk = k0 + col(tid, r);
      run[r] = make_uint4(0, 0, 0, 0);
      if (rr < rows && kk < d) {
        const T* src = tile + rr * d + kk;
        if (vec) {  // d % kVec == 0 and kk % kVec == 0: the whole run is inside the row
          run[r] = __ldg(reinterpret_cast<const uint4*>(src));
        } else {
          Bits b[kVec];
#pragma unroll
          for (int e = 0; e < kVec; ++e) b[e] = kk + e < d ? reinterpret_cast<const Bits*>(src)[e] : Bits(0);
          memcpy(&run[r], b, sizeof(b));
        }
      }
    }
  }

  // dst[row][col]: the slice as stored in global memory (16-byte stores).
  template <int LD>
  __device__ __forceinline__ void store_rows(T (*dst)[LD], int tid) const {
    static_assert(LD * sizeof(T) % 16 == 0, "rows of the shared tile must stay 16-byte aligned");
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) *reinterpret_cast<uint4*>(&dst[row(tid, r)][col(tid, r)]) = run[r];
  }

  // dst[col][row]: the slice transposed, so a thread reads consecutive rows of one column as a vector.
  template <int LD>
  __device__ __forceinline__ void store_cols(T (*dst)[LD], int tid) const {
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      T e[kVec];
      memcpy(e, &run[r], sizeof(e));
#pragma unroll
      for (int i = 0; i < kVec; ++i) dst[col(tid, r) + i][row(tid, r)] = e[i];
    }
  }
};

// fp32 mainloop: exact fp32 FFMA on CUDA cores (no TF32, so assignments match the CPU on fp32 data).
// 64 x 64 tile, kBK = 16, 256 threads as 16 x 16; thread (ty, tx) accumulates rows 4ty..4ty+3 times columns
// 4tx..4tx+3 in 16 registers. Shared memory holds the x and c slices transposed ([k][row], double-buffered,
// rows padded to 68 floats) so each step of k is two 16-byte shared loads and 16 FMAs per thread.
struct SimtMainloop {
  using T = float;
  static constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;
  static constexpr int kTM = 4, kTN = 4;
  static constexpr int kRowLanes = 16;  // lanes sharing a row: the 16 tx of one ty, lanes aligned to 16
  static constexpr int kMinBlocks = 3;   // per SM, i.e. at most 80 registers per thread
  static constexpr int kPad = 4;        // keeps rows 16-byte aligned for the vector loads
  using Loader = TileLoader<float, kBM, kBK, kThreads>;

  struct __align__(16) Smem {
    float xs[2][kBK][kBM + kPad];
    float cs[2][kBK][kBN + kPad];
    float x_norm[kBM];
    float c_norm[kBN];
  };

  float acc[kTM][kTN];

  KCLIP_HD static int thread_row(int tid, int i) { return (tid / 16) * kTM + i; }
  KCLIP_HD static int thread_col(int tid, int j) { return (tid % 16) * kTN + j; }
  __device__ __forceinline__ float dot(const Smem&, int, int i, int j) const { return acc[i][j]; }

  __device__ __forceinline__ void run(Smem& sm, const TileArgs<float>& p, int64_t row0, int64_t rows, int64_t col0,
                                      int64_t cols, int tid) {
    const float* xt = p.x + row0 * p.d;
    const float* ct = p.c + col0 * p.d;
    const int64_t steps = tile_count(p.d, kBK);
    const int ty = tid / 16, tx = tid % 16;

    Loader lx, lc;
    lx.load(xt, rows, p.d, 0, p.vec, tid);
    lc.load(ct, cols, p.d, 0, p.vec, tid);
    if (tid < kBN) sm.c_norm[tid] = tid < cols ? p.c_norm[col0 + tid] : 0.0f;
    lx.store_cols(sm.xs[0], tid);
    lc.store_cols(sm.cs[0], tid);
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = 0.0f;
    }
    __syncthreads();

    for (int64_t s = 0; s < steps; ++s) {
      const int buf = static_cast<int>(s & 1);
      const bool more = s + 1 < steps;
      if (more) {
        lx.load(xt, rows, p.d, (s + 1) * kBK, p.vec, tid);
        lc.load(ct, cols, p.d, (s + 1) * kBK, p.vec, tid);
      }
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        const float4 a = *reinterpret_cast<const float4*>(&sm.xs[buf][kk][ty * kTM]);
        const float4 b = *reinterpret_cast<const float4*>(&sm.cs[buf][kk][tx * kTN]);
        const float av[kTM] = {a.x, a.y, a.z, a.w};
        const float bv[kTN] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
      }
      // The other buffer was last read in step s - 1, which every thread finished before the barrier below
      // that step; the barrier below this step publishes the new slice and retires this buffer.
      if (more) {
        lx.store_cols(sm.xs[buf ^ 1], tid);
        lc.store_cols(sm.cs[buf ^ 1], tid);
      }
      __syncthreads();
    }
  }
};

// A warp's 32 x 32 quarter of a 16-bit tile as 2 x 2 wmma fragments (16x16x16, fp32 accumulators): the part of
// the work that WmmaMainloop and AsyncWmmaMainloop share. xs and cs point at the warp's first row of the x slice
// and of the centroid slice, both row-major [row][k] with row stride ld; c read as a col_major matrix_b is c^T.
template <typename T>
struct WarpTile32 {
  static constexpr int kFrag = 16;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  FragC acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int fm = 0; fm < 2; ++fm) {
#pragma unroll
      for (int fn = 0; fn < 2; ++fn) nvcuda::wmma::fill_fragment(acc[fm][fn], 0.0f);
    }
  }

  // acc += x[0:32][0:BK] . c[0:32][0:BK]^T
  template <int BK>
  __device__ __forceinline__ void multiply(const T* xs, const T* cs, int ld) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += kFrag) {
      FragA a[2];
      FragB b[2];
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        nvcuda::wmma::load_matrix_sync(a[f], xs + f * kFrag * ld + kk, ld);
        nvcuda::wmma::load_matrix_sync(b[f], cs + f * kFrag * ld + kk, ld);
      }
#pragma unroll
      for (int fm = 0; fm < 2; ++fm) {
#pragma unroll
        for (int fn = 0; fn < 2; ++fn) nvcuda::wmma::mma_sync(acc[fm][fn], a[fm], b[fn], acc[fm][fn]);
      }
    }
  }

  // The accumulators into the fp32 tile `out` (the warp's first element, row stride ld).
  __device__ __forceinline__ void store(float* out, int ld) const {
#pragma unroll
    for (int fm = 0; fm < 2; ++fm) {
#pragma unroll
      for (int fn = 0; fn < 2; ++fn) {
        nvcuda::wmma::store_matrix_sync(out + fm * kFrag * ld + fn * kFrag, acc[fm][fn], ld,
                                        nvcuda::wmma::mem_row_major);
      }
    }
  }
};

// fp16 / bf16 mainloop: tensor cores through nvcuda::wmma (16x16x16, fp32 accumulators).
// 64 x 64 tile, kBK = 32, 128 threads = 4 warps as 2 x 2; a warp owns a 32 x 32 quarter, i.e. 2 x 2
// accumulator fragments. The x and c slices sit row-major in shared memory ([row][k], double-buffered, rows
// padded to 40 elements = 80 bytes so ldmatrix rows hit distinct banks); c read as a col_major matrix_b is
// c^T. After the last slice the accumulators go through a shared fp32 staging tile (aliasing the slice
// buffers, [row][col] padded to 72 floats) from which thread (rg, cg) reads rows rg + 16i, columns cg + 8j
// without bank conflicts; the layout of a wmma accumulator is opaque, so this is where rows become known.
template <typename ElemT>
struct WmmaMainloop {
  using T = ElemT;
  static constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128;
  static constexpr int kTM = 4, kTN = 8;
  static constexpr int kRowLanes = 8;  // lanes sharing a row: the 8 cg of one rg, lanes aligned to 8
  static constexpr int kMinBlocks = 4;  // per SM, i.e. at most 128 registers per thread
  static constexpr int kLdIn = kBK + 8;
  static constexpr int kLdStage = kBN + 8;
  using Loader = TileLoader<T, kBM, kBK, kThreads>;

  // wmma needs 32-byte aligned fragment pointers: every fragment origin below is a multiple of 32 bytes.
  struct __align__(32) Smem {
    union {
      struct {
        T xs[2][kBM][kLdIn];
        T cs[2][kBN][kLdIn];
      } in;
      float stage[kBM][kLdStage];
    } u;
    float x_norm[kBM];
    float c_norm[kBN];
  };

  WarpTile32<T> warp_tile;

  KCLIP_HD static int thread_row(int tid, int i) { return tid / 8 + 16 * i; }
  KCLIP_HD static int thread_col(int tid, int j) { return tid % 8 + 8 * j; }
  __device__ __forceinline__ float dot(const Smem& sm, int tid, int i, int j) const {
    return sm.u.stage[thread_row(tid, i)][thread_col(tid, j)];
  }

  __device__ __forceinline__ void run(Smem& sm, const TileArgs<T>& p, int64_t row0, int64_t rows, int64_t col0,
                                      int64_t cols, int tid) {
    const T* xt = p.x + row0 * p.d;
    const T* ct = p.c + col0 * p.d;
    const int64_t steps = tile_count(p.d, kBK);
    const int warp = tid / 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;

    Loader lx, lc;
    lx.load(xt, rows, p.d, 0, p.vec, tid);
    lc.load(ct, cols, p.d, 0, p.vec, tid);
    if (tid < kBN) sm.c_norm[tid] = tid < cols ? p.c_norm[col0 + tid] : 0.0f;
    lx.store_rows(sm.u.in.xs[0], tid);
    lc.store_rows(sm.u.in.cs[0], tid);
    warp_tile.zero();
    __syncthreads();

    for (int64_t s = 0; s < steps; ++s) {
      const int buf = static_cast<int>(s & 1);
      const bool more = s + 1 < steps;
      if (more) {
        lx.load(xt, rows, p.d, (s + 1) * kBK, p.vec, tid);
        lc.load(ct, cols, p.d, (s + 1) * kBK, p.vec, tid);
      }
      warp_tile.template multiply<kBK>(&sm.u.in.xs[buf][wm][0], &sm.u.in.cs[buf][wn][0], kLdIn);
      if (more) {  // same buffer discipline as SimtMainloop::run
        lx.store_rows(sm.u.in.xs[buf ^ 1], tid);
        lc.store_rows(sm.u.in.cs[buf ^ 1], tid);
      }
      __syncthreads();
    }

    // The barrier ending the last step retired the slice buffers that the staging tile overwrites.
    warp_tile.store(&sm.u.stage[wm][wn], kLdStage);
    __syncthreads();
  }
};

// Asynchronous global-to-shared copies (sm_80+): 16 bytes a thread, zero-filled where `full` is false (the
// source is then not read, but must still be a valid address). A commit closes the group of copies issued since
// the last one; wait<N> returns once at most N of this thread's groups are still in flight.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool full) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(full ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// fp16 / bf16 mainloop for rows of 16-byte multiples (TileArgs::vec): a 128 x 64 tile, kBK = 32, 256 threads =
// 8 warps as 4 x 2, each warp a 32 x 32 quarter of 2 x 2 fragments as in WmmaMainloop, but the slices travel by
// cp.async into a ring of kStages shared buffers, so kStages - 1 slices are in flight while one is multiplied and
// no registers hold a slice on its way. Twice the rows per centroid tile read from L2 as WmmaMainloop.
// Buffer discipline, step s: wait until slice s has landed (this thread's copies), barrier (everyone's copies
// visible; everyone has finished step s - 1, whose buffer the copies issued next overwrite), issue slice
// s + kStages - 1, multiply slice s. A commit follows every issue, empty or not, so wait<kStages - 2> always
// means "slice s has landed". The staging tile of the epilogue (same layout as WmmaMainloop's) aliases the ring.
template <typename ElemT>
struct AsyncWmmaMainloop {
  using T = ElemT;
  static constexpr int kBM = 128, kBN = 64, kBK = 32, kThreads = 256, kStages = 3;
  static constexpr int kTM = 4, kTN = 8;
  static constexpr int kRowLanes = 8;   // lanes sharing a row: the 8 cg of one rg, lanes aligned to 8
  static constexpr int kMinBlocks = 2;  // per SM, i.e. at most 128 registers per thread
  static constexpr int kLdIn = kBK + 8;
  static constexpr int kLdStage = kBN + 8;
  static constexpr int kFrag = WarpTile32<T>::kFrag;
  // The copy map: the same runs of kVec elements as TileLoader's (each run is 16 bytes of one row).
  using XRuns = TileLoader<T, kBM, kBK, kThreads>;
  using CRuns = TileLoader<T, kBN, kBK, kThreads>;

  struct __align__(32) Smem {
    union {
      struct {
        T xs[kStages][kBM][kLdIn];
        T cs[kStages][kBN][kLdIn];
      } in;
      float stage[kBM][kLdStage];
    } u;
    float x_norm[kBM];
    float c_norm[kBN];
  };
  static_assert(sizeof(Smem) <= 48 * 1024, "static shared memory is capped at 48 KB");
  static_assert(kLdIn * sizeof(T) % 16 == 0, "cp.async destinations: rows of the ring must stay 16-byte aligned");
  static_assert(kFrag * kLdIn * sizeof(T) % 32 == 0 && sizeof(T[kStages][kBM][kLdIn]) % 32 == 0 &&
                    kFrag * sizeof(T) % 32 == 0,
                "wmma fragment origins in the ring must be 32-byte aligned");

  WarpTile32<T> warp_tile;

  KCLIP_HD static int thread_row(int tid, int i) { return tid / 8 + 32 * i; }
  KCLIP_HD static int thread_col(int tid, int j) { return tid % 8 + 8 * j; }
  __device__ __forceinline__ float dot(const Smem& sm, int tid, int i, int j) const {
    return sm.u.stage[thread_row(tid, i)][thread_col(tid, j)];
  }

  // Slice [k0, k0 + kBK) of `rows` rows of src ([rows, d]) into dst, by the runs Runs maps to this thread. With
  // vec, d is a multiple of the run, so a run is wholly inside the row or wholly past it (zero-filled).
  template <class Runs>
  __device__ __forceinline__ static void issue_rows(T (*dst)[kLdIn], const T* src, int64_t rows, int64_t d,
                                                    int64_t k0, int tid) {
#pragma unroll
    for (int r = 0; r < Runs::kPerThread; ++r) {
      const int rr = Runs::row(tid, r), cc = Runs::col(tid, r);
      const bool in = rr < rows && k0 + cc < d;
      cp_async16(&dst[rr][cc], in ? src + rr * d + k0 + cc : src, in);
    }
  }

  // Slice [k0, k0 + kBK) of the block's x rows and of the centroid tile into ring buffer `buf`.
  __device__ __forceinline__ static void issue(Smem& sm, int buf, const T* xt, int64_t rows, const T* ct,
                                               int64_t cols, int64_t d, int64_t k0, int tid) {
    issue_rows<XRuns>(sm.u.in.xs[buf], xt, rows, d, k0, tid);
    issue_rows<CRuns>(sm.u.in.cs[buf], ct, cols, d, k0, tid);
  }

  __device__ __forceinline__ void run(Smem& sm, const TileArgs<T>& p, int64_t row0, int64_t rows, int64_t col0,
                                      int64_t cols, int tid) {
    const T* xt = p.x + row0 * p.d;
    const T* ct = p.c + col0 * p.d;
    const int64_t steps = tile_count(p.d, kBK);
    const int warp = tid / 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;

    if (tid < kBN) sm.c_norm[tid] = tid < cols ? p.c_norm[col0 + tid] : 0.0f;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < steps) issue(sm, s, xt, rows, ct, cols, p.d, s * kBK, tid);
      cp_async_commit();
    }
    warp_tile.zero();

    for (int64_t s = 0; s < steps; ++s) {
      cp_async_wait<kStages - 2>();
      __syncthreads();
      const int64_t next = s + kStages - 1;
      if (next < steps) issue(sm, static_cast<int>(next % kStages), xt, rows, ct, cols, p.d, next * kBK, tid);
      cp_async_commit();
      const int buf = static_cast<int>(s % kStages);
      warp_tile.template multiply<kBK>(&sm.u.in.xs[buf][wm][0], &sm.u.in.cs[buf][wn][0], kLdIn);
    }

    // Only empty groups can be in flight now; the barrier retires the ring that the staging tile overwrites.
    cp_async_wait<0>();
    __syncthreads();
    warp_tile.store(&sm.u.stage[wm][wn], kLdStage);
    __syncthreads();
  }
};

// Running argmin per row, kept in registers across all centroid tiles; at the end the kRowLanes threads that
// share a row merge their partial results with butterfly shuffles and the first of them writes the row.
struct AssignArgs {
  int64_t* labels;  // [n]
  float* dist;      // [n]
};

template <int TM>
struct AssignEpilogue {
  using Args = AssignArgs;
  Args args;
  int64_t n;
  ArgMin best[TM];

  __device__ __forceinline__ AssignEpilogue(const Args& a, int64_t rows_total) : args(a), n(rows_total) {
#pragma unroll
    for (int i = 0; i < TM; ++i) best[i] = argmin_init();
  }

  __device__ __forceinline__ void apply(int i, int64_t, int64_t col, float d2) {
    best[i] = argmin_update(best[i], d2, col);
  }

  template <class ML>
  __device__ __forceinline__ void finish(int64_t row0, int tid) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      ArgMin b = best[i];
#pragma unroll
      for (int off = ML::kRowLanes / 2; off > 0; off >>= 1) b = argmin_merge(b, shfl_xor(b, off));
      const int64_t row = row0 + ML::thread_row(tid, i);
      if (tid % ML::kRowLanes == 0 && row < n) {
        args.labels[row] = b.index;
        args.dist[row] = b.value;
      }
    }
  }
};

// Distances stored as they are produced; nothing to merge.
struct DistanceArgs {
  float* out;   // [n, ldo]
  int64_t ldo;
};

template <int TM>
struct DistanceEpilogue {
  using Args = DistanceArgs;
  Args args;
  int64_t n;

  __device__ __forceinline__ DistanceEpilogue(const Args& a, int64_t rows_total) : args(a), n(rows_total) {}

  __device__ __forceinline__ void apply(int, int64_t row, int64_t col, float d2) {
    if (row < n) args.out[row * args.ldo + col] = d2;
  }

  template <class ML>
  __device__ __forceinline__ void finish(int64_t, int) {}
};

// ||x_r||^2 in fp32 of the values as stored, for the ROWS rows of a block: one warp per row, lanes across d.
template <typename T, int ROWS, int THREADS>
__device__ __forceinline__ void row_norms(const T* tile, int64_t rows, int64_t d, float* out, int tid) {
  const int lane = tid % 32;
  for (int r = tid / 32; r < ROWS; r += THREADS / 32) {
    float s = 0.0f;
    if (r < rows) {
      const T* src = tile + static_cast<int64_t>(r) * d;
      for (int64_t j = lane; j < d; j += 32) {
        const float v = to_float(src[j]);
        s = fmaf(v, v, s);
      }
    }
    s = warp_sum(s);
    if (lane == 0) out[r] = s;
  }
}

// One block per kBM rows of x (blockIdx.x). Shared memory: the mainloop's slice buffers plus ||x||^2 of the
// block's rows (computed first, one warp per row) and ||c||^2 of the current centroid tile. Registers: the
// mainloop's dot tile and the epilogue's state (for assign, one running ArgMin per owned row). Every thread
// runs to the end (rows >= n and centroids >= k are masked, never returned early) so barriers and shuffles
// see the whole block.
template <class ML, template <int> class Epi>
__global__ void __launch_bounds__(ML::kThreads, ML::kMinBlocks)
    distance_tile_kernel(const TileArgs<typename ML::T> p, const typename Epi<ML::kTM>::Args epi_args) {
  __shared__ typename ML::Smem sm;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * ML::kBM;
  const int64_t rows = tile_extent(p.n, ML::kBM, blockIdx.x);

  row_norms<typename ML::T, ML::kBM, ML::kThreads>(p.x + row0 * p.d, rows, p.d, sm.x_norm, tid);
  __syncthreads();
  float x_norm[ML::kTM];
#pragma unroll
  for (int i = 0; i < ML::kTM; ++i) x_norm[i] = sm.x_norm[ML::thread_row(tid, i)];

  Epi<ML::kTM> epi(epi_args, p.n);
  ML ml;
  const int64_t tiles = tile_count(p.k, ML::kBN);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t col0 = t * ML::kBN;
    const int64_t cols = tile_extent(p.k, ML::kBN, t);
    ml.run(sm, p, row0, rows, col0, cols, tid);
#pragma unroll
    for (int i = 0; i < ML::kTM; ++i) {
      const int64_t row = row0 + ML::thread_row(tid, i);
#pragma unroll
      for (int j = 0; j < ML::kTN; ++j) {
        const int c = ML::thread_col(tid, j);
        if (c < cols) epi.apply(i, row, col0 + c, sq_dist_from_dot(x_norm[i], sm.c_norm[c], ml.dot(sm, tid, i, j)));
      }
    }
    __syncthreads();  // the next tile overwrites c_norm (and, for wmma, the staging tile)
  }
  epi.template finish<ML>(row0, tid);
}

// ---------------------------------------------------------------------------------------------------------
// Centroid sums. One warp per row (grid-stride over rows), lanes across d: fp32 atomicAdd of the row into
// sums[label], and lane 0 counts the row. Labels outside [0, k) are skipped rather than written out of bounds.
// ---------------------------------------------------------------------------------------------------------
constexpr int kAccumulateThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kAccumulateThreads)
    accumulate_kernel(const T* x, int64_t n, int64_t d, const int64_t* labels, int64_t k, float* sums,
                      int64_t* counts) {
  constexpr int kWarps = kAccumulateThreads / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < n; row += stride) {
    const int64_t label = labels[row];
    if (label < 0 || label >= k) continue;
    const T* src = x + row * d;
    float* dst = sums + label * d;
    for (int64_t j = lane; j < d; j += 32) atomicAdd(dst + j, to_float(src[j]));
    if (lane == 0) atomicAdd(reinterpret_cast<unsigned long long*>(counts + label), 1ull);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Soft assignment. The softmax is taken over logits -dist * inv_t; the code works with cost = dist * inv_t
// (rounded once, __fmul_rn, so every pass sees the same value) and its minimum m, so exp(m - cost) <= 1.
// ---------------------------------------------------------------------------------------------------------
constexpr int kSoftMaxThreads = 256;
constexpr int kSoftMaxWarps = kSoftMaxThreads / 32;
constexpr int kMaxTopK = 64;

__device__ __forceinline__ float cost_of(float dist, float inv_t) { return __fmul_rn(dist, inv_t); }

struct MinOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct ArgMinOp {
  __device__ __forceinline__ ArgMin operator()(ArgMin a, ArgMin b) const { return argmin_merge(a, b); }
};

// Reduction over the block (blockDim.x a multiple of 32, at most kSoftMaxThreads); every thread gets the
// result. scratch[kSoftMaxWarps] carries it: the second barrier keeps the next call from overwriting the
// per-warp slots before thread 0 has read them, and thread 0 writes the result only after every thread has
// read the previous one (they all passed the first barrier of this call).
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V* scratch) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int warp = static_cast<int>(threadIdx.x / 32);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, shfl_xor(v, off));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    V r = scratch[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) r = op(r, scratch[w]);
    scratch[kSoftMaxWarps] = r;
  }
  __syncthreads();
  return scratch[kSoftMaxWarps];
}

// One block per row (grid-stride), threads strided over the k entries; nothing is cached between passes.
//   Dense: pass 1 finds min cost, pass 2 sums exp(m - cost), pass 3 writes exp(m - cost) / sum. Each entry
//   is written by the thread that reads it, after its last read, so dense_out may alias dist.
//   Top-k: each thread keeps its best top_k entries in the order (cost ascending, index ascending) while
//   reading its share of the row once (top_insert, kmeans_common.h), then top_k block-wide argmins over the
//   threads' list heads pick the row's best in that order (was: top_k passes over the row). Thread 0 then turns the picks (shared memory) into exp(m - cost) weights renormalised over the kept
//   entries and orders them by descending weight, ties to the lower index. NaN costs are never picked; a row
//   with fewer than top_k other entries gets index -1 / weight 0 in the missing slots.
__global__ void __launch_bounds__(kSoftMaxThreads)
    soft_assign_kernel(const float* dist, int64_t ldd, int64_t n, int64_t k, float inv_t, int top_k,
                       float* dense_out, int64_t* topk_idx, float* topk_w) {
  __shared__ float fscratch[kSoftMaxWarps + 1];
  __shared__ ArgMin ascratch[kSoftMaxWarps + 1];
  __shared__ float pick_w[kMaxTopK];
  __shared__ int64_t pick_j[kMaxTopK];
  const int64_t tid = threadIdx.x;
  const int64_t step = blockDim.x;

  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const float* drow = dist + row * ldd;
    if (top_k == 0) {
      float m = INFINITY;
      for (int64_t j = tid; j < k; j += step) m = fminf(m, cost_of(drow[j], inv_t));
      m = block_reduce(m, MinOp{}, fscratch);
      float s = 0.0f;
      for (int64_t j = tid; j < k; j += step) s += expf(m - cost_of(drow[j], inv_t));
      s = block_reduce(s, SumOp{}, fscratch);
      float* orow = dense_out + row * k;
      for (int64_t j = tid; j < k; j += step) {
        const float p = expf(m - cost_of(drow[j], inv_t)) / s;
        orow[j] = p;
      }
      continue;
    }

    // Each thread's best top_k of its entries (one read of the row), then top_k block-wide argmins of the
    // threads' heads: the winner's thread moves to its next entry.
    float lv[kMaxTopK];
    int32_t lj[kMaxTopK];
    int size = 0;
    for (int64_t j = tid; j < k; j += step) {
      top_insert(lv, lj, size, top_k, cost_of(drow[j], inv_t), static_cast<int32_t>(j));
    }
    int head = 0, kept = 0;
    for (int t = 0; t < top_k; ++t) {
      const ArgMin mine = head < size ? ArgMin{lv[head], lj[head]} : argmin_init();
      const ArgMin best = block_reduce(mine, ArgMinOp{}, ascratch);
      if (best.index < 0) break;  // only NaN left; block-uniform since every thread holds the same result
      if (head < size && lj[head] == best.index) ++head;
      if (tid == 0) {
        pick_w[t] = best.value;
        pick_j[t] = best.index;
      }
      kept = t + 1;
    }

    if (tid == 0) {
      const float m = pick_w[0];  // the smallest cost of the row
      float sum = 0.0f;
      for (int t = 0; t < kept; ++t) {
        pick_w[t] = expf(m - pick_w[t]);
        sum += pick_w[t];
      }
      for (int t = 0; t < kept; ++t) pick_w[t] /= sum;
      for (int t = 1; t < kept; ++t) {  // insertion sort: picks are already nearly in order
        const float w = pick_w[t];
        const int64_t j = pick_j[t];
        int s = t;
        for (; s > 0 && (pick_w[s - 1] < w || (pick_w[s - 1] == w && pick_j[s - 1] > j)); --s) {
          pick_w[s] = pick_w[s - 1];
          pick_j[s] = pick_j[s - 1];
        }
        pick_w[s] = w;
        pick_j[s] = j;
      }
      int64_t* orow_idx = topk_idx + row * top_k;
      float* orow_w = topk_w + row * top_k;
      for (int t = 0; t < top_k; ++t) {
        orow_idx[t] = t < kept ? pick_j[t] : -1;
        orow_w[t] = t < kept ? pick_w[t] : 0.0f;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------------------

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("kclip CUDA kernel ") + kernel + " failed: " + cudaGetErrorString(err));
  }
}

void check_sizes(const char* fn, int64_t n, int64_t d, int64_t k) {
  if (n < 0 || d < 1 || k < 1) {
    throw std::invalid_argument(std::string("kclip.cuda.") + fn + ": need n >= 0, d >= 1 and k >= 1, got n=" +
                                std::to_string(n) + ", d=" + std::to_string(d) + ", k=" + std::to_string(k));
  }
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <class ML, template <int> class Epi>
void launch_tiles(const void* x, const void* c, const float* c_norm, int64_t n, int64_t d, int64_t k, bool vec,
                  const typename Epi<ML::kTM>::Args& epi_args, cudaStream_t stream, const char* kernel) {
  using T = typename ML::T;
  const int64_t blocks = tile_count(n, ML::kBM);
  if (blocks > INT_MAX) throw std::invalid_argument(std::string("kclip.cuda: too many rows for ") + kernel);
  const TileArgs<T> p{static_cast<const T*>(x), static_cast<const T*>(c), c_norm, n, d, k, vec};
  distance_tile_kernel<ML, Epi><<<static_cast<unsigned>(blocks), ML::kThreads, 0, stream>>>(p, epi_args);
  check_launch(kernel);
}

int multiprocessor_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                                cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return sms;
}

template <typename T, template <int> class Epi, class Args>
void launch_wmma(const void* x, const void* c, const float* c_norm, int64_t n, int64_t d, int64_t k, const Args& args,
                 cudaStream_t s, const std::string& name) {
  const bool vec = d % 8 == 0 && aligned16(x) && aligned16(c);  // AsyncWmmaMainloop's copies need it
  // Read at every launch, so a test or a benchmark can switch it between calls; the bindings hold the GIL here,
  // so Python's os.environ writes cannot race the read.
  const char* forced = std::getenv("KCLIP_CUDA_TILE_ROWS");
  if (wmma_tile_rows(n, vec, multiprocessor_count(), forced ? forced : "") == 128) {
    return launch_tiles<AsyncWmmaMainloop<T>, Epi>(x, c, c_norm, n, d, k, vec, args, s,
                                                   (name + " wmma 128x64 cp.async>").c_str());
  }
  launch_tiles<WmmaMainloop<T>, Epi>(x, c, c_norm, n, d, k, vec, args, s, (name + " wmma 64x64>").c_str());
}

template <template <int> class Epi, class Args>
void dispatch_tiles(const void* x, const void* c, const float* c_norm, DType dt, int64_t n, int64_t d, int64_t k,
                    const Args& args, std::uintptr_t stream, const char* fn) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const std::string name = std::string("distance_tile_kernel<") + fn;
  switch (dt) {
    case DType::f32:
      return launch_tiles<SimtMainloop, Epi>(x, c, c_norm, n, d, k, d % 4 == 0 && aligned16(x) && aligned16(c), args,
                                             s, (name + ", f32 FFMA>").c_str());
    case DType::f16:
      return launch_wmma<__half, Epi>(x, c, c_norm, n, d, k, args, s, name + ", f16");
    case DType::bf16:
      return launch_wmma<__nv_bfloat16, Epi>(x, c, c_norm, n, d, k, args, s, name + ", bf16");
  }
  throw std::invalid_argument(std::string("kclip.cuda.") + fn + ": unknown dtype");
}

}  // namespace

int pointer_device(const void* p) {
  if (p == nullptr) return -1;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error of an unknown pointer
    return -1;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged ? attr.device : -1;
}

int current_device() {
  int d = -1;
  if (cudaGetDevice(&d) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return d;
}

DeviceStatus device_status() {
  DeviceStatus st;
  try {
    if (cudaDriverGetVersion(&st.driver_version) != cudaSuccess) st.driver_version = 0;
    if (cudaRuntimeGetVersion(&st.runtime_version) != cudaSuccess) st.runtime_version = 0;
    const auto version = [](int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); };
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err == cudaSuccess && count > 0) {
      st.device_count = count;
    } else if (err == cudaSuccess || err == cudaErrorNoDevice) {
      st.error = "no CUDA device";
    } else if (err == cudaErrorInsufficientDriver && st.driver_version == 0) {
      st.error = "no CUDA device (no CUDA driver found; this build needs one for CUDA " +
                 version(st.runtime_version) + ")";
    } else if (err == cudaErrorInsufficientDriver) {
      st.error = "no CUDA device (CUDA driver too old for this build: driver " + version(st.driver_version) +
                 ", runtime " + version(st.runtime_version) + ")";
    } else {
      st.error = std::string("no CUDA device (") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err) + ")";
    }
  } catch (...) {
    st.device_count = 0;
  }
  cudaGetLastError();  // clear a sticky error left by the queries
  return st;
}

void assign(const void* x, const void* c, const float* c_norm, DType dt, int64_t n, int64_t d, int64_t k,
            int64_t* labels, float* dist, std::uintptr_t stream) {
  check_sizes("assign", n, d, k);
  if (n == 0) return;
  dispatch_tiles<AssignEpilogue>(x, c, c_norm, dt, n, d, k, AssignArgs{labels, dist}, stream, "assign");
}

void distances(const void* x, const void* c, const float* c_norm, DType dt, int64_t n, int64_t d, int64_t k,
               float* out, int64_t ldo, std::uintptr_t stream) {
  check_sizes("distances", n, d, k);
  if (ldo < k) {
    throw std::invalid_argument("kclip.cuda.distances: row stride ldo=" + std::to_string(ldo) + " < k=" +
                                std::to_string(k));
  }
  if (n == 0) return;
  dispatch_tiles<DistanceEpilogue>(x, c, c_norm, dt, n, d, k, DistanceArgs{out, ldo}, stream, "distances");
}

void accumulate(const void* x, DType dt, int64_t n, int64_t d, const int64_t* labels, int64_t k, float* sums,
                int64_t* counts, std::uintptr_t stream) {
  check_sizes("accumulate", n, d, k);
  if (n == 0) return;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  constexpr int64_t kRowsPerBlock = kAccumulateThreads / 32;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(tile_count(n, kRowsPerBlock), 1 << 16));
  switch (dt) {
    case DType::f32:
      accumulate_kernel<<<blocks, kAccumulateThreads, 0, s>>>(static_cast<const float*>(x), n, d, labels, k, sums,
                                                              counts);
      return check_launch("accumulate_kernel<f32>");
    case DType::f16:
      accumulate_kernel<<<blocks, kAccumulateThreads, 0, s>>>(static_cast<const __half*>(x), n, d, labels, k, sums,
                                                              counts);
      return check_launch("accumulate_kernel<f16>");
    case DType::bf16:
      accumulate_kernel<<<blocks, kAccumulateThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(x), n, d, labels, k,
                                                              sums, counts);
      return check_launch("accumulate_kernel<bf16>");
  }
  throw std::invalid_argument("kclip.cuda.accumulate: unknown dtype");
}

void soft_assign(const float* dist, int64_t ldd, int64_t n, int64_t k, float inv_temperature, int64_t top_k,
                 float* dense_out, int64_t* topk_idx, float* topk_w, std::uintptr_t stream) {
  if (n < 0 || k < 1 || ldd < k) {
    throw std::invalid_argument("kclip.cuda.soft_assign: need n >= 0, k >= 1 and ldd >= k, got n=" +
                                std::to_string(n) + ", k=" + std::to_string(k) + ", ldd=" + std::to_string(ldd));
  }
  if (top_k < 0 || top_k > std::min<int64_t>(k, kMaxTopK)) {
    throw std::invalid_argument("kclip.cuda.soft_assign: top_k=" + std::to_string(top_k) + " outside [0, min(k=" +
                                std::to_string(k) + ", " + std::to_string(kMaxTopK) + ")]");
  }
  // dense_out is [n, k] with row stride k; writing it over dist in place is only safe with the same stride.
  if (top_k == 0 && dense_out == dist && ldd != k) {
    throw std::invalid_argument("kclip.cuda.soft_assign: in-place dense output needs ldd == k");
  }
  if (n == 0) return;
  const int threads = k >= kSoftMaxThreads ? kSoftMaxThreads : static_cast<int>(tile_count(k, 32) * 32);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(n, INT_MAX));
  soft_assign_kernel<<<blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      dist, ldd, n, k, inv_temperature, static_cast<int>(top_k), dense_out, topk_idx, topk_w);
  check_launch(top_k == 0 ? "soft_assign_kernel<dense>" : "soft_assign_kernel<top_k>");
}

}  // namespace kclip::cuda
