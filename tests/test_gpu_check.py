"""bench/gpu_check.sh, run for real on this machine (no GPU): it writes its result files and a summary that
names every phase with a status, reports a failing and a timed-out phase without stopping the later ones,
exits 0 for all of that, and refuses a missing folder with one error line and exit status 2.

To keep CI short the run skips the install (GPU_CHECK_SKIP_INSTALL=1), runs the two test phases on two tiny
test files (one failing test; one test that outlives its 5 s limit) and the bench phases on one op and one
preset with tiny budgets. The full CPU run (install included) takes about 2-3 minutes on 2 cores.
"""
import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"
PHASES = ["info", "install", "import", "tests-gpu", "tests-triton", "bench-kernels", "bench-e2e"]


def test_a_missing_or_extra_argument_is_one_error_line_and_exit_2(tmp_path):
    for args in ([], [str(tmp_path / "a"), str(tmp_path / "b")]):
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, (args, done)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert not (tmp_path / "a").exists()


def test_the_script_is_executable_bash():
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    (tmp / "test_fails.py").write_text("def test_ok():\n    pass\n\n\ndef test_broken():\n"
                                       "    assert 1 == 2, 'broken on purpose'\n")
    (tmp / "test_slow.py").write_text("import time\n\n\ndef test_quick():\n    pass\n\n\n"
                                      "def test_outlives_its_limit():\n    time.sleep(120)\n")
    out = tmp / "results" / "cpu"  # a folder that does not exist yet
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    env = {**env, "GPU_CHECK_SKIP_INSTALL": "1", "GPU_CHECK_RUN_TESTS": "1",
           "GPU_CHECK_GPU_TESTS": str(tmp / "test_fails.py"), "GPU_CHECK_TRITON_TESTS": str(tmp / "test_slow.py"),
           "GPU_CHECK_TIMEOUT_TESTS_TRITON": "5",
           "GPU_CHECK_KERNEL_ARGS": "--quick --ops reparam_kl --presets none --no-compile --budget 0.01",
           "GPU_CHECK_E2E_ARGS": "--ops none --presets seed --no-compile --budget 0.01"}
    done = subprocess.run([str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp)  # not the repository: the script finds it itself
    return done, out


def _phases(out):
    with open(out / "phases.tsv") as f:
        return {row["phase"]: row for row in csv.DictReader(f, delimiter="\t")}


def test_exits_0_and_writes_its_files(cpu_run):
    done, out = cpu_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("summary.md", "phases.tsv", "device.json", "device.txt", "import.json", "tests-gpu.xml",
                 "tests-gpu.log", "tests-triton.log", "bench-kernels.json", "bench-kernels.md", "bench-e2e.json",
                 "bench-e2e.md", "bench-e2e.log"):
        assert (out / name).is_file(), name
    assert json.loads((out / "device.json").read_text())["cuda_available"] is False
    e2e = json.loads((out / "bench-e2e.json").read_text())
    assert {r["provider"] for r in e2e["e2e"]} >= {"eager"} and all(r["status"] == "ok" for r in e2e["e2e"])


def test_the_summary_names_every_phase_with_its_status(cpu_run):
    done, out = cpu_run
    summary = (out / "summary.md").read_text()
    assert summary in done.stdout  # also printed
    phases = _phases(out)
    assert list(phases) == PHASES
    want = {"info": "passed", "install": "skipped", "import": "passed", "tests-gpu": "failed",
            "tests-triton": "timeout", "bench-kernels": "passed", "bench-e2e": "passed"}
    assert {name: row["status"] for name, row in phases.items()} == want
    for name, status in want.items():
        shown = status.upper() if status in ("failed", "timeout") else status
        assert f"| {name} | {shown} |" in summary, name
    assert "## Device" in summary and "torch:" in summary and "cpu:" in summary
    assert "reparam_kl" in summary and "| seed | " in summary  # the headline numbers


def test_a_failing_and_a_timed_out_phase_are_reported_and_the_later_ones_still_run(cpu_run):
    done, out = cpu_run
    phases = _phases(out)
    assert "1 passed, 1 failed" in phases["tests-gpu"]["detail"]
    summary = (out / "summary.md").read_text()
    assert "test_broken" in summary and "broken on purpose" in summary
    slow = phases["tests-triton"]
    assert slow["limit"] == "5" and int(slow["seconds"]) < 5 + 20
    assert "1 passed" in slow["detail"] and "1 interrupted" in slow["detail"]
    assert (out / "tests-triton.xml").is_file()  # SIGINT first: pytest still wrote its junit file
    assert phases["bench-kernels"]["status"] == phases["bench-e2e"]["status"] == "passed"
