// kclip._C: the pybind11 module. Host arrays come in through the buffer protocol (numpy, memory maps);
// device arrays through __cuda_array_interface__ or DLPack (torch CUDA tensors, cupy arrays), so the module
// never links libtorch. Inputs are checked here, at the boundary, with messages that name the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kmeans_common.h"
#include "kmeans_cpu.h"
#include "kmeans_cuda.h"

namespace py = pybind11;

namespace {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

[[noreturn]] void fail(const std::string& name, const std::string& what) {
  throw std::invalid_argument(name + ": " + what);
}

// ---- host arrays -------------------------------------------------------------------------------------------

template <typename T>
const char* host_dtype_name();
template <>
const char* host_dtype_name<float>() { return "float32"; }
template <>
const char* host_dtype_name<int64_t>() { return "int64"; }

// A C-contiguous host array of dtype T and rank `ndim`; no silent conversion.
template <typename T>
py::array host_array(const py::handle& obj, const char* name, int ndim) {
  if (!py::isinstance<py::array>(obj)) {
    fail(name, std::string("expected a numpy array, got ") + std::string(py::str(py::type::of(obj))));
  }
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>())) {
    fail(name, std::string("must have dtype ") + host_dtype_name<T>() + ", got " + std::string(py::str(a.dtype())));
  }
  if (a.ndim() != ndim) {
    fail(name, "must have rank " + std::to_string(ndim) + ", got rank " + std::to_string(a.ndim()));
  }
  if (!(a.flags() & py::array::c_style)) fail(name, "must be C-contiguous");
  return a;
}

void require(bool ok, const std::string& name, const std::string& what) {
  if (!ok) fail(name, what);
}

// Points x [n, d] and centroids c [k, d], host float32 arrays of the same width.
struct HostPoints {
  py::array x, c;
  int64_t n, d, k;
  const float* xp() const { return static_cast<const float*>(x.data()); }
  const float* cp() const { return static_cast<const float*>(c.data()); }
};

HostPoints host_points(const py::handle& x_obj, const py::handle& c_obj) {
  HostPoints p{host_array<float>(x_obj, "x", 2), host_array<float>(c_obj, "centroids", 2), 0, 0, 0};
  p.n = p.x.shape(0);
  p.d = p.x.shape(1);
  p.k = p.c.shape(0);
  require(p.c.shape(1) == p.d, "centroids",
          "width " + std::to_string(p.c.shape(1)) + " does not match x's width " + std::to_string(p.d));
  require(p.d > 0, "x", "has width 0");
  require(p.k > 0, "centroids", "has no rows");
  return p;
}

// The rows' squared norms a caller computed once (cpu_row_sq_norms), or None: then nullptr, computed per call.
// The array is returned too, so it stays alive while the pointer is used.
std::pair<py::object, const float*> host_norms(const py::handle& obj, int64_t n) {
  if (obj.is_none()) return {py::none(), nullptr};
  py::array a = host_array<float>(obj, "x_norm", 1);
  require(a.shape(0) == n, "x_norm", "has " + std::to_string(a.shape(0)) + " entries for " + std::to_string(n) +
                                         " rows of x");
  return {a, static_cast<const float*>(a.data())};
}

// ---- device arrays -----------------------------------------------------------------------------------------

// DLPack's C ABI (dlpack.h, v0.x "dltensor" capsules), declared here to avoid a header dependency.
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
constexpr int32_t kDLCUDA = 2, kDLCUDAManaged = 13;
constexpr uint8_t kDLInt = 0, kDLFloat = 2, kDLBfloat = 4;

struct DeviceArray {
  void* ptr = nullptr;
  int device = -1;    // the CUDA device ordinal (-1: unknown, e.g. an empty array)
  std::string dtype;  // "float32", "float16", "bfloat16", "int64"
  std::vector<int64_t> shape;
  py::object keepalive;  // the DLPack capsule, alive for the call
};

std::string typestr_dtype(const std::string& t) {
  if (t == "<f4") return "float32";
  if (t == "<f2") return "float16";
  if (t == "<i8") return "int64";
  return "unsupported (" + t + ")";
}

