"""`import kclip` is lean: no CUDA initialisation, no Triton, DALI or compiled module needed (after torchao's
test/test_lean_import.py)."""

import subprocess
import sys
import tempfile
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    # Run away from the checkout so that `python -c` imports the installed kclip, not the source tree.
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=cwd
        )


def test_import_initialises_no_cuda_and_loads_no_accelerator():
    r = _run(
        """
        import sys
        import kclip, kclip.cluster, kclip.cli, kclip.info
        import torch
        assert not torch.cuda.is_initialized(), "CUDA initialised at import"
        for name in ("triton", "nvidia.dali", "cupy", "kclip._C"):
            assert name not in sys.modules, name + " imported at import time"
        print("ok")
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_import_works_without_triton_dali_or_compiled_module():
    r = _run(
        """
        import sys
        for name in ("triton", "nvidia.dali", "cupy", "kclip._C"):
            sys.modules[name] = None  # any import of these now raises ImportError
        import kclip, kclip.cluster, kclip.cli
        print(kclip.__version__)
        """
    )
    assert r.returncode == 0, r.stderr
