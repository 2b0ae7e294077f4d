#!/usr/bin/env bash
# bench/gpu_check.sh RESULTS_DIR: everything a short GPU loan should produce, in one command.
#
# On a fresh GPU machine (no network, torch and triton preinstalled) it runs these phases in order, each
# under its own time limit, and writes every file into RESULTS_DIR:
#
#   info           device.json, device.txt: nvidia-smi -L, GPU name, CPU model, torch/triton/python versions
#   install        install.log: python -m pip install --no-build-isolation --no-deps --no-index -e .
#                  (nothing is downloaded; the native C++ backend builds with one job per core)
#   build-native   build-native.log: only if install failed: python setup.py build_ext --inplace (the native
#                  library alone); the later phases import vaegan_fast from the source tree either way, so
#                  they run on the backends that work
#   import         import.json, import.log: the installed package imports; which backends run here
#   tests-gpu      tests-gpu.xml (junit), tests-gpu.log: CUDA graphs, fp16/bf16 training and the conv presets
#                  on the device, NCCL (tests/test_cuda_graphs.py, tests/test_gpu_device.py)
#   tests-triton   tests-triton.xml, tests-triton.log: the Triton tests, compiled for the device
#                  (tests/test_triton_*.py; under the interpreter on a CPU)
#   bench-kernels  bench-kernels.json/.md/.log: bench/run.py, the fused ops at their large sizes, fp32 + bf16
#   bench-e2e      bench-e2e.json/.md/.log: bench/run.py, the train step of the presets: eager, vaegan_fast,
#                  vaegan_fast from a CUDA graph, bf16 and fp16 (telemetry.csv: nvidia-smi samples meanwhile)
#   summary        summary.md (also printed): each phase's status (passed / failed / timeout / skipped),
#                  test counts and failures, the headline numbers of the benchmarks, the device
#
# Default limits (s): info 30, install 150 (300 on a CPU), build-native 90, import 30, tests-gpu 75,
# tests-triton 90, bench-kernels 60, bench-e2e 90, all inside one deadline of 440 s (540 s on a CPU).
#
# A failing or slow phase never stops the later ones; failures are reported in the summary, not in the exit
# code: the script exits 0 whenever it could write its summary, and 2 (with one "error:" line) on wrong
# usage. Without a GPU it runs the CPU-meaningful part (install, import check, a short CPU bench, summary)
# and skips the GPU test phases. A phase stopped by its time limit gets SIGINT first (pytest still writes
# its junit file, bench/run.py its JSON of what it measured so far), SIGKILL 15 s later.
#
# Environment (all optional):
#   GPU_CHECK_DEADLINE=S            total seconds for all phases (default 440 on a GPU, 540 on a CPU); a phase's
#                                   limit shrinks to what is left, and a phase with nothing left is skipped
#   GPU_CHECK_TIMEOUT_<PHASE>=S     one phase's limit, e.g. GPU_CHECK_TIMEOUT_INSTALL=200,
#                                   GPU_CHECK_TIMEOUT_TESTS_TRITON=120 (names upper-cased, '-' as '_')
#   GPU_CHECK_SKIP_INSTALL=1        use the installed package as it is
#   GPU_CHECK_RUN_TESTS=1           run the test phases on a CPU too (they are skipped there by default)
#   GPU_CHECK_GPU_TESTS, GPU_CHECK_TRITON_TESTS   the pytest arguments of the two test phases
#   GPU_CHECK_KERNEL_ARGS, GPU_CHECK_E2E_ARGS     the bench/run.py arguments of the two bench phases
#                                   (--json is added by the script)
set -u

