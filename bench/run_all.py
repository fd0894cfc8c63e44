"""Every benchmark this machine supports, one after the other, into one JSON file.

    python bench/run_all.py                         # auto: the GPU where torch sees one, else the CPU
    python bench/run_all.py --smoke --device cpu    # tiny shapes (what CI runs), a few minutes
    python bench/run_all.py --only kmeans,losses --timeout-s 600

Each `bench/bench_<name>.py` runs as its own process (so one that crashes or runs out of time costs only its
own rows) with --device, --smoke and --out into a temporary folder; the combined file is

    {"meta": {device, versions, git revision, time, arguments}, "benchmarks": {name: {"rc", "seconds", "status",
     "result": the script's own {"meta", "rows"} or null, "log_tail"}}}

written atomically to --out (default bench/results/run_all-<device kind>[-smoke].json). A script that refuses
the device (bench_teacher on a machine without the teacher, say) is recorded with its reason, not as a failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, environment, output_path, resolve_device, setup_logging, write_rows

BENCH = REPO / "bench"


def scripts(only: str | None) -> list[Path]:
    found = sorted(BENCH.glob("bench_*.py"))
    if only is None:
        return found
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    names = {p.stem.removeprefix("bench_"): p for p in found}
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise SystemExit(f"--only {only}: no benchmark {', '.join(unknown)} (there are {', '.join(names)})")
    return [names[w] for w in wanted]


def run_one(script: Path, device: str, smoke: bool, timeout_s: float, folder: Path) -> dict:
    out = folder / f"{script.stem}.json"
    cmd = [sys.executable, str(script), "--device", device, "--out", str(out)] + (["--smoke"] if smoke else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO / "bench")
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = 124, (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    result = json.loads(out.read_text()) if out.is_file() else None
    skipped = (result or {}).get("meta", {}).get("skipped", {})
    if rc == 0:
        status = "ok"
    elif rc == 124:
        status = "timeout"
    elif result is not None and not result.get("rows") and skipped:
        status = "unsupported"  # the script refused the device and said why
    else:
        status = "failed"
    return {"rc": rc, "seconds": time.perf_counter() - t0, "status": status, "command": cmd[1:], "result": result,
            "log_tail": log[-4000:]}  # fmt: skip


def combine(meta: dict, benchmarks: dict[str, dict]) -> list[dict]:
    """Every script's rows tagged with its name; each script's meta and status under meta["benchmarks"]."""
    rows = []
    meta["benchmarks"] = {}
    for name, r in benchmarks.items():
        result = r.pop("result", None) or {}
        rows += [{"benchmark": name, **row} for row in result.get("rows", [])]
        meta["benchmarks"][name] = {**r, "meta": result.get("meta")}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few repeats in every script")
    parser.add_argument("--only", default=None, help="comma-separated names (kmeans,losses,data,teacher,train,eval)")
    parser.add_argument("--timeout-s", type=float, default=1800, help="per script (1800)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    setup_logging()
    kind, why_not = resolve_device(args.device)
    meta = {**environment(kind), "arguments": vars(args) | {"out": str(args.out)}}
    out = output_path(args, "run_all", kind)
    benchmarks = {}
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for script in scripts(args.only):
            name = script.stem.removeprefix("bench_")
            if why_not:
                benchmarks[name] = {"rc": None, "status": "unsupported", "result": None, "log_tail": why_not}
                continue
            r = run_one(script, kind, args.smoke, args.timeout_s, Path(tmp))
            benchmarks[name] = r
            failed += r["status"] in ("failed", "timeout")
            n = len((r["result"] or {}).get("rows", []))
            print(f"{name:<10} {r['status']:<12} {r['seconds']:7.1f} s  {n} rows")
            if r["status"] in ("failed", "timeout"):
                print(r["log_tail"][-1500:])
    write_rows(out, combine(meta, benchmarks), meta)
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