std::string dlpack_dtype(DLDataType t) {
  if (t.lanes == 1) {
    if (t.code == kDLFloat && t.bits == 32) return "float32";
    if (t.code == kDLFloat && t.bits == 16) return "float16";
    if (t.code == kDLBfloat && t.bits == 16) return "bfloat16";
    if (t.code == kDLInt && t.bits == 64) return "int64";
  }
  return "unsupported (DLPack code " + std::to_string(t.code) + ", " + std::to_string(t.bits) + " bits)";
}

// A C-contiguous CUDA array, read through __cuda_array_interface__ where it is offered (torch does not offer it
// for bfloat16) and DLPack otherwise.
[[maybe_unused]] DeviceArray device_array(const py::handle& obj, const char* name) {
  DeviceArray a;
  bool contiguous = true;
  py::object cai;
  try {
    if (py::hasattr(obj, "__cuda_array_interface__")) cai = obj.attr("__cuda_array_interface__");
  } catch (py::error_already_set&) {
    cai = py::object();  // e.g. torch bfloat16: fall through to DLPack
  }
  if (cai && py::isinstance<py::dict>(cai)) {
    py::dict d = cai;
    a.ptr = reinterpret_cast<void*>(d["data"].cast<py::tuple>()[0].cast<std::uintptr_t>());
#if defined(KCLIP_WITH_CUDA)
    a.device = kclip::cuda::pointer_device(a.ptr);  // the interface names no device: ask the runtime
#endif
    a.dtype = typestr_dtype(d["typestr"].cast<std::string>());
    for (auto s : d["shape"].cast<py::tuple>()) a.shape.push_back(s.cast<int64_t>());
    if (d.contains("strides") && !d["strides"].is_none()) {
      const int64_t item = a.dtype == "int64" ? 8 : (a.dtype == "float32" ? 4 : 2);
      int64_t expect = item;
      auto strides = d["strides"].cast<py::tuple>();
      for (int64_t i = static_cast<int64_t>(a.shape.size()) - 1; i >= 0; --i) {
        if (a.shape[i] > 1 && strides[i].cast<int64_t>() != expect) contiguous = false;
        expect *= a.shape[i];
      }
    }
  } else if (py::hasattr(obj, "__dlpack__")) {
    py::object capsule = obj.attr("__dlpack__")();
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
    if (managed == nullptr) {
      PyErr_Clear();
      fail(name, "__dlpack__ did not return a 'dltensor' capsule");
    }
    const DLTensor& t = managed->dl_tensor;
    if (t.device.device_type != kDLCUDA && t.device.device_type != kDLCUDAManaged) {
      fail(name, "must be a CUDA array (DLPack device type " + std::to_string(t.device.device_type) + ")");
    }
    a.ptr = static_cast<char*>(t.data) + t.byte_offset;
    a.device = t.device.device_id;
    a.dtype = dlpack_dtype(t.dtype);
    a.shape.assign(t.shape, t.shape + t.ndim);
    if (t.strides != nullptr) {
      int64_t expect = 1;
      for (int64_t i = t.ndim - 1; i >= 0; --i) {
        if (t.shape[i] > 1 && t.strides[i] != expect) contiguous = false;
        expect *= t.shape[i];
      }
    }
    a.keepalive = capsule;
  } else {
    fail(name, std::string("expected a CUDA array (__cuda_array_interface__ or __dlpack__), got ") +
                   std::string(py::str(py::type::of(obj))));
  }
  require(contiguous, name, "must be C-contiguous");
  return a;
}

[[maybe_unused]] void expect_shape(const DeviceArray& a, const char* name, const std::vector<int64_t>& shape) {
  require(a.shape == shape, name, "expected shape " + shape_str(shape) + ", got " + shape_str(a.shape));
}

[[maybe_unused]] void expect_dtype(const DeviceArray& a, const char* name, const std::string& dtype) {
  require(a.dtype == dtype, name, "expected dtype " + dtype + ", got " + a.dtype);
}

#if defined(KCLIP_WITH_CUDA)
kclip::cuda::DType float_dtype(const DeviceArray& a, const char* name) {
  if (a.dtype == "float32") return kclip::cuda::DType::f32;
  if (a.dtype == "float16") return kclip::cuda::DType::f16;
  if (a.dtype == "bfloat16") return kclip::cuda::DType::bf16;
  fail(name, "expected dtype float32, float16 or bfloat16, got " + a.dtype);
}
#endif

