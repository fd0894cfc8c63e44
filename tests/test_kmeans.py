"""k-means: compiled CPU path against scikit-learn and the PyTorch reference, determinism, splitting, bad input.
GPU tests (marked gpu) compare the CUDA path with the CPU one."""

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kclip.cluster import KMeans, backend_info, kmeans, split_empty_clusters
from kclip.cluster.reference import (
    ReferenceOps,
    accumulate_reference,
    assign_reference,
    soft_assign_reference,
)

C = pytest.importorskip("kclip._C")


def blobs(n, d, k, seed=0, spread=0.3, dtype=np.float32, return_labels=False):
    """Well-separated Gaussian blobs, so that assignments have no near-ties."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 4.0
    truth = rng.integers(0, k, n)
    x = (centers[truth] + spread * rng.standard_normal((n, d))).astype(dtype)
    return (x, truth) if return_labels else x


def initial_centroids(x, k, seed=1):
    rng = np.random.default_rng(seed)
    return x[np.sort(rng.choice(len(x), k, replace=False))].copy()


# ---- the build ------------------------------------------------------------------------------------------------


def test_compiled_module_present_and_cuda_part_built_where_nvcc_is():
    info = backend_info()
    assert info["cpu"], info["compiled_error"]
    if (
        os.environ.get("KCLIP_REQUIRE_COMPILED") == "1"
        and shutil.which("nvcc")
        and not os.environ.get("KCLIP_CPU_ONLY")
    ):
        assert info["cuda_compiled"], "CI builds with nvcc, so the CUDA part must be compiled in"
    if not torch.cuda.is_available():
        assert not info["cuda_device"] and info["cuda_error"]


# ---- agreement ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d", "k"), [(3000, 16, 10), (2570, 37, 37), (400, 3, 1), (20000, 64, 50)])
def test_matches_sklearn_from_same_init(n, d, k):
    sklearn = pytest.importorskip("sklearn.cluster")
    x, truth = blobs(n, d, k, return_labels=True)
    # One point of every blob: Lloyd has one well-defined optimum to reach from here.
    c0 = x[[int(np.flatnonzero(truth == j)[0]) for j in np.unique(truth)]]
    k = len(c0)
    ours = KMeans(k, init=c0, n_iter=100, tol=0.0, device="cpu").fit(x)
    theirs = sklearn.KMeans(k, init=c0, n_init=1, max_iter=100, tol=0.0, algorithm="lloyd").fit(x)
    assert (ours.assign(x).numpy() == theirs.predict(x)).mean() >= 0.999
    assert ours.objective == pytest.approx(theirs.inertia_, rel=1e-4)


@pytest.mark.parametrize(("n", "d", "k"), [(20000, 64, 20), (5000, 33, 130)])
def test_matches_sklearn_step_by_step_on_unstructured_data(n, d, k):
    """On data with no cluster structure Lloyd's path is flat and sensitive to rounding, so long runs drift
    apart between any two implementations; single steps from the same centroids must still agree."""
    sklearn = pytest.importorskip("sklearn.cluster")
    x = np.random.default_rng(n).standard_normal((n, d)).astype(np.float32)
    c = initial_centroids(x, k)
    for _ in range(3):
        ours = KMeans(k, init=c, n_iter=1, tol=0.0, device="cpu").fit(x)
        theirs = sklearn.KMeans(k, init=c, n_init=1, max_iter=1, tol=0.0, algorithm="lloyd").fit(x)
        assert (ours.assign(x).numpy() == theirs.labels_).mean() >= 0.999
        assert ours.objective == pytest.approx(theirs.inertia_, rel=1e-4)
        c = theirs.cluster_centers_


def test_compiled_matches_reference_from_same_init():
    x = blobs(2000, 24, 12, seed=3)
    c0 = initial_centroids(x, 12)
    compiled = KMeans(12, init=c0, n_iter=20, tol=0.0, device="cpu").fit(x)
    reference = KMeans(12, init=c0, n_iter=20, tol=0.0, device="reference").fit(x)
    assert compiled.backend == "cpu" and reference.backend == "reference"
    assert compiled.objective == pytest.approx(reference.objective, rel=1e-5)
    assert (compiled.assign(x) == reference.assign(x)).float().mean() >= 0.999
    torch.testing.assert_close(compiled.centroids, reference.centroids, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("n", "d", "k"),
    # the last two: several coordinate slices of the micro-kernel (the last one short), an odd last panel
    [(1, 1, 1), (3, 5, 2), (37, 17, 5), (257, 64, 37), (513, 100, 130), (205, 600, 40), (61, 1024, 17)],
)
def test_assign_and_accumulate_match_reference(n, d, k):
    rng = np.random.default_rng(n + d + k)
    x = rng.standard_normal((n, d)).astype(np.float32)
    c = rng.standard_normal((k, d)).astype(np.float32)
    labels, dist = C.cpu_assign(x, c)
    ref_labels, ref_dist = assign_reference(torch.from_numpy(x).double(), torch.from_numpy(c).double())
    assert (torch.from_numpy(labels) == ref_labels).float().mean() >= 0.999
    torch.testing.assert_close(torch.from_numpy(dist).double(), ref_dist, rtol=1e-4, atol=1e-4)
    sums, counts = C.cpu_accumulate(x, labels, k)
    ref_sums, ref_counts = accumulate_reference(torch.from_numpy(x), torch.from_numpy(labels), k)
    torch.testing.assert_close(torch.from_numpy(sums), ref_sums)
    assert (torch.from_numpy(counts) == ref_counts).all()


@pytest.mark.parametrize("threads", [1, 7, 32, 256])
@pytest.mark.parametrize(("k", "top_k"), [(1, 1), (5, 5), (300, 1), (300, 16), (1000, 64)])
def test_cuda_topk_selection_host_instantiation_matches_a_sort(threads, k, top_k):
    """The CUDA soft assignment's selection (per-thread lists, then the heads merged) picks the top_k smallest
    costs in the order (cost, index), with ties, infinities and NaN (never picked) in the rows."""
    rng = np.random.default_rng(k + top_k + threads)
    cost = rng.integers(0, 40, (6, k)).astype(np.float32)  # many ties
    cost[1, ::3] = np.nan
    cost[2, :] = np.nan
    cost[2, k // 2] = 1.0
    cost[3, ::2] = np.inf
    idx, val = C._topk_select_host(cost, top_k, threads)
    for row in range(cost.shape[0]):
        finite = np.flatnonzero(~np.isnan(cost[row]))
        order = finite[np.lexsort((finite, cost[row, finite]))][:top_k]
        want = np.full(top_k, -1)
        want[: len(order)] = order
        assert (idx[row] == want).all(), (row, idx[row], want)
        assert np.array_equal(val[row][: len(order)], cost[row, order])
        assert (val[row][len(order) :] == np.inf).all()


def test_precomputed_row_norms_give_the_same_bits():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((700, 300)).astype(np.float32)
    c = rng.standard_normal((45, 300)).astype(np.float32)
    x_norm = C.cpu_row_sq_norms(x)
    np.testing.assert_allclose(x_norm, (x.astype(np.float64) ** 2).sum(1), rtol=1e-5)
    plain, given = C.cpu_assign_accumulate(x, c), C.cpu_assign_accumulate(x, c, x_norm)
    for a, b in zip(plain, given, strict=True):
        assert a.tobytes() == b.tobytes()
    labels, dist = C.cpu_assign(x, c, x_norm)
    assert labels.tobytes() == plain[0].tobytes() and dist.tobytes() == plain[1].tobytes()


def test_cpu_ops_compute_row_norms_once_per_chunk(monkeypatch):
    from kclip.cluster.kmeans import CpuOps

    calls = []
    ops = CpuOps(C)
    monkeypatch.setattr(
        ops,
        "C",
        SimpleNamespace(
            cpu_row_sq_norms=lambda x: calls.append(x) or C.cpu_row_sq_norms(x),
            cpu_assign=C.cpu_assign,
            cpu_assign_accumulate=C.cpu_assign_accumulate,
        ),
    )
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    c = torch.from_numpy(x[:4].copy())
    for _ in range(3):
        ops.assign_accumulate(x, c, 4)
    ops.assign(x, c)
    assert len(calls) == 1
    y = x.copy()  # another chunk: its own norms
    ops.assign(y, c)
    assert len(calls) == 2


@pytest.mark.parametrize(("tile_m", "tile_n", "lanes"), [(64, 64, 2), (128, 64, 4), (16, 16, 1), (7, 5, 3)])
def test_cuda_tile_arithmetic_host_instantiation_matches_reference(tile_m, tile_n, lanes):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((203, 19)).astype(np.float32)
    c = rng.standard_normal((77, 19)).astype(np.float32)
    c[5] = c[40]  # an exact tie: the lower index must win, as in the kernels
    x[0] = c[40]
    labels, dist = C._tile_assign_host(x, c, tile_m, tile_n, lanes)
    ref_labels, ref_dist = assign_reference(torch.from_numpy(x).double(), torch.from_numpy(c).double())
    assert labels[0] == 5
    assert (torch.from_numpy(labels) == ref_labels).all()
    torch.testing.assert_close(torch.from_numpy(dist).double(), ref_dist, rtol=1e-4, atol=1e-4)


_ISA_SCRIPT = """
import sys, numpy as np, kclip._C as C
rng = np.random.default_rng(5)
out = {"isa": np.array(C.cpu_isa)}
for d, k in ((19, 7), (576, 100), (1024, 36), (300, 16)):
    x = rng.standard_normal((1000, d)).astype(np.float32)
    c = x[rng.choice(1000, k, replace=False)].copy()
    labels, dist = C.cpu_assign(x, c)
    out[f"labels{d}"], out[f"dist{d}"], out[f"norms{d}"] = labels, dist, C.cpu_row_sq_norms(x)
    out[f"soft{d}"] = C.cpu_soft_assign(x, c, 1.0, 0)  # every distance, through dist_rows
    out[f"sums{d}"] = C.cpu_assign_accumulate(x, c, None)[2]
    out[f"pp{d}"] = C.cpu_kmeanspp(x, k, 3, 4)