usage() {
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

if [ $# -eq 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; }; then
    usage
    exit 0
fi
if [ $# -ne 1 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ]; then
    echo "error: usage: bench/gpu_check.sh RESULTS_DIR (one folder for every result file, e.g. results/h200)" >&2
    exit 2
fi
if ! OUT=$(mkdir -p -- "$1" 2>/dev/null && cd -- "$1" && pwd); then
    echo "error: cannot create the results folder '$1'" >&2
    exit 2
fi
if ! command -v python >/dev/null 2>&1; then
    echo "error: no 'python' on PATH" >&2
    exit 2
fi
REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

START=$(date +%s)
PHASES="$OUT/phases.tsv"
printf 'phase\tstatus\tseconds\tlimit\trc\tdetail\tlog\n' >"$PHASES"
export PYTHONUNBUFFERED=1 PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export VAEGAN_FAST_BUILD_JOBS="${VAEGAN_FAST_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
RESERVE=20  # seconds kept for the summary

# A Python entry point that turns SIGINT into KeyboardInterrupt even where the caller ignores SIGINT
# (a background job), so that a time limit lets pytest write its junit file and bench/run.py its JSON.
PY_INT='import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
target = sys.argv.pop(1)
sys.argv[0] = target
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)'

now() { date +%s; }

record() {  # record PHASE STATUS SECONDS LIMIT RC DETAIL LOG
    local detail=${6//$'\t'/ }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${detail//$'\n'/ }" "$7" >>"$PHASES"
    echo "== $1: $2 (${3}s of ${4}s)${6:+: $6}"
}

limit_of() {  # limit_of PHASE DEFAULT: the env override, else the default
    local var="GPU_CHECK_TIMEOUT_$(echo "$1" | tr 'a-z-' 'A-Z_')"
    local value=${!var:-$2}
    case $value in '' | *[!0-9]*) value=$2 ;; esac
    echo "$value"
}

# run_phase PHASE DEFAULT_LIMIT LOG COMMAND...: run under its limit; sets RC and STATUS
run_phase() {
    local name=$1 limit log=$3
    limit=$(limit_of "$1" "$2")
    shift 3
    local left=$((START + DEADLINE - RESERVE - $(now)))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 1 ]; then
        RC=-1 STATUS=skipped
        record "$name" skipped 0 0 - "no time left (GPU_CHECK_DEADLINE=${DEADLINE}s)" ""
        return
    fi
    echo "== $name: running (limit ${limit}s, log $(basename "$log"))"
    local t0
    t0=$(now)
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$log" 2>&1
    RC=$?
    PHASE_SECONDS=$(($(now) - t0))
    PHASE_LIMIT=$limit
    if [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then
        STATUS=timeout
    elif [ "$RC" -eq 0 ]; then
        STATUS=passed
    else
        STATUS=failed
    fi
}

finish_phase() {  # finish_phase PHASE LOG [DETAIL]
    [ "$STATUS" = skipped ] && [ "$RC" = -1 ] && return
    local detail=${3:-}
    if [ "$STATUS" = timeout ]; then
        case $detail in *limit*) ;; *) detail="stopped after its ${PHASE_LIMIT}s limit${detail:+; $detail}" ;; esac
    fi
    if [ "$STATUS" = failed ] && [ -z "$detail" ]; then detail="exit status $RC"; fi
    record "$1" "$STATUS" "$PHASE_SECONDS" "$PHASE_LIMIT" "$RC" "$detail" "$(basename "$2")"
}

skip_phase() {  # skip_phase PHASE REASON
    record "$1" skipped 0 0 - "$2" ""
}

TELEMETRY_PID=""
stop_telemetry() {
    if [ -n "$TELEMETRY_PID" ]; then
        kill "$TELEMETRY_PID" 2>/dev/null
        wait "$TELEMETRY_PID" 2>/dev/null
        TELEMETRY_PID=""
    fi
}
trap stop_telemetry EXIT

# ------------------------------------------------------------------------------------------------- info
DEADLINE=${GPU_CHECK_DEADLINE:-540}  # until we know whether there is a GPU
run_phase info 30 "$OUT/info.log" python - "$OUT" <<'EOF'
import json, os, platform, subprocess, sys
out = sys.argv[1]
info = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count()}
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
cpu = [l.split(":", 1)[1].strip() for l in run(["lscpu"]).splitlines() if l.startswith("Model name")]
info["cpu"] = cpu[0] if cpu else platform.processor()
info["nvidia_smi_L"] = run(["nvidia-smi", "-L"])
info["nvidia_smi"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                          "--format=csv"])
info["git_commit"] = run(["git", "rev-parse", "--short", "HEAD"])
info["git_dirty"] = bool(run(["git", "status", "--porcelain", "--untracked-files=no"]))
for var in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES"):
    if var in os.environ:
        info[var] = os.environ[var]
for mod in ("numpy", "triton", "torch"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:  # noqa: BLE001 - a broken module is a finding, not a crash
        info[mod] = f"not importable ({type(exc).__name__}: {exc})"
try:
    import torch
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    capability=f"sm_{props.major}{props.minor}", gpu_memory_gb=round(props.total_memory / 2**30, 1))
except Exception as exc:  # noqa: BLE001
    info["cuda_available"] = False
    info["torch_error"] = str(exc)
json.dump(info, open(os.path.join(out, "device.json"), "w"), indent=1)
with open(os.path.join(out, "device.txt"), "w") as f:
    for k, v in info.items():
        f.write(f"{k}: {v}\n")
