"""The training CLI end to end on the synthetic dataset: logs, grids, checkpoints, resume, Ctrl-C."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from vaegan_fast import Model
from vaegan_fast.__main__ import main

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


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_leaves_a_checkpoint_to_resume_from(tmp_path, signum, code):
    out = tmp_path / "r"
    proc = subprocess.Popen([*TRAIN, "--steps", "100000", "--out", str(out), "--checkpoint-every", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "metrics.jsonl", time.time() + 120
    while not (log.exists() and log.stat().st_size > 0):  # wait until training is under way
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "--resume" in stdout and "Traceback" not in stderr
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


def test_sample_writes_a_grid_of_the_requested_size(tmp_path):
    assert run("--steps", "1", "--out", str(tmp_path / "r")).returncode == 0
    from PIL import Image
    assert main(["sample", "--checkpoint", str(tmp_path / "r" / "checkpoint.pt"), "--out", str(tmp_path / "g.png"),
                 "-n", "4"]) == 0
    with Image.open(tmp_path / "g.png") as grid:
        assert grid.mode == "L" and grid.size == (2 * (2 * (28 + 2) + 2),) * 2  # 2x2 tiles of 28x28, scaled 2x


def one_error_line(capsys, argv, *words, code=None):
    """main(argv) refuses with one 'error:' line naming ``words``, a non-zero exit code and no traceback."""
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        rc = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc != 0 and (code is None or rc == code), (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


TRAIN_ARGS = ["train", "--data", "synthetic", "--no-progress", "--device", "cpu"]
BAD_TRAIN = [
    (["--steps", "-3"], "--steps"), (["--steps", "0"], "--steps"), (["--steps", "2.5"], "--steps"),
    (["--steps", "2", "--batch-size", "0"], "--batch-size"),
    (["--steps", "2", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["--steps", "2", "--log-every", "0"], "--log-every"), (["--steps", "2", "--grid-every", "-1"], "--grid-every"),
    (["--steps", "2", "--gamma", "nan"], "--gamma"), (["--steps", "2", "--gamma", "-inf"], "--gamma"),
    (["--steps", "2", "--gamma", "-1"], "--gamma"), (["--steps", "2", "--pixel-weight", "inf"], "--pixel-weight"),
    (["--steps", "2", "--encoder-llike-weight", "-0.5"], "--encoder-llike-weight"),
    (["--steps", "2", "--encoder-llike-weight", "nan"], "--encoder-llike-weight"),
    (["--steps", "2", "--lr", "nan"], "--lr"), (["--steps", "2", "--lr", "0"], "--lr"),
    (["--steps", "2", "--feature-layer", "1.5"], "--feature-layer"), (["--steps", "2", "--seed", "-1"], "--seed"),
    (["--steps", "2", "--preset", "huge"], "--preset"), (["--steps", "2", "--backend", "cuda-magic"], "--backend"),
    (["--steps", "2", "--channels", "2"], "--channels"), (["--steps", "2", "--image-size", "0x5"], "--image-size"),
    (["--steps", "2", "--discriminator-norm", "per-set"], "--discriminator-norm"),
]


@pytest.mark.parametrize("args,named", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_malformed_train_arguments_are_one_error_line(tmp_path, capsys, args, named):
    one_error_line(capsys, [*TRAIN_ARGS, *args, "--out", str(tmp_path / "r")], named, code=2)
    assert not (tmp_path / "r").exists()  # refused before any work


BAD_FOR_THE_RUN = [
    (["--steps", "2", "--device", "cuda:7"], "device"), (["--steps", "2", "--device", "banana"], "device"),
    (["--steps", "2", "--batch-size", "100000"], "batch_size"),
    (["--steps", "2", "--feature-layer", "7"], "feature_layer"),
    (["--steps", "2", "--mode", "vae", "--pixel-weight", "0"], "pixel_weight"),
    (["--steps", "2", "--channels", "3"], "channels"),
]


@pytest.mark.parametrize("args,named", BAD_FOR_THE_RUN, ids=[" ".join(a) for a, _ in BAD_FOR_THE_RUN])
def test_arguments_that_do_not_fit_the_run_are_one_error_line(tmp_path, capsys, args, named):
    one_error_line(capsys, [*TRAIN_ARGS, *args, "--out", str(tmp_path / "r")], named, code=1)
    assert not (tmp_path / "r").exists()


def test_missing_or_unusable_data_is_one_error_line(tmp_path, capsys):
    one_error_line(capsys, ["train", "--data", str(tmp_path / "nope"), "--steps", "1", "--out", str(tmp_path / "r")],
                   "data must be one of")
    (tmp_path / "file.png").write_bytes(b"x")
    one_error_line(capsys, ["train", "--data", str(tmp_path / "file.png"), "--steps", "1", "--out",
                            str(tmp_path / "r")], "is a file")
    (tmp_path / "empty").mkdir()
    one_error_line(capsys, ["train", "--data", str(tmp_path / "empty"), "--steps", "1", "--out", str(tmp_path / "r")],
                   "no .png files")
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert run("--steps", "2", "--out", str(out)).returncode == 0
    return out / "checkpoint.pt"


def damaged_files(tmp_path, good):
    raw = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 3])
    torch.save({"weights": {}}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    return {"missing": (tmp_path / "nope.pt", "does not exist"), "truncated": (tmp_path / "truncated.pt", "truncated"),
            "foreign": (tmp_path / "foreign.pt", "not a vaegan_fast checkpoint"),
            "text": (tmp_path / "text.pt", "not a vaegan_fast checkpoint"), "folder": (tmp_path, "is a folder")}


@pytest.mark.parametrize("damage", ["missing", "truncated", "foreign", "text", "folder"])
@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_sample_and_evaluate_report_bad_checkpoints_in_one_line(tmp_path, capsys, trained_checkpoint, damage,
                                                                command):
    path, words = damaged_files(tmp_path, trained_checkpoint)[damage]
    extra = ["--out", str(tmp_path / "g.png")] if command == "sample" else ["--samples", "10"]
    one_error_line(capsys, [command, "--checkpoint", str(path), *extra], words, code=1)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("argv,named", [
    (["sample", "-n", "0"], "-n"), (["sample", "-n", "-4"], "-n"), (["evaluate", "--samples", "0"], "--samples"),
    (["evaluate", "--samples", "3"], "--samples"), (["train-classifier", "--epochs", "0"], "--epochs"),
], ids=["sample -n 0", "sample -n -4", "evaluate --samples 0", "evaluate --samples 3", "train-classifier --epochs 0"])
def test_sample_evaluate_and_classifier_counts_must_be_positive(tmp_path, capsys, trained_checkpoint, argv, named):
    command, *rest = argv
    where = {"sample": ["--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "g.png")],
             "evaluate": ["--checkpoint", str(trained_checkpoint)], "train-classifier": ["--out", str(tmp_path / "c.pt")]}
    one_error_line(capsys, [command, *where[command], *rest], named)
    assert not any(tmp_path.iterdir())


def test_sample_refuses_an_output_that_is_a_folder(tmp_path, capsys, trained_checkpoint):
    one_error_line(capsys, ["sample", "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path)], "folder")


@pytest.mark.parametrize("flag,value,saved", [
    ("--gamma", "0.5", "1.0"), ("--encoder-llike-weight", "0.5", "1.0"), ("--pixel-weight", "2", "1.0"),
    ("--mode", "vae", "vaegan"),
    ("--precision", "bf16", "fp32"), ("--no-recon-as-fake", None, "True"), ("--saturating", None, "False"),
    ("--gating", None, "False"), ("--feature-layer", "0", "-1"), ("--preset", "wide", "seed"), ("--seed", "5", "0"),
    ("--batch-size", "8", "16"), ("--data", "fashion-mnist", "synthetic"),
    ("--discriminator-norm", "separate", "joint"),
])
def test_resume_refuses_options_that_differ_from_the_checkpoint(tmp_path, capsys, trained_checkpoint, flag, value,
                                                               saved):
    out = tmp_path / "r"
    shutil.copytree(trained_checkpoint.parent, out)
    before = (out / "checkpoint.pt").read_bytes()
    argv = ["train", "--data", "synthetic", "--steps", "3", "--out", str(out), "--resume", "--no-progress",
            "--device", "cpu", flag] + ([value] if value is not None else [])
    if flag == "--data":
        argv = [a for i, a in enumerate(argv) if (i, a) != (1, "--data") and (i, a) != (2, "synthetic")]
    line = one_error_line(capsys, argv, saved, code=1)
    assert flag.replace("--no-", "--").split("-", 2)[-1].replace("-", "_") in line.replace("-", "_")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_applies_a_new_learning_rate_and_says_so(tmp_path, capsys, trained_checkpoint):
    out = tmp_path / "r"
    shutil.copytree(trained_checkpoint.parent, out)
    assert main(["train", "--data", "synthetic", "--steps", "3", "--out", str(out), "--resume", "--no-progress",
                 "--device", "cpu", "--lr", "1e-3", "--backend", "auto"]) == 0
    said = capsys.readouterr().out
    assert "--lr 0.001 applies from step 2" in said and "--backend auto" in said
    model = Model.load(out / "checkpoint.pt")
    assert model.config["lr"] == {"encoder": 1e-3, "decoder": 1e-3, "discriminator": 1e-3}
    assert all(g["lr"] == 1e-3 for opt in model.optimizers.values() for g in opt.param_groups)


def test_evaluate_refuses_a_checkpoint_of_other_images(tmp_path, capsys):
    Model(image_shape=(3, 8, 8), encoder_hidden=(8,), decoder_hidden=(8,), discriminator_hidden=(8,)).save(
        tmp_path / "rgb.pt")
    one_error_line(capsys, ["evaluate", "--checkpoint", str(tmp_path / "rgb.pt"), "--samples", "10"],
                   "1x28x28", "3x8x8", code=1)


def test_conv_presets_train_sample_and_evaluate_through_the_cli(tmp_path, capsys):
    from PIL import Image
    import numpy as np
    folder = tmp_path / "rgb"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "larsen"
    assert main(["train", "--data", str(folder), "--preset", "larsen64", "--steps", "2", "--batch-size", "3",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    model = Model.load(out / "checkpoint.pt")
    assert model.config["architecture"] == "larsen64" and model.config["image_shape"] == (3, 16, 16)
    assert model.sample(2).shape == (2, 3, 16, 16)
    assert main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "s.png"), "-n", "4"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(folder)]) == 0
    said = capsys.readouterr().out
    assert "reconstruction MSE" in said and "covers only Fashion-MNIST" in said
    one_error_line(capsys, ["train", "--data", "synthetic", "--preset", "larsen64", "--steps", "1", "--out",
                            str(tmp_path / "bad"), "--no-progress"], "divisible by 8", "--image-size", code=1)


@pytest.mark.parametrize("flag,value,option,parsed", [("--encoder-llike-weight", "0.25", "encoder_llike_weight", 0.25),
                                                      ("--discriminator-norm", "joint", "discriminator_norm", "joint")])
def test_the_loss_options_have_flags(flag, value, option, parsed):
    from vaegan_fast.__main__ import _model_options, build_parser
    args = build_parser().parse_args(["train", "--steps", "1", "--out", "o", flag, value])
    assert _model_options(args)[option] == parsed
    unset = build_parser().parse_args(["train", "--steps", "1", "--out", "o"])
    assert option not in _model_options(unset)  # the preset's (or the model's) default
