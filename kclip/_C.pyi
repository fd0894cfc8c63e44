"""Type stubs of kclip._C, the compiled k-means (csrc/bindings.cpp)."""

from typing import Any

import numpy as np
import numpy.typing as npt

cuda_compiled: bool
cpu_isa: str  # "avx512", "avx2" or "generic": the distance micro-kernel chosen for this processor

def cpu_row_sq_norms(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...
def cpu_assign(
    x: npt.NDArray[np.float32], centroids: npt.NDArray[np.float32], x_norm: npt.NDArray[np.float32] | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
def cpu_accumulate(
    x: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], k: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]: ...
def cpu_assign_accumulate(
    x: npt.NDArray[np.float32], centroids: npt.NDArray[np.float32], x_norm: npt.NDArray[np.float32] | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.float64], npt.NDArray[np.int64]]: ...
def cpu_kmeanspp(x: npt.NDArray[np.float32], k: int, seed: int, n_trials: int) -> npt.NDArray[np.int64]: ...
def cpu_soft_assign(
    x: npt.NDArray[np.float32], centroids: npt.NDArray[np.float32], temperature: float, top_k: int = 0
) -> npt.NDArray[np.float32] | tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
def _topk_select_host(
    cost: npt.NDArray[np.float32], top_k: int, threads: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
def _tile_assign_host(
    x: npt.NDArray[np.float32], centroids: npt.NDArray[np.float32], tile_m: int, tile_n: int, lanes: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
def cuda_device_status() -> dict[str, Any]: ...

# Device arrays: anything with __cuda_array_interface__ or __dlpack__ (torch CUDA tensors, cupy arrays).
def cuda_assign(x: Any, centroids: Any, centroid_norms: Any, labels: Any, dist: Any, stream: int = 0) -> None: ...
def cuda_distances(x: Any, centroids: Any, centroid_norms: Any, out: Any, stream: int = 0) -> None: ...
def cuda_accumulate(x: Any, labels: Any, sums: Any, counts: Any, stream: int = 0) -> None: ...
def cuda_soft_assign(
    dist: Any,
    temperature: float,
    top_k: int,
    dense_out: Any | None = None,
    topk_idx: Any | None = None,
    topk_w: Any | None = None,
    stream: int = 0,
) -> None: ...