print(open(os.path.join(out, "device.txt")).read())
print("GPU" if info["cuda_available"] else "CPU")
EOF
GPU=0
if [ "$STATUS" = passed ] && [ "$(tail -n 1 "$OUT/info.log")" = GPU ]; then GPU=1; fi
finish_phase info "$OUT/info.log" "$([ $GPU = 1 ] && echo "GPU: $(python -c 'import json,sys;print(json.load(open(sys.argv[1]))["gpu"])' "$OUT/device.json" 2>/dev/null)" || echo "no CUDA device: the CPU part only")"
if [ $GPU = 1 ]; then DEADLINE=${GPU_CHECK_DEADLINE:-440}; fi

if [ $GPU = 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw,clocks.sm,temperature.gpu \
        --format=csv,nounits -lms 1000 >"$OUT/telemetry.csv" 2>"$OUT/telemetry.err" &
    TELEMETRY_PID=$!
fi

# ---------------------------------------------------------------------------------------------- install
INSTALL=(python -m pip install --no-build-isolation --no-deps --no-index -e .)
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    skip_phase install "GPU_CHECK_SKIP_INSTALL=1: the installed package as it is"
else
    run_phase install "$([ $GPU = 1 ] && echo 150 || echo 300)" "$OUT/install.log" "${INSTALL[@]}"
    finish_phase install "$OUT/install.log"
    if [ "$STATUS" != passed ] && [ "$STATUS" != skipped ]; then
        # The later phases run from the repository root, where vaegan_fast imports from the source tree
        # (its Triton kernels too); what is left is the native library, built in place (continuing the CMake
        # build in build/native where the install stopped).
        run_phase build-native 90 "$OUT/build-native.log" python setup.py build_ext --inplace
        finish_phase build-native "$OUT/build-native.log" \
            "$([ "$STATUS" = passed ] && echo "built in place; the later phases import vaegan_fast from the source tree")"
    fi
fi

run_phase import 30 "$OUT/import.log" python - "$OUT" <<'EOF'
import json, os, sys
import torch
import vaegan_fast
from vaegan_fast import ops
out = {"location": os.path.dirname(vaegan_fast.__file__), "version": getattr(vaegan_fast, "__version__", None),
       "backends_cpu": ops.available_backends("cpu")}
if torch.cuda.is_available():
    out["backends_cuda"] = ops.available_backends("cuda")
import vaegan_fast.kernels  # noqa: F401 - the Triton source, installed inside the package
json.dump(out, open(os.path.join(sys.argv[1], "import.json"), "w"), indent=1)
print(json.dumps(out))
EOF
IMPORT_DETAIL=$(python - "$OUT/import.json" <<'EOF' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
text = "cpu backends: " + ",".join(d["backends_cpu"])
if "backends_cuda" in d:
    text += "; cuda backends: " + ",".join(d["backends_cuda"])
if "native" not in d["backends_cpu"]:
    text += "; the native library is NOT built"
print(text)
EOF
)
finish_phase import "$OUT/import.log" "$IMPORT_DETAIL"

# -------------------------------------------------------------------------------------------------- tests
run_tests() {  # run_tests PHASE DEFAULT_LIMIT ARGS...
    local name=$1 limit=$2
    shift 2
    rm -f "$OUT/$name.xml"
    # shellcheck disable=SC2068
    run_phase "$name" "$limit" "$OUT/$name.log" python -c "$PY_INT" pytest -v -rfE -p no:cacheprovider \
        --junitxml="$OUT/$name.xml" $@
    if [ "$RC" = 5 ]; then STATUS=skipped; fi  # no tests collected
    local counts
    counts=$(python - "$OUT/$name.xml" "$OUT/$name.log" <<'EOF' 2>/dev/null
import re, sys, xml.etree.ElementTree as ET
counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "interrupted": 0}
try:
    for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
        if case.get("name") is None:  # the test running when the time limit stopped pytest
            counts["interrupted"] += 1
            continue
        kinds = {child.tag for child in case}
        key = "failed" if "failure" in kinds else "errors" if "error" in kinds else \
            "skipped" if "skipped" in kinds else "passed"
        counts[key] += 1
except (OSError, ET.ParseError):  # killed before it wrote its junit file: count the log's -v lines
    for line in open(sys.argv[2], errors="replace"):
        m = re.search(r"::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", line)
        if m:
            key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(m[1], "skipped")
            counts[key] += 1
print(", ".join(f"{v} {k}" for k, v in counts.items() if v or k in ("passed", "failed")))
EOF
)
    finish_phase "$name" "$OUT/$name.log" "$counts"
}

