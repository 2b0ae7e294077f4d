"""The training CLI end to end on the synthetic dataset: logs, grids, checkpoints, resume, Ctrl-C."""
import json
import signal
import subprocess
import sys
import time

import torch

from vaegan_fast import Model

TRAIN = [sys.executable, "-m", "vaegan_fast", "train", "--data", "synthetic", "--batch-size", "16",
         "--no-progress", "--log-every", "1", "--device", "cpu", "--backend", "reference"]


def run(*args, **kwargs):
    return subprocess.run([*TRAIN, *args] if args[0] == "--steps" else list(args), capture_output=True,
                          text=True, timeout=300, **kwargs)


def steps_logged(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_equals_training_straight(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run("--steps", "8", "--out", str(straight)).returncode == 0
    assert run("--steps", "4", "--out", str(resumed)).returncode == 0
    again = run("--steps", "4", "--out", str(resumed))
    assert again.returncode == 1 and "--resume" in again.stderr  # never overwrite a run by accident
    assert run("--steps", "8", "--out", str(resumed), "--resume").returncode == 0

    a, b = Model.load(straight / "checkpoint.pt"), Model.load(resumed / "checkpoint.pt")
    assert a.step == b.step == 8
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    assert steps_logged(resumed) == list(range(1, 9))
    for name in ("samples_final.png", "reconstructions_final.png", "metrics.jsonl"):
        assert (resumed / name).exists()
    record = json.loads((resumed / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"encoder_loss", "decoder_loss", "discriminator_loss", "kl", "llike", "samples_per_s"} <= set(record)


def test_sample_writes_a_png(tmp_path):
    assert run("--steps", "2", "--out", str(tmp_path / "r")).returncode == 0
    done = run(sys.executable, "-m", "vaegan_fast", "sample", "--checkpoint", str(tmp_path / "r" / "checkpoint.pt"),
               "--out", str(tmp_path / "grid.png"), "-n", "9")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ctrl_c_leaves_a_checkpoint_to_resume_from(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.Popen([*TRAIN, "--steps", "100000", "--out", str(out), "--checkpoint-every", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "metrics.jsonl", time.time() + 120
    while not (log.exists() and log.stat().st_size > 0):  # wait until training is under way
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "--resume" in stdout
    model = Model.load(out / "checkpoint.pt")
    assert model.step >= 1
    assert run("--steps", str(model.step + 2), "--out", str(out), "--resume").returncode == 0
    assert Model.load(out / "checkpoint.pt").step == model.step + 2


def test_sigkill_loses_at_most_the_steps_since_the_last_checkpoint(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.Popen([*TRAIN, "--steps", "100000", "--out", str(out), "--checkpoint-every", "5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = out / "metrics.jsonl", time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 12):
        assert time.time() < deadline and proc.poll() is None, "training did not get going"
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=60)
    last_logged = steps_logged(out)[-1]
    model = Model.load(out / "checkpoint.pt")
    assert model.step % 5 == 0 and last_logged - 5 <= model.step <= last_logged
    assert run("--steps", str(model.step + 1), "--out", str(out), "--resume").returncode == 0


def test_train_in_fp16_logs_the_loss_scale_and_resumes_it(tmp_path):
    out = tmp_path / "r"
    assert run("--steps", "3", "--out", str(out), "--precision", "fp16").returncode == 0
    done = run("--steps", "5", "--out", str(out), "--precision", "fp16", "--resume")
    assert done.returncode == 0, done.stderr
    model = Model.load(out / "checkpoint.pt")
    assert model.config["precision"] == "fp16" and model.step == 5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    # Each step's scale follows from the previous one across the resume: halved after an overflow, else kept
    # (growth comes only after 2000 finite steps).
    scale = 2.0 ** 16
    for r in records:
        scale = scale / 2 if r["overflow"] else scale
        assert r["loss_scale"] == scale, records
