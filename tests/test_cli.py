import json
import os

from kclip.cli import main


def _import_compiled():
    """kclip._C imported here, independently of the code under test: (module or None, the import error)."""
    try:
        from kclip import _C
    except ImportError as exc:
        return None, str(exc)
    return _C, ""


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("compiled_cpu", "compiled_cuda", "cuda_device", "triton", "dali", "cupy"):
        assert key in out


def test_info_json_says_why_not(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    module, error = _import_compiled()
    cpu, cuda = info["compiled_cpu"], info["compiled_cuda"]
    assert cpu["usable"] is (module is not None), (cpu, error)
    if module is not None:
        assert cpu["isa"] == module.cpu_isa and cpu["isa"] in ("avx512", "avx2", "generic") and cpu["why"] == ""
        assert cuda["usable"] is bool(module.cuda_compiled)
    else:
        assert os.environ.get("KCLIP_REQUIRE_COMPILED", "0") in ("", "0"), f"CI builds kclip._C: {error}"
        assert cpu["isa"] is None and "kclip._C could not be imported" in cpu["why"]
        assert cuda["usable"] is False and cuda["why"]
    for key in ("cuda_device", "dali"):
        entry = info[key]
        # where a backend is unusable the report must say why
        assert entry["usable"] or entry["why"], key