if [ $GPU = 1 ] || [ "${GPU_CHECK_RUN_TESTS:-0}" = 1 ]; then
    run_tests tests-gpu 75 ${GPU_CHECK_GPU_TESTS:-tests/test_cuda_graphs.py tests/test_gpu_device.py}
    # The model on triton first, the compile report (which a CPU runs as well) last.
    TRITON_TESTS="$(ls tests/test_triton_model.py 2>/dev/null) $(ls tests/test_triton_*.py | grep -v -e _model.py -e _compile.py)"
    TRITON_TESTS="$TRITON_TESTS $(ls tests/test_triton_compile.py 2>/dev/null)"
    run_tests tests-triton 90 ${GPU_CHECK_TRITON_TESTS:-$TRITON_TESTS}
else
    skip_phase tests-gpu "no CUDA device (GPU_CHECK_RUN_TESTS=1 runs it anyway)"
    skip_phase tests-triton "no CUDA device (GPU_CHECK_RUN_TESTS=1 runs it anyway)"
fi

# -------------------------------------------------------------------------------------------------- bench
if [ $GPU = 1 ]; then
    KERNEL_ARGS=${GPU_CHECK_KERNEL_ARGS:---full --sizes large --presets none --dtypes fp32,bf16 --no-compile --budget 0.25}
    E2E_ARGS=${GPU_CHECK_E2E_ARGS:---ops none --presets seed,larsen64,conv,wide --dtypes bf16,fp16 --no-compile --budget 0.25}
else
    KERNEL_ARGS=${GPU_CHECK_KERNEL_ARGS:---quick --presets none --no-compile --budget 0.1}
    E2E_ARGS=${GPU_CHECK_E2E_ARGS:---ops none --presets seed --no-compile --budget 0.1}
fi
run_bench() {  # run_bench PHASE DEFAULT_LIMIT ARGS
    local name=$1
    rm -f "$OUT/$name.json" "$OUT/$name.md"
    # shellcheck disable=SC2086
    run_phase "$name" "$2" "$OUT/$name.log" python -c "$PY_INT" bench/run.py $3 --json "$OUT/$name.json"
    local detail=""
    if [ "$RC" = 1 ] && [ -f "$OUT/$name.json" ]; then detail="a provider disagreed with the reference (WRONG)"; fi
    if [ "$STATUS" = timeout ] && [ -f "$OUT/$name.json" ]; then
        detail="stopped after its ${PHASE_LIMIT}s limit; the rows measured until then are in $name.json"
    fi
    finish_phase "$name" "$OUT/$name.log" "$detail"
}
run_bench bench-kernels 60 "$KERNEL_ARGS"
run_bench bench-e2e 90 "$E2E_ARGS"
stop_telemetry

# ------------------------------------------------------------------------------------------------ summary
TOTAL=$(($(now) - START))
if ! python - "$OUT" "$TOTAL" "$DEADLINE" <<'EOF'; then
import csv, json, os, sys
from pathlib import Path

out, total, deadline = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines + [""]


phases = list(csv.DictReader(open(out / "phases.tsv"), delimiter="\t"))
info = load("device.json") or {}
device = info.get("gpu") or f"CPU: {info.get('cpu', '?')}"
L = [f"# GPU check: {device}", "",
     f"bench/gpu_check.sh, {total} s in all (deadline {deadline} s), commit {info.get('git_commit') or '?'}"
     f"{' (dirty)' if info.get('git_dirty') else ''}", ""]

L += ["## Phases", ""]
L += table(["phase", "status", "seconds", "limit s", "detail", "log"],
           [[p["phase"], p["status"].upper() if p["status"] in ("failed", "timeout") else p["status"],
             p["seconds"], p["limit"], p["detail"] or "", p["log"] or ""] for p in phases])
counts = {s: sum(p["status"] == s for p in phases) for s in ("passed", "failed", "timeout", "skipped")}
L += ["Phases: " + ", ".join(f"{v} {k}" for k, v in counts.items()), ""]

