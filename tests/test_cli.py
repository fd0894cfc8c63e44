import json

from kclip.cli import main


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("compiled_cpu", "compiled_cuda", "cuda_device", "triton", "dali", "cupy"):
        assert key in out


def test_info_json_says_why_not(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["compiled_cpu"]["usable"] in (True, False)
    for key in ("cuda_device", "dali"):
        entry = info[key]
        # where a backend is unusable the report must say why
        assert entry["usable"] or entry["why"], key
