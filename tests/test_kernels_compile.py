"""Compile every kernel configuration for the real GPU targets, on the CPU.

The Triton interpreter proves the logic but accepts tiles a GPU rejects: here each autotune configuration of each
kernel is compiled for sm_80 (A100) and sm_90 (H100/H200) with ``triton.compile`` and a ``GPUTarget`` (no GPU
needed), and the test fails when the kernel needs more shared memory than the device has or when registers spill
(read from ptxas' report on the compiled PTX).

Triton's interpreter patches the language when TRITON_INTERPRET=1 (which conftest sets without a GPU), so the
compilation runs once, in a subprocess without it (this file run as a script), and the tests read its report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import kclip.kernels.contrastive_distill as cd  # noqa: E402
import kclip.kernels.soft_label_ce as ce  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory per block (opt-in maximum)
ARCHS = (80, 90)


def _jit(kernel) -> JITFunction:
    """The JITFunction under the autotuner; re-wrapped when the interpreter built an InterpretedFunction."""
    fn = kernel.fn
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def _pointer_args(names: str, dtype: str) -> dict[str, str]:
    return {n: f"*{dtype}" for n in names.split()}


def _cd_fwd(dtype):
    sig = _pointer_args("A0 C0 A1 C1", dtype) | _pointer_args("SCALE LSE_PART DIAG P TCH SQERR", "fp32")
    sig |= {n: "i32" for n in "N_ROWS N_COLS D E OFFSET COLS_PER_SPLIT".split()}
    sig |= {n: "i32" for n in "stride_a0 stride_c0 stride_a1 stride_c1 stride_p stride_t".split()}
    const = {"HAS_DISTILL": True, "DOT_FP32": False, "INPUT_PRECISION": "tf32x3", "BLOCK_E": cd.BLOCK_E}
    return sig, const


def _cd_bwd(dtype, store_mode):
    sig = _pointer_args("X0 Y0 X1 Y1", dtype)
    sig |= _pointer_args("DX0 DX1", dtype if store_mode == 0 else "fp32")
    sig |= _pointer_args("SCALE GRAD_C GRAD_D LSE_ROW0 LSE_ROW1 LSE_COL0 LSE_COL1 DSCALE P TCH DP", "fp32")
    sig |= {n: "i32" for n in "N_OUTER N_INNER D E DIAG_SHIFT INNER_PER_SPLIT N_DS_SLOTS".split()}
    sig |= {n: "i32" for n in "stride_x0 stride_y0 stride_x1 stride_y1 stride_p stride_t".split()}
    sig |= {"COEF": "fp32", "DIAG_WEIGHT": "fp32", "DISTILL_COEF": "fp32"}
    const = {
        "USE_ROW_LSE": True, "USE_COL_LSE": True, "STORE_DSCALE": True, "HAS_DISTILL": True,
        "STORE_MODE": store_mode, "DOT_FP32": False, "INPUT_PRECISION": "tf32x3", "BLOCK_E": cd.BLOCK_E,
    }  # fmt: skip
    return sig, const


def _ce(dtype, dense, backward):
    names = "Z S IDX W DZ LSE SSUM GRAD" if backward else "Z S IDX W LOSS LSE SSUM BAD"
    sig = {n: "*fp32" for n in names.split()} | {"Z": f"*{dtype}", "IDX": "*i64"}
    if not backward:
        sig["BAD"] = "*i32"
    if backward:
        sig["DZ"] = f"*{dtype}"
    sig |= {n: "i32" for n in "N_ROWS K TOPK stride_z stride_s stride_idx stride_w".split()}
    if backward:
        sig["INV_B"] = "fp32"
    return sig, {"DENSE": dense, "BLOCK_T": 16}  # T = 16: the widest top-k of the concept labels


CASES = [
    ("cd_fwd_bf16", cd._contrastive_distill_fwd_kernel, cd.FWD_CONFIGS_16, _cd_fwd("bf16")),
    ("cd_fwd_fp32", cd._contrastive_distill_fwd_kernel, cd.FWD_CONFIGS_32, _cd_fwd("fp32")),
    ("cd_bwd_bf16", cd._contrastive_distill_bwd_kernel, cd.BWD_CONFIGS_16, _cd_bwd("bf16", 0)),
    ("cd_bwd_fp32", cd._contrastive_distill_bwd_kernel, cd.BWD_CONFIGS_32, _cd_bwd("fp32", 0)),
    ("cd_bwd_bf16_sm90", cd._contrastive_distill_bwd_kernel, cd.BWD_CONFIGS_16_SM90, _cd_bwd("bf16", 0)),
    ("cd_bwd_bf16_atomic", cd._contrastive_distill_bwd_kernel, cd.BWD_ATOMIC_CONFIGS_16, _cd_bwd("bf16", 2)),
    ("cd_bwd_fp32_atomic", cd._contrastive_distill_bwd_kernel, cd.BWD_ATOMIC_CONFIGS_32, _cd_bwd("fp32", 2)),
]
for dense in (True, False):
    CASES += [(f"ce_fwd_dense{int(dense)}", ce._soft_label_ce_fwd_kernel, ce.CONFIGS, _ce("bf16", dense, False))]
    CASES += [(f"ce_bwd_dense{int(dense)}", ce._soft_label_ce_bwd_kernel, ce.CONFIGS, _ce("bf16", dense, True))]

CASE_IDS = [
    (f"{name}-cfg{i}-sm{arch}", name, i, arch)
    for name, _, configs, _ in CASES
    for i, _ in enumerate(configs)
    for arch in (ARCHS if not name.endswith("_sm90") else (90,))  # the kernel prunes those off elsewhere
]


def _ptxas_report(ptx: str, arch: int, workdir: Path) -> tuple[int, int]:
    """(registers, spill bytes) from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    ptxas = getattr(tool, "path", tool)
    src = workdir / "kernel.ptx"
    src.write_text(ptx)
    suffix = "a" if arch == 90 else ""
    out = subprocess.run(
        [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(workdir / "kernel.cubin")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return regs, spills


def compile_case(case_id: str, name: str, index: int, arch: int) -> dict:
    """Compile one configuration for one target: shared bytes, registers, spill bytes (or the error)."""
    kernel, configs, (signature, constexprs) = next((k, c, sp) for n, k, c, sp in CASES if n == name)
    config = configs[index]
    constexprs = dict(constexprs) | dict(config.kwargs)
    signature = dict(signature) | {key: "constexpr" for key in constexprs}
    result = {"id": case_id, "config": str(config), "warps": config.num_warps, "stages": config.num_stages}
    jit = _jit(kernel)
    # Triton specialises pointers and integers divisible by 16 at launch; declare the ones every real launch has
    # (aligned tensors; for the contrastive kernels, widths and row strides that are multiples of 16, as CLIP's).
    divisible = [n for n, t in signature.items() if t.startswith("*")]
    if name.startswith("cd_"):
        divisible += [n for n in signature if n.startswith("stride_") or n in ("D", "E")]
    attrs = {(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    try:
        src = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        with tempfile.TemporaryDirectory() as tmp:
            regs, spills = _ptxas_report(compiled.asm["ptx"], arch, Path(tmp))
        result |= {"shared": compiled.metadata.shared, "regs": regs, "spills": spills}
    except Exception as exc:  # reported per configuration by the test
        result["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    return result


def compile_all(workers: int = 2) -> dict[str, dict]:
    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(compile_case, *zip(*CASE_IDS, strict=True))
        return {r["id"]: r for r in results}


@pytest.fixture(scope="module")
def report() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_id, arch", [(c[0], c[3]) for c in CASE_IDS], ids=[c[0] for c in CASE_IDS])
def test_config_fits_device(report, case_id, arch):
    r = report[case_id]
    assert "error" not in r, r["error"]
    assert r["shared"] <= SHARED_LIMIT[arch], (
        f"needs {r['shared']} B of shared memory, sm_{arch} has {SHARED_LIMIT[arch]}"
    )
    assert r["spills"] == 0, f"{r['spills']} bytes of register spills ({r['regs']} registers)"


def test_every_configuration_is_recorded_with_its_statistics(report):
    """Registers, spills, shared memory and pipeline stages of every configuration, for every target (the report
    that `python tests/test_kernels_compile.py --out FILE` writes; bench/results/kernel_compile.json holds one)."""
    assert set(report) == {c[0] for c in CASE_IDS}
    for r in report.values():
        assert {"regs", "spills", "shared", "stages", "warps"} <= set(r), r
    backward = [r for k, r in report.items() if k.startswith("cd_bwd")]
    assert all(r["stages"] >= 2 for r in backward), "a backward configuration without load pipelining"


if __name__ == "__main__":
    results = compile_all()
    if "--out" in sys.argv:
        out = Path(sys.argv[sys.argv.index("--out") + 1])
        out.write_text(json.dumps({"targets": [f"sm_{a}" for a in ARCHS], "triton": triton.__version__,
                                   "configurations": results}, indent=1) + "\n")  # fmt: skip
    print(json.dumps(results))