L += ["## Device", ""]
for key in ("gpu", "capability", "gpu_memory_gb", "gpu_count", "nvidia_smi_L", "cpu", "cores", "python", "torch",
            "torch_cuda", "triton", "numpy", "platform", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES"):
    if info.get(key) not in (None, ""):
        L.append(f"- {key}: {str(info[key]).replace(chr(10), '; ')}")
imp = load("import.json")
if imp:
    L.append(f"- vaegan_fast from {imp['location']}; backends: cpu {imp['backends_cpu']}"
             + (f", cuda {imp['backends_cuda']}" if "backends_cuda" in imp else ""))
L.append("")

import xml.etree.ElementTree as ET
failures = []
for name in ("tests-gpu", "tests-triton"):
    try:
        root = ET.parse(out / f"{name}.xml").getroot()
    except (OSError, ET.ParseError):
        continue
    for case in root.iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error"):
                msg = (child.get("message") or "").splitlines()[0][:160] if child.get("message") else ""
                failures.append(f"- {name}: {case.get('classname')}::{case.get('name')} ({child.tag}): {msg}")
if failures:
    L += ["## Failed tests", ""] + failures[:40] + ([f"- ... and {len(failures) - 40} more"] if len(failures) > 40
                                                     else []) + [""]

L += ["## Measured", ""]
for name in ("bench-kernels", "bench-e2e"):
    res = load(f"{name}.json")
    if res is None:
        L += [f"{name}: no results ({name}.log says why)", ""]
        continue
    env = res.get("environment", {})
    note = " (interrupted by its time limit: partial)" if res.get("interrupted") else ""
    L += [f"### {name}{note}", "", f"`{' '.join(res.get('command', [])[1:])}` on {env.get('device')}, "
          f"{fmt(res.get('duration_s'), '.0f')} s; full tables in {name}.md", ""]
    if res["kernels"]:
        rows = [r for r in res["kernels"] if r["mode"] == "both" and r["provider"] not in ("bound", "compile")]
        L += ["Kernels, forward + backward:", ""]
        L += table(["op", "size", "dtype", "provider", "median ms", "GB/s", "% peak BW", "vs eager", "status"],
                   [[r["op"], r["size"], r["dtype"], r["provider"], fmt(r.get("median_ms"), ".4f"),
                     fmt(r.get("gbs"), ".1f"),
                     fmt(100 * r["bandwidth_share"], ".0f") if r.get("bandwidth_share") is not None else "-",
                     fmt(r.get("vs_eager"), ".2f") + "x" if r.get("vs_eager") else "-",
                     r["status"] if r["status"] == "ok" else "WRONG: " + r["status"][:60]] for r in rows])
    if res["e2e"]:
        L += ["Training step:", ""]
        L += table(["preset", "batch", "provider", "samples/s", "ms/step", "vs eager", "vs autocast", "status"],
                   [[r["preset"], r["batch"], r["provider"], fmt(r.get("samples_per_s"), ".0f"),
                     fmt(r.get("median_ms"), ".3f"), fmt(r.get("vs_eager"), ".2f") + "x" if r.get("vs_eager") else "-",
                     fmt(r.get("vs_autocast"), ".2f") + "x" if r.get("vs_autocast") else "-",
                     r["status"] if r["status"] == "ok" else "WRONG: " + r["status"][:60]] for r in res["e2e"]])
    wrong = [r for r in res["kernels"] + res["e2e"] if r["status"] not in ("ok", "bound")]
    if wrong:
        L += [f"{len(wrong)} provider rows disagreed with the reference (WRONG)", ""]

try:
    samples = list(csv.reader(open(out / "telemetry.csv")))
except OSError:
    samples = []
if len(samples) > 1:
    head, data = [h.strip() for h in samples[0]], samples[1:]
    L += [f"Telemetry (nvidia-smi, {len(data)} samples at 1 s in telemetry.csv; the bench JSONs hold NVML "
          "snapshots before and after):", ""]
    for i, h in enumerate(head[1:], 1):
        vals = []
        for row in data:
            try:
                vals.append(float(row[i]))
            except (ValueError, IndexError):
                pass
        if vals:
            L.append(f"- {h}: max {max(vals):g}, mean {sum(vals) / len(vals):.1f}")
    L.append("")
else:
    L += ["Telemetry: no nvidia-smi samples (no NVIDIA GPU here)", ""]

for p in phases:
    if p["status"] in ("failed", "timeout") and p["log"]:
        try:
            tail = (out / p["log"]).read_text(errors="replace").splitlines()[-8:]
        except OSError:
            continue
        L += [f"### last lines of {p['log']} ({p['phase']}: {p['status']})", "", "```"] + tail + ["```", ""]

L += ["## Files", ""] + [f"- {f.name}" for f in sorted(out.iterdir()) if f.is_file()] + ["- summary.md", ""]
(out / "summary.md").write_text("\n".join(L))
EOF
    {
        echo "# GPU check (summary writer failed; the phases as recorded)"
        echo
        cat "$PHASES"
    } >"$OUT/summary.md"
fi
echo
cat "$OUT/summary.md"
echo
echo "all results in $OUT (${TOTAL} s)"
exit 0