np.savez(sys.argv[1], **out)
"""


def _isa_run(tmp_path, isa):
    env = dict(os.environ, KCLIP_CPU_ISA=isa)
    path = tmp_path / f"{isa or 'default'}.npz"
    # cwd: away from the checkout, whose kclip/ (without _C where the package is installed) would shadow it
    proc = subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT, str(path)], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    return proc, path


def test_every_cpu_isa_variant_gives_the_default_results(tmp_path):
    """The narrower ISA variants (chosen through KCLIP_CPU_ISA) against the one this CPU picks: AVX-512 and AVX2
    both multiply-add with FMA in the same order, so their bits agree; the generic build rounds each product
    before the add, so it agrees to rounding. Widths with several slices, the packed width 1024, and a last
    panel of at most 8 centroids (K = 100, 36, 7) or of exactly 16."""
    proc, path = _isa_run(tmp_path, "")
    assert proc.returncode == 0, proc.stderr
    ref = np.load(path)
    ran = []
    for isa in ("avx512", "avx2", "generic"):
        proc, path = _isa_run(tmp_path, isa)
        if proc.returncode != 0:
            assert "this CPU runs" in proc.stderr, proc.stderr  # a variant this CPU cannot run is refused by name
            continue
        got = np.load(path)
        assert str(got["isa"]) == isa
        ran.append(isa)
        for key in ref.files:
            if key == "isa":
                continue
            if isa != "generic" and str(ref["isa"]) != "generic":
                np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{isa} {key}")
            elif key.startswith(("labels", "pp")):
                assert (got[key] == ref[key]).mean() >= 0.99, (isa, key)
            else:
                np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-3, err_msg=f"{isa} {key}")
    assert "generic" in ran


def test_unknown_cpu_isa_is_refused_by_name(tmp_path):
    proc, _ = _isa_run(tmp_path, "sse9")
    assert proc.returncode != 0
    assert "KCLIP_CPU_ISA='sse9': this CPU runs" in proc.stderr


def test_cuda_16bit_tile_rule():
    """128-row tiles (cp.async) only for 16-byte rows and at least two waves of them (4 blocks an SM); 64 otherwise;
    KCLIP_CUDA_TILE_ROWS chooses, and a bad value is refused by name."""
    sms = 132
    assert C._wmma_tile_rows(128 * 4 * sms, True, sms, "") == 128
    assert C._wmma_tile_rows(128 * 4 * sms - 128, True, sms, "auto") == 64
    assert C._wmma_tile_rows(10**7, False, sms, "") == 64  # rows not 16-byte multiples: cp.async cannot copy them
    assert C._wmma_tile_rows(10, True, sms, "128") == 128
    assert C._wmma_tile_rows(10, False, sms, "128") == 64
    assert C._wmma_tile_rows(10**7, True, sms, "64") == 64
    assert C._wmma_tile_rows(10**6, True, 0, "") == 128  # an unknown SM count counts as one
    with pytest.raises(ValueError, match="KCLIP_CUDA_TILE_ROWS='96'"):
        C._wmma_tile_rows(10, True, sms, "96")


@pytest.mark.parametrize("top_k", [None, 1, 3, 37])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 30.0])
def test_soft_assign_matches_reference(top_k, temperature):
    x = blobs(300, 8, 37, seed=5)
    km = KMeans(37, n_iter=5, device="cpu").fit(x)
    ours = km.soft_assign(x, temperature, top_k=top_k)
    ref = soft_assign_reference(torch.from_numpy(x).double(), km.centroids.double(), temperature, top_k)
    nearest = km.assign(x)
    if top_k is None:
        torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-5)
        assert (ours >= 0).all()
        torch.testing.assert_close(ours.sum(1), torch.ones(300), rtol=0, atol=1e-5)
        assert (ours.argmax(1) == nearest).all()
    else:
        idx, w = ours
        assert (idx == ref[0]).float().mean() >= 0.99  # near-equal distances may swap places
        torch.testing.assert_close(w, ref[1].float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w.sum(1), torch.ones(300), rtol=0, atol=1e-5)
        assert (idx[:, 0] == nearest).all()
        assert (w[:, :-1] >= w[:, 1:]).all()


# ---- determinism ----------------------------------------------------------------------------------------------

_FIT_AND_HASH = """
import hashlib, numpy as np
from kclip.cluster import KMeans
rng = np.random.default_rng(0)
x = (rng.standard_normal((6000, 24)) + rng.integers(0, 5, (6000, 1))).astype(np.float32)
km = KMeans(20, seed=123, n_iter=15, device="cpu").fit(x)
print(hashlib.sha256(km.centroids.numpy().tobytes()).hexdigest(), repr(km.objective))
"""


def test_seeded_fit_is_bitwise_identical_across_runs_and_thread_counts(tmp_path):
    outputs = set()
    # 8 threads: more than kOrderedThreads, so the centroid update takes its two-pass form (the same bits)
    for threads in ("1", "2", "2", "8"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        # cwd away from the checkout, so `python -c` imports the installed kclip rather than the source tree
        r = subprocess.run(
            [sys.executable, "-c", _FIT_AND_HASH], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr
        outputs.add(r.stdout.strip())
    assert len(outputs) == 1, outputs


def test_kmeanspp_deterministic_distinct_and_better_than_random():
    x = blobs(5000, 10, 25, seed=11)
    a = C.cpu_kmeanspp(x, 25, 42, 5)
    b = C.cpu_kmeanspp(x, 25, 42, 5)
    assert (a == b).all() and len(set(a.tolist())) == 25
    assert not (C.cpu_kmeanspp(x, 25, 43, 5) == a).all()
    pp = KMeans(25, init="k-means++", n_iter=0, device="cpu", seed=4).fit(x).objective
    rnd = np.mean([KMeans(25, init="random", n_iter=0, device="cpu", seed=s).fit(x).objective for s in range(5)])
    assert pp < rnd


# ---- empty clusters -------------------------------------------------------------------------------------------


def test_split_empty_clusters_never_leaves_nan_or_origin():
    centroids = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    counts = torch.tensor([10, 0, 30, 0])
    assert split_empty_clusters(centroids, counts) == 2
    assert (counts > 0).all() and counts.sum() == 40
    assert torch.isfinite(centroids).all()
    assert (centroids.norm(dim=1) > 0).all()
    assert torch.unique(centroids, dim=0).shape[0] == 4


def test_fit_with_duplicated_init_splits_and_fills_every_cluster():
    x = blobs(3000, 8, 6, seed=2)
    c0 = initial_centroids(x, 6)
    c0[3] = c0[2]  # two identical centroids: one of them is empty after the first assignment
    km = KMeans(6, init=c0, n_iter=30, tol=0.0, device="cpu").fit(x)
    assert sum(s.splits for s in km.stats) >= 1
    assert torch.isfinite(km.centroids).all()
    assert (torch.bincount(km.assign(x), minlength=6) > 0).all()


# ---- inputs ---------------------------------------------------------------------------------------------------


def test_streaming_fit_matches_in_memory_fit(monkeypatch):
    x = blobs(4000, 16, 9, seed=8)
    c0 = initial_centroids(x, 9)
    whole = KMeans(9, init=c0, n_iter=10, tol=0.0, device="cpu").fit(x)
    monkeypatch.setattr(kmeans, "_CHUNK_BYTES", 16 * 4 * 300)  # 300-row chunks
    streamed = KMeans(9, init=c0, n_iter=10, tol=0.0, device="cpu").fit(x, streaming=True)
    torch.testing.assert_close(streamed.centroids, whole.centroids, rtol=1e-6, atol=1e-6)
    assert streamed.objective == pytest.approx(whole.objective, rel=1e-9)
    assert (streamed.assign(x) == whole.assign(x)).all()


def test_memmap_float16_and_torch_inputs(tmp_path):
    x = blobs(1500, 12, 7, seed=9)
    km = KMeans(7, n_iter=10, device="cpu").fit(x)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    mm.flush()
    ro = np.load(tmp_path / "x.npy", mmap_mode="r")
    expected = km.assign(ro.astype(np.float32))
    assert (km.assign(ro) == expected).all()
    assert (km.assign(torch.from_numpy(x)) == km.assign(x)).all()
    assert (km.assign(torch.from_numpy(x).to(torch.bfloat16)) == km.assign(x)).float().mean() > 0.99
    assert (km.assign(x[:, ::1][::-1]) == km.assign(np.ascontiguousarray(x[::-1]))).all()  # non-contiguous


def test_spherical_centroids_on_unit_sphere():
    x = blobs(2000, 10, 5, seed=4)
    km = KMeans(5, spherical=True, device="cpu").fit(x)
    torch.testing.assert_close(km.centroids.norm(dim=1), torch.ones(5), rtol=0, atol=1e-5)


def test_max_points_per_centroid_subsamples():
    x = blobs(5000, 6, 4, seed=6)
    full = KMeans(4, device="cpu", seed=0).fit(x)
    sub = KMeans(4, device="cpu", seed=0, max_points_per_centroid=100).fit(x)
    assert sub.stats[-1].imbalance > 0
    # a subsample of 400 points of 4 well-separated blobs finds the same clusters
    full_cost = full.assign(x, return_distances=True)[1].double().sum()
    sub_cost = sub.assign(x, return_distances=True)[1].double().sum()
    assert sub_cost == pytest.approx(float(full_cost), rel=0.05)


def test_stats_records_each_iteration():
    x = blobs(2000, 8, 5, seed=1)
    km = KMeans(5, n_iter=8, tol=0.0, device="cpu").fit(x)
    objectives = [s.objective for s in km.stats]
    assert all(a >= b - 1e-6 * a for a, b in zip(objectives, objectives[1:], strict=False))
    assert km.stats[-1].objective == km.objective
    assert all(s.seconds >= 0 and s.imbalance >= 1.0 - 1e-9 for s in km.stats)
    assert [s.iteration for s in km.stats] == list(range(len(km.stats)))


@pytest.mark.parametrize(
    ("x", "k", "match"),
    [
        (np.ones((3, 4), np.float32), 5, "fewer than n_clusters"),
        (np.array([[0.0, np.nan], [1.0, 2.0]], np.float32), 1, "NaN or inf .*row 0"),
        (np.array([[0.0, 1.0], [np.inf, 2.0]], np.float32), 1, "NaN or inf .*row 1"),
        (np.ones(10, np.float32), 2, "2-D"),
        (np.ones((2, 3, 4), np.float32), 2, "2-D"),
        (np.ones((0, 4), np.float32), 1, "empty"),
        (np.ones((5, 0), np.float32), 1, "width 0"),
        (np.ones((5, 4), np.int64), 1, "unsupported dtype int64"),
        (np.ones((5, 4), np.complex64), 1, "unsupported dtype"),
    ],
)
def test_bad_input_raises_naming_the_argument(x, k, match):
    with pytest.raises(ValueError, match=match) as err:
        KMeans(k, device="cpu").fit(x)
    assert str(err.value).startswith("x:")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_clusters": 0}, "n_clusters"),
        ({"n_clusters": -3}, "n_clusters"),
        ({"n_clusters": 2, "tol": float("nan")}, "tol"),
        ({"n_clusters": 2, "n_iter": -1}, "n_iter"),
        ({"n_clusters": 2, "init": "kmeans"}, "init"),
        ({"n_clusters": 2, "max_points_per_centroid": 0}, "max_points_per_centroid"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KMeans(**kwargs)


def test_bad_calls_after_fit():
    x = blobs(100, 4, 3)
    km = KMeans(3, device="cpu")
    with pytest.raises(RuntimeError, match="fit"):
        km.assign(x)
    km.fit(x)
    with pytest.raises(ValueError, match="width 5"):
        km.assign(np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match="temperature"):
        km.soft_assign(x, 0.0)
    with pytest.raises(ValueError, match="top_k"):
        km.soft_assign(x, 1.0, top_k=4)
    with pytest.raises(ValueError, match="init: expected initial centroids of shape"):
        KMeans(3, init=np.ones((2, 4), np.float32), device="cpu").fit(x)
    with pytest.raises(ValueError, match="device"):
        KMeans(3, device="tpu").fit(x)


def test_compiled_boundary_checks_name_the_argument():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="x: must have dtype float32"):
        C.cpu_assign(x.astype(np.float64), x)
    with pytest.raises(ValueError, match="x: must be C-contiguous"):
        C.cpu_assign(np.ones((4, 6), np.float32)[:, ::2], x)
    with pytest.raises(ValueError, match="centroids: width"):
        C.cpu_assign(x, np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="x_norm: has 3 entries for 4 rows"):
        C.cpu_assign(x, x, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="labels: entry 1 is 7"):
        C.cpu_accumulate(x, np.array([0, 7, 0, 0], np.int64), 3)
    with pytest.raises(ValueError, match="fewer than k"):
        C.cpu_kmeanspp(x, 5, 0, 3)
    with pytest.raises(ValueError, match="temperature"):
        C.cpu_soft_assign(x, x, -1.0, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU is usable")
def test_cuda_without_gpu_says_why_and_auto_falls_back():
    x = blobs(200, 4, 3)
    with pytest.raises(RuntimeError, match="device='cuda': the CUDA k-means cannot run here: .+"):
        KMeans(3, device="cuda").fit(x)
    assert KMeans(3, device="auto").fit(x).backend == "cpu"
    if C.cuda_compiled:
        with pytest.raises(ValueError, match=r"x: must be a CUDA array \(DLPack device type 1\)"):
            C.cuda_assign(torch.ones(2, 2), torch.ones(1, 2), torch.ones(1), torch.ones(2), torch.ones(2))


def test_reference_ops_fit_matches_lloyd_by_hand():
    x = torch.from_numpy(blobs(500, 5, 4, seed=12)).double()
    c = x[:4].clone()
    centroids, objective, stats = kmeans.lloyd(ReferenceOps(), lambda: [x], c, n_iter=1, tol=0.0, spherical=False)
    labels, _ = assign_reference(x, c)
    sums, counts = accumulate_reference(x, labels, 4)
    torch.testing.assert_close(centroids.double(), sums / counts[:, None], rtol=1e-6, atol=1e-6)
    _, dist = assign_reference(x, sums / counts[:, None])
    assert objective == pytest.approx(float(dist.sum()), rel=1e-6)
    assert len(stats) == 2


# ---- GPU ------------------------------------------------------------------------------------------------------


def test_reference_native_mode_computes_in_the_input_dtype():
    """The chunked PyTorch peer of the benchmark: bfloat16 points stay bfloat16 and so does the product, so its
    distances differ from the float32 ones by bfloat16 rounding; on well separated blobs the assignments agree."""
    from kclip.cluster.reference import ReferenceOps

    x, truth = separated_blobs(2000, 32, 10, device="cpu", dtype=torch.bfloat16, seed=5)
    c = x[:10].float()  # one point of each blob
    native, upcast = ReferenceOps("cpu", native=True), ReferenceOps("cpu")
    assert native.prepare(x).dtype == torch.bfloat16 and upcast.prepare(x).dtype == torch.float32
    (l_n, d_n), (l_u, d_u) = native.assign(native.prepare(x), c), upcast.assign(upcast.prepare(x), c)
    assert d_n.dtype == torch.float32 and not torch.equal(d_n, d_u)
    assert torch.equal(l_n, truth) and torch.equal(l_u, truth)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "tile_rows"),
    [(torch.float32, "auto"), (torch.float16, "64"), (torch.float16, "128"), (torch.bfloat16, "128")],
)
def test_cuda_matches_cpu(monkeypatch, dtype, tile_rows):
    monkeypatch.setenv("KCLIP_CUDA_TILE_ROWS", tile_rows)
    x = blobs(50_000, 64, 100, seed=21)
    c0 = initial_centroids(x, 100)
    xd = torch.from_numpy(x).to("cuda", dtype)
    host = xd.float().cpu().numpy()  # the values the GPU sees
    cpu = KMeans(100, init=c0, n_iter=20, tol=0.0, device="cpu").fit(host)
    gpu = KMeans(100, init=c0, n_iter=20, tol=0.0, device="cuda").fit(xd)
    assert gpu.backend == "cuda"
    rel = 1e-3 if dtype == torch.float32 else 5e-3
    assert gpu.objective == pytest.approx(cpu.objective, rel=rel)
    agree = (gpu.assign(xd).cpu() == cpu.assign(host)).float().mean()
    assert agree >= 0.995


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "d", "k"), [(1, 1, 1), (37, 17, 5), (1000, 100, 129), (4099, 257, 1000)])
def test_cuda_kernels_match_reference_on_odd_shapes(n, d, k):
    torch.manual_seed(n + d + k)
    x = torch.randn(n, d, device="cuda")
    c = torch.randn(k, d, device="cuda")
    labels = torch.full((n,), -7, dtype=torch.int64, device="cuda")  # poisoned: every entry must be written
    dist = torch.full((n,), float("nan"), device="cuda")
    C.cuda_assign(x, c, c.square().sum(1), labels, dist, torch.cuda.current_stream().cuda_stream)
    ref_labels, ref_dist = assign_reference(x.double(), c.double())
    assert (labels == ref_labels).float().mean() >= 0.999
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-4, atol=1e-3)
    full = torch.full((n, k), float("nan"), device="cuda")
    C.cuda_distances(x, c, c.square().sum(1), full, torch.cuda.current_stream().cuda_stream)
    torch.testing.assert_close(full.double(), torch.cdist(x.double(), c.double()).square(), rtol=1e-4, atol=1e-3)
    sums = torch.zeros(k, d, device="cuda")
    counts = torch.zeros(k, dtype=torch.int64, device="cuda")
    C.cuda_accumulate(x, ref_labels, sums, counts, torch.cuda.current_stream().cuda_stream)
    ref_sums, ref_counts = accumulate_reference(x, ref_labels, k)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-4, atol=1e-3)
    assert (counts == ref_counts).all()


@pytest.mark.gpu
@pytest.mark.parametrize("tile_rows", ["64", "128"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "d", "k"),
    [
        (37, 3, 5),
        (1000, 13, 129),
        (4099, 77, 300),
        (2048, 4099, 64),
        (1, 8, 1),
        (300, 40, 65),
        (517, 96, 70),
        (4099, 4104, 130),
    ],
)
def test_cuda_tensor_core_path_with_d_not_a_multiple_of_8(monkeypatch, tile_rows, dtype, n, d, k):
    """The WMMA distance path (16-bit inputs) loads tiles 8 or 16 coordinates wide: a width that is not a multiple
    of 8 must be padded, not read past the row. Both tile sizes forced in turn: 128 rows (cp.async ring) where d is
    a multiple of 8, with partial row, centroid and coordinate tiles; 64 rows otherwise."""
    monkeypatch.setenv("KCLIP_CUDA_TILE_ROWS", tile_rows)
    torch.manual_seed(n + d + k)
    x = torch.randn(n, d, device="cuda").to(dtype)
    c = torch.randn(k, d, device="cuda").to(dtype)
    labels = torch.full((n,), -7, dtype=torch.int64, device="cuda")
    dist = torch.full((n,), float("nan"), device="cuda")
    c_norm = c.float().square().sum(1)
    C.cuda_assign(x, c, c_norm, labels, dist, torch.cuda.current_stream().cuda_stream)
    ref_labels, ref_dist = assign_reference(x.double(), c.double())
    assert (labels >= 0).all() and torch.isfinite(dist).all()
    assert (labels == ref_labels).float().mean() >= 0.99
    torch.testing.assert_close(dist.double(), ref_dist, rtol=2e-2, atol=2e-2 * d)
    full = torch.full((n, k), float("nan"), device="cuda")
    C.cuda_distances(x, c, c_norm, full, torch.cuda.current_stream().cuda_stream)
    ref_full = torch.cdist(x.double(), c.double()).square()
    torch.testing.assert_close(full.double(), ref_full, rtol=2e-2, atol=2e-2 * d)


@pytest.mark.gpu
def test_cuda_tile_rows_variable_is_checked(monkeypatch):
    monkeypatch.setenv("KCLIP_CUDA_TILE_ROWS", "big")
    x = torch.randn(16, 8, device="cuda", dtype=torch.float16)
    labels = torch.empty(16, dtype=torch.int64, device="cuda")
    dist = torch.empty(16, device="cuda")
    with pytest.raises(ValueError, match="KCLIP_CUDA_TILE_ROWS='big'"):
        C.cuda_assign(x, x, x.float().square().sum(1), labels, dist, torch.cuda.current_stream().cuda_stream)


@pytest.mark.gpu
@pytest.mark.parametrize("top_k", [None, 1, 8, 100])
def test_cuda_soft_assign_matches_reference(top_k):
    x = torch.from_numpy(blobs(3000, 32, 200, seed=3)).cuda()
    km = KMeans(200, n_iter=5, device="cuda").fit(x)
    ours = km.soft_assign(x, 2.0, top_k=top_k)
    ref = soft_assign_reference(x.double(), km.centroids.cuda().double(), 2.0, top_k)
    if top_k is None:
        torch.testing.assert_close(ours.double(), ref, rtol=1e-3, atol=1e-5)
    else:
        assert (ours[0] == ref[0]).float().mean() >= 0.99
        torch.testing.assert_close(ours[1].double(), ref[1], rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_arrays_of_one_call_must_share_the_current_device():
    x = torch.randn(100, 8, device="cuda:1")
    c = torch.randn(4, 8, device="cuda:0")
    labels = torch.empty(100, dtype=torch.int64, device="cuda:0")
    dist = torch.empty(100, device="cuda:0")
    with torch.cuda.device(0), pytest.raises(ValueError, match=r"x: is on cuda:1, but .* current device cuda:0"):
        C.cuda_assign(x, c, c.square().sum(1), labels, dist, torch.cuda.current_stream().cuda_stream)
    km = KMeans(4, n_iter=2, device="cuda:1").fit(x)  # the Python layer sets the device itself
    assert km.backend == "cuda" and len(km.assign(x)) == 100


@pytest.mark.gpu
def test_cupy_input():
    cupy = pytest.importorskip("cupy")
    x = blobs(2000, 16, 8, seed=4)
    km = KMeans(8, device="cuda", seed=0).fit(cupy.asarray(x))
    assert km.backend == "cuda"
    assert (km.assign(cupy.asarray(x)).cpu() == km.assign(x)).all()


def separated_blobs(n, d, k, *, device, dtype, seed=0):
    """Blob j holds rows j, j + k, j + 2k, ... (rows [0, k) are one point of each): centres N(0, 1), points 0.3
    from their centre per coordinate. A point is about 0.09 d from its centre and 2 d from any other, so no
    assignment is near a tie at any width or precision. Built in chunks of rows: no float32 copy of x."""
    gen = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(k, d, device=device, generator=gen)
    truth = torch.arange(n, device=device) % k
    x = torch.empty(n, d, device=device, dtype=dtype)
    for s in range(0, n, 1 << 16):
        rows = truth[s : s + (1 << 16)]
        x[s : s + len(rows)] = centres[rows] + 0.3 * torch.randn(len(rows), d, device=device, generator=gen)
    return x, truth


def cluster_means(x, labels, k, rows=1 << 14):
    """Mean of the points of each label, float64, summed in chunks of rows (x stays in its dtype)."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    counts = torch.zeros(k, dtype=torch.int64, device=x.device)
    for s in range(0, x.shape[0], rows):
        part_sums, part_counts = accumulate_reference(x[s : s + rows], labels[s : s + rows], k)
        sums += part_sums
        counts += part_counts
    return sums / counts[:, None]