#if defined(KCLIP_WITH_CUDA)
// Every array of one call on the current device, where the kernels launch: an array on another device would be
// read through a foreign pointer. The error names the array, its device and the current one.
void expect_one_device(std::initializer_list<std::pair<const char*, const DeviceArray*>> arrays) {
  const int current = kclip::cuda::current_device();
  for (const auto& [name, a] : arrays) {
    if (a->device >= 0 && a->device != current) {
      fail(name, "is on cuda:" + std::to_string(a->device) + ", but the kernels launch on the current device cuda:" +
                     std::to_string(current) + "; every array of one call must be on it (torch.cuda.device(...))");
    }
  }
}
#endif

[[maybe_unused]] [[noreturn]] void no_cuda() {
  throw std::runtime_error("kclip._C was built without its CUDA part (no CUDA compiler was found at build time)");
}

// Points x [n, d] and centroids c [k, d] on the device, same float dtype, with c_norm [k] float32.
struct DevicePoints {
  DeviceArray x, c, c_norm;
  int64_t n, d, k;
};

[[maybe_unused]] DevicePoints device_points(const py::handle& x, const py::handle& c, const py::handle& c_norm) {
  DevicePoints p{device_array(x, "x"), device_array(c, "centroids"), device_array(c_norm, "centroid_norms"), 0, 0,
                 0};
  require(p.x.shape.size() == 2, "x", "must have rank 2, got shape " + shape_str(p.x.shape));
  require(p.c.shape.size() == 2, "centroids", "must have rank 2, got shape " + shape_str(p.c.shape));
  p.n = p.x.shape[0];
  p.d = p.x.shape[1];
  p.k = p.c.shape[0];
  require(p.d > 0, "x", "has width 0");
  require(p.k > 0, "centroids", "has no rows");
  require(p.c.shape[1] == p.d, "centroids",
          "width " + std::to_string(p.c.shape[1]) + " does not match x's width " + std::to_string(p.d));
  expect_dtype(p.c, "centroids", p.x.dtype);
  expect_shape(p.c_norm, "centroid_norms", {p.k});
  expect_dtype(p.c_norm, "centroid_norms", "float32");
  return p;
}

// ---- the host instantiation of the CUDA tile arithmetic -----------------------------------------------------

// Nearest centroid computed tile by tile exactly as the CUDA assign kernel walks its tiles: row tiles of
// tile_m, centroid tiles of tile_n, each tile's columns split between `lanes` partial argmins that are merged
// at the end. Tests compare it with the reference so the arithmetic the kernels share is checked on a CPU.
py::tuple tile_assign_host(const py::handle& x_obj, const py::handle& c_obj, int64_t tile_m, int64_t tile_n,
                           int64_t lanes) {
  const HostPoints p = host_points(x_obj, c_obj);
  const int64_t n = p.n, d = p.d, k = p.k;
  require(tile_m > 0 && tile_n > 0 && lanes > 0, "tile_m, tile_n, lanes", "must be positive");
  const float* x = p.xp();
  const float* c = p.cp();
  py::array_t<int64_t> labels(n);
  py::array_t<float> dist(n);
  std::vector<float> x_norm(n), c_norm(k);
  kclip::cpu::row_sq_norms(x, n, d, x_norm.data());
  kclip::cpu::row_sq_norms(c, k, d, c_norm.data());
  for (int64_t tm = 0; tm < kclip::tile_count(n, tile_m); ++tm) {
    for (int64_t r = 0; r < kclip::tile_extent(n, tile_m, tm); ++r) {
      const int64_t row = tm * tile_m + r;
      std::vector<kclip::ArgMin> part(lanes, kclip::argmin_init());
      for (int64_t tn = 0; tn < kclip::tile_count(k, tile_n); ++tn) {
        for (int64_t j = 0; j < kclip::tile_extent(k, tile_n, tn); ++j) {
          const int64_t col = tn * tile_n + j;
          float dot = 0.0f;
          for (int64_t t = 0; t < d; ++t) dot += x[row * d + t] * c[col * d + t];
          part[j % lanes] = kclip::argmin_update(part[j % lanes], kclip::sq_dist_from_dot(x_norm[row], c_norm[col], dot), col);
        }
      }
      kclip::ArgMin best = kclip::argmin_init();
      for (const auto& p : part) best = kclip::argmin_merge(best, p);
      labels.mutable_at(row) = best.index;
      dist.mutable_at(row) = best.value;
    }
  }
  return py::make_tuple(labels, dist);
}