@pytest.mark.parametrize(
    ("device", "n", "d", "k", "rel"),
    [
        pytest.param("cuda", 1_000_000, 4096, 1024, 1e-3, marks=pytest.mark.gpu, id="cuda-1M-4096-1024"),
        # the same check at a small size on the compiled CPU path, so that it runs (and can fail) without a GPU
        pytest.param("cpu", 4099, 257, 37, 1e-5, id="cpu-4099-257-37"),
    ],
)
def test_large_fit_matches_reference(device, n, d, k, rel):
    x, truth = separated_blobs(n, d, k, device=device, dtype=torch.float16)
    init = x[:k]  # one point of each blob: Lloyd's optimum is the blobs, reached in the first update
    ours = KMeans(k, init=init, n_iter=3, tol=0.0, device=device).fit(x)
    ref = KMeans(k, init=init, n_iter=3, tol=0.0, device="reference").fit(x)
    assert (ours.backend, ref.backend) == (device, "reference")
    assert ours.objective == pytest.approx(ref.objective, rel=rel)
    labels, ref_labels = ours.assign(x), ref.assign(x)
    # No point is near a tie (see separated_blobs): one disagreeing label is a bug, not rounding.
    assert (labels == ref_labels).all() and (labels == truth).all()
    # Converged: each centroid is the mean of the points assigned to it, and the objective is their spread.
    means = cluster_means(x, labels, k)
    torch.testing.assert_close(ours.centroids.double(), means.cpu(), rtol=1e-4, atol=1e-4)
    rows = 1 << 14
    spread = sum(float(assign_reference(x[s : s + rows], means)[1].sum(dtype=torch.float64)) for s in range(0, n, rows))
    assert ours.objective == pytest.approx(spread, rel=rel)
    assert all(st.splits == 0 for st in ours.stats)
    if device == "cuda":
        del x
        torch.cuda.empty_cache()