// The CUDA soft assignment's top-k selection, on the host: `threads` per-thread lists over strided entries of
// each row (top_insert), merged by their heads with argmin_merge top_k times. Returns (indices int64 [n, top_k],
// costs float32 [n, top_k]), -1 / inf where a row has fewer non-NaN entries.
py::tuple topk_select_host(const py::handle& cost_obj, int top_k, int threads) {
  py::array ca = host_array<float>(cost_obj, "cost", 2);
  const int64_t n = ca.shape(0), k = ca.shape(1);
  require(top_k >= 1 && top_k <= k, "top_k", "must be in [1, k]");
  require(threads >= 1, "threads", "must be positive");
  const float* cost = static_cast<const float*>(ca.data());
  py::array_t<int64_t> idx({n, static_cast<int64_t>(top_k)});
  py::array_t<float> val({n, static_cast<int64_t>(top_k)});
  std::vector<float> lv(static_cast<size_t>(threads) * top_k);
  std::vector<int32_t> lj(lv.size());
  std::vector<int> size(threads), head(threads);
  for (int64_t row = 0; row < n; ++row) {
    for (int t = 0; t < threads; ++t) {
      size[t] = head[t] = 0;
      for (int64_t j = t; j < k; j += threads) {
        kclip::top_insert(lv.data() + t * top_k, lj.data() + t * top_k, size[t], top_k, cost[row * k + j],
                          static_cast<int32_t>(j));
      }
    }
    for (int p = 0; p < top_k; ++p) {
      kclip::ArgMin best = kclip::argmin_init();
      for (int t = 0; t < threads; ++t) {
        const kclip::ArgMin mine = head[t] < size[t] ? kclip::ArgMin{lv[t * top_k + head[t]], lj[t * top_k + head[t]]}
                                                     : kclip::argmin_init();
        best = kclip::argmin_merge(best, mine);
      }
      for (int t = 0; t < threads && best.index >= 0; ++t) {
        if (head[t] < size[t] && lj[t * top_k + head[t]] == best.index) ++head[t];
      }
      idx.mutable_at(row, p) = best.index;
      val.mutable_at(row, p) = best.index >= 0 ? best.value : INFINITY;
    }
  }
  return py::make_tuple(idx, val);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kclip's compiled k-means: CPU (OpenMP, SIMD) and, where built with it, CUDA.";

#if defined(KCLIP_WITH_CUDA)
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
  m.attr("cpu_isa") = kclip::cpu::isa_kernels().name;

  // ---- CPU ----
  m.def(
      "cpu_row_sq_norms",
      [](const py::handle& x_obj) {
        py::array xa = host_array<float>(x_obj, "x", 2);
        const int64_t n = xa.shape(0), d = xa.shape(1);
        py::array_t<float> out(n);
        {
          py::gil_scoped_release nogil;
          kclip::cpu::row_sq_norms(static_cast<const float*>(xa.data()), n, d, out.mutable_data());
        }
        return out;
      },
      py::arg("x"),
      "Squared norm of each row (float32 [n]), sixteen partial sums a row added in a fixed order (the same bits for "
      "any thread count): x_norm for cpu_assign.");

  m.def(
      "cpu_assign",
      [](const py::handle& x_obj, const py::handle& c_obj, const py::handle& norm_obj) {
        const HostPoints p = host_points(x_obj, c_obj);
        const auto norms = host_norms(norm_obj, p.n);
        py::array_t<int64_t> labels(p.n);
        py::array_t<float> dist(p.n);
        {
          py::gil_scoped_release nogil;
          kclip::cpu::assign(p.xp(), p.n, p.d, p.cp(), p.k, labels.mutable_data(), dist.mutable_data(),
                             norms.second);
        }
        return py::make_tuple(labels, dist);
      },
      py::arg("x"), py::arg("centroids"), py::arg("x_norm") = py::none(),
      "Nearest centroid of each row: (labels int64 [n], squared distances float32 [n]). x_norm: the rows' "
      "cpu_row_sq_norms, when computed once for many calls on the same x.");

  m.def(
      "cpu_accumulate",
      [](const py::handle& x_obj, const py::handle& l_obj, int64_t k) {
        py::array xa = host_array<float>(x_obj, "x", 2), la = host_array<int64_t>(l_obj, "labels", 1);
        const int64_t n = xa.shape(0), d = xa.shape(1);
        require(la.shape(0) == n, "labels", "has " + std::to_string(la.shape(0)) + " entries for " +
                                                std::to_string(n) + " rows of x");
        require(k > 0, "k", "must be positive, got " + std::to_string(k));
        py::array_t<double> sums({k, d});
        py::array_t<int64_t> counts(k);
        {
          py::gil_scoped_release nogil;
          kclip::cpu::accumulate(static_cast<const float*>(xa.data()), n, d, static_cast<const int64_t*>(la.data()),
                                 k, sums.mutable_data(), counts.mutable_data());
        }
        return py::make_tuple(sums, counts);
      },
      py::arg("x"), py::arg("labels"), py::arg("k"),
      "Per-cluster sums (float64 [k, d], fixed summation order) and sizes (int64 [k]).");

  m.def(
      "cpu_assign_accumulate",
      [](const py::handle& x_obj, const py::handle& c_obj, const py::handle& norm_obj) {
        const HostPoints p = host_points(x_obj, c_obj);
        const auto norms = host_norms(norm_obj, p.n);
        py::array_t<int64_t> labels(p.n), counts(p.k);
        py::array_t<float> dist(p.n);
        py::array_t<double> sums({p.k, p.d});
        {
          py::gil_scoped_release nogil;
          kclip::cpu::assign_accumulate(p.xp(), p.n, p.d, p.cp(), p.k, labels.mutable_data(), dist.mutable_data(),
                                        sums.mutable_data(), counts.mutable_data(), norms.second);
        }
        return py::make_tuple(labels, dist, sums, counts);
      },
      py::arg("x"), py::arg("centroids"), py::arg("x_norm") = py::none(),
      "cpu_assign then cpu_accumulate, one call for Lloyd's loop: (labels, dist, sums, counts), bitwise as the "
      "two calls.");

  m.def(
      "cpu_kmeanspp",
      [](const py::handle& x_obj, int64_t k, uint64_t seed, int n_trials) {
        py::array xa = host_array<float>(x_obj, "x", 2);
        const int64_t n = xa.shape(0), d = xa.shape(1);
        require(k > 0, "k", "must be positive, got " + std::to_string(k));
        require(n >= k, "x", "has " + std::to_string(n) + " rows, fewer than k=" + std::to_string(k));
        py::array_t<int64_t> out(k);
        {
          py::gil_scoped_release nogil;
          kclip::cpu::kmeanspp(static_cast<const float*>(xa.data()), n, d, k, seed, n_trials, out.mutable_data());
        }
        return out;
      },
      py::arg("x"), py::arg("k"), py::arg("seed"), py::arg("n_trials"),
      "Greedy k-means++: indices int64 [k] of the rows chosen as initial centroids.");

  m.def(
      "cpu_soft_assign",
      [](const py::handle& x_obj, const py::handle& c_obj, double temperature, int64_t top_k) -> py::object {
        const HostPoints p = host_points(x_obj, c_obj);
        require(std::isfinite(temperature) && temperature > 0, "temperature",
                "must be finite and positive, got " + std::to_string(temperature));
        require(top_k >= 0 && top_k <= p.k, "top_k",
                "must be in [0, k=" + std::to_string(p.k) + "], got " + std::to_string(top_k));
        const float inv_t = static_cast<float>(1.0 / temperature);
        if (top_k == 0) {
          py::array_t<float> dense({p.n, p.k});
          {
            py::gil_scoped_release nogil;
            kclip::cpu::soft_assign(p.xp(), p.n, p.d, p.cp(), p.k, inv_t, 0, dense.mutable_data(), nullptr, nullptr);
          }
          return dense;
        }
        py::array_t<int64_t> idx({p.n, top_k});
        py::array_t<float> w({p.n, top_k});
        {
          py::gil_scoped_release nogil;
          kclip::cpu::soft_assign(p.xp(), p.n, p.d, p.cp(), p.k, inv_t, top_k, nullptr, idx.mutable_data(),
                                  w.mutable_data());
        }
        return py::make_tuple(idx, w);
      },
      py::arg("x"), py::arg("centroids"), py::arg("temperature"), py::arg("top_k") = 0,
      "softmax(-||x - c||^2 / temperature): dense float32 [n, k], or (indices, weights) [n, top_k] renormalised.");

  m.def("_topk_select_host", &topk_select_host, py::arg("cost"), py::arg("top_k"), py::arg("threads"),
        "The CUDA soft assignment's per-thread top-k selection and head merge, on the host (for tests).");
  m.def("_wmma_tile_rows", &kclip::cuda::wmma_tile_rows, py::arg("n"), py::arg("vec"), py::arg("sms"),
        py::arg("forced"),
        "Rows per block the 16-bit CUDA distance kernels take (64 or 128), by the rule in kmeans_cuda.h (for tests).");
  m.def("_tile_assign_host", &tile_assign_host, py::arg("x"), py::arg("centroids"), py::arg("tile_m"),
        py::arg("tile_n"), py::arg("lanes"),
        "Nearest centroid through the CUDA kernels' tile arithmetic, run on the host (for tests).");

  // ---- CUDA ----
  m.def("cuda_device_status", []() {
    py::dict out;
#if defined(KCLIP_WITH_CUDA)
    const kclip::cuda::DeviceStatus s = kclip::cuda::device_status();
    out["device_count"] = s.device_count;
    out["driver_version"] = s.driver_version;
    out["runtime_version"] = s.runtime_version;
    out["error"] = s.error;
#else
    out["device_count"] = 0;
    out["driver_version"] = 0;
    out["runtime_version"] = 0;
    out["error"] = "kclip._C was built without its CUDA part";
#endif
    return out;
  });

  m.def(
      "cuda_assign",
      [](const py::handle& x, const py::handle& c, const py::handle& c_norm, const py::handle& labels,
         const py::handle& dist, std::uintptr_t stream) {
#if defined(KCLIP_WITH_CUDA)
        DevicePoints p = device_points(x, c, c_norm);
        DeviceArray la = device_array(labels, "labels"), da = device_array(dist, "dist");
        expect_one_device({{"x", &p.x}, {"centroids", &p.c}, {"centroid_norms", &p.c_norm}, {"labels", &la},
                           {"dist", &da}});
        expect_shape(la, "labels", {p.n});
        expect_dtype(la, "labels", "int64");
        expect_shape(da, "dist", {p.n});
        expect_dtype(da, "dist", "float32");
        kclip::cuda::assign(p.x.ptr, p.c.ptr, static_cast<const float*>(p.c_norm.ptr), float_dtype(p.x, "x"), p.n,
                            p.d, p.k, static_cast<int64_t*>(la.ptr), static_cast<float*>(da.ptr), stream);
#else
        no_cuda();
#endif
      },
      py::arg("x"), py::arg("centroids"), py::arg("centroid_norms"), py::arg("labels"), py::arg("dist"),
      py::arg("stream") = 0, "Nearest centroid on the device into labels int64 [n] and dist float32 [n].");

  m.def(
      "cuda_distances",
      [](const py::handle& x, const py::handle& c, const py::handle& c_norm, const py::handle& out,
         std::uintptr_t stream) {
#if defined(KCLIP_WITH_CUDA)
        DevicePoints p = device_points(x, c, c_norm);
        DeviceArray oa = device_array(out, "out");
        expect_one_device({{"x", &p.x}, {"centroids", &p.c}, {"centroid_norms", &p.c_norm}, {"out", &oa}});
        expect_shape(oa, "out", {p.n, p.k});
        expect_dtype(oa, "out", "float32");
        kclip::cuda::distances(p.x.ptr, p.c.ptr, static_cast<const float*>(p.c_norm.ptr), float_dtype(p.x, "x"), p.n,
                               p.d, p.k, static_cast<float*>(oa.ptr), p.k, stream);
#else
        no_cuda();
#endif
      },
      py::arg("x"), py::arg("centroids"), py::arg("centroid_norms"), py::arg("out"), py::arg("stream") = 0,
      "Squared distances float32 [n, k] on the device.");

  m.def(
      "cuda_accumulate",
      [](const py::handle& x, const py::handle& labels, const py::handle& sums, const py::handle& counts,
         std::uintptr_t stream) {
#if defined(KCLIP_WITH_CUDA)
        DeviceArray xa = device_array(x, "x"), la = device_array(labels, "labels");
        DeviceArray sa = device_array(sums, "sums"), ca = device_array(counts, "counts");
        expect_one_device({{"x", &xa}, {"labels", &la}, {"sums", &sa}, {"counts", &ca}});
        require(xa.shape.size() == 2, "x", "must have rank 2, got shape " + shape_str(xa.shape));
        const int64_t n = xa.shape[0], d = xa.shape[1];
        require(sa.shape.size() == 2 && sa.shape[1] == d, "sums", "expected shape [k, " + std::to_string(d) +
                                                                     "], got " + shape_str(sa.shape));
        const int64_t k = sa.shape[0];
        expect_dtype(sa, "sums", "float32");
        expect_shape(la, "labels", {n});
        expect_dtype(la, "labels", "int64");
        expect_shape(ca, "counts", {k});
        expect_dtype(ca, "counts", "int64");
        kclip::cuda::accumulate(xa.ptr, float_dtype(xa, "x"), n, d, static_cast<const int64_t*>(la.ptr), k,
                                static_cast<float*>(sa.ptr), static_cast<int64_t*>(ca.ptr), stream);
#else
        no_cuda();
#endif
      },
      py::arg("x"), py::arg("labels"), py::arg("sums"), py::arg("counts"), py::arg("stream") = 0,
      "Adds each row of x to sums[label] and counts it (sums and counts zeroed by the caller).");

  m.def(
      "cuda_soft_assign",
      [](const py::handle& dist, double temperature, int64_t top_k, const py::object& dense_out,
         const py::object& topk_idx, const py::object& topk_w, std::uintptr_t stream) {
#if defined(KCLIP_WITH_CUDA)
        DeviceArray da = device_array(dist, "dist");
        require(da.shape.size() == 2, "dist", "must have rank 2, got shape " + shape_str(da.shape));
        expect_dtype(da, "dist", "float32");
        const int64_t n = da.shape[0], k = da.shape[1];
        require(std::isfinite(temperature) && temperature > 0, "temperature",
                "must be finite and positive, got " + std::to_string(temperature));
        const float inv_t = static_cast<float>(1.0 / temperature);
        if (top_k == 0) {
          DeviceArray oa = device_array(dense_out, "dense_out");
          expect_one_device({{"dist", &da}, {"dense_out", &oa}});
          expect_shape(oa, "dense_out", {n, k});
          expect_dtype(oa, "dense_out", "float32");
          kclip::cuda::soft_assign(static_cast<const float*>(da.ptr), k, n, k, inv_t, 0, static_cast<float*>(oa.ptr),
                                   nullptr, nullptr, stream);
        } else {
          require(top_k > 0 && top_k <= std::min<int64_t>(k, 64), "top_k",
                  "must be in [1, min(k, 64)] on the device, got " + std::to_string(top_k));
          DeviceArray ia = device_array(topk_idx, "topk_idx"), wa = device_array(topk_w, "topk_w");
          expect_one_device({{"dist", &da}, {"topk_idx", &ia}, {"topk_w", &wa}});
          expect_shape(ia, "topk_idx", {n, top_k});
          expect_dtype(ia, "topk_idx", "int64");
          expect_shape(wa, "topk_w", {n, top_k});
          expect_dtype(wa, "topk_w", "float32");
          kclip::cuda::soft_assign(static_cast<const float*>(da.ptr), k, n, k, inv_t, top_k, nullptr,
                                   static_cast<int64_t*>(ia.ptr), static_cast<float*>(wa.ptr), stream);
        }
#else
        no_cuda();
#endif
      },
      py::arg("dist"), py::arg("temperature"), py::arg("top_k"), py::arg("dense_out") = py::none(),
      py::arg("topk_idx") = py::none(), py::arg("topk_w") = py::none(), py::arg("stream") = 0,
      "Row-wise softmax of -dist / temperature on the device, dense or top-k.");
}
