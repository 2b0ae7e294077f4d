"""SIGINT and SIGTERM stop training between two steps, wherever in a step they arrive: interrupting and
resuming equals training straight, bit for bit. A second Ctrl-C stops at once and keeps the last checkpoint."""
import os
import signal
import sys

import pytest
import torch
import torch.multiprocessing as mp

from test_model import assert_same_state, snapshot
from vaegan_fast import Model
from vaegan_fast.data import BatchStream
from vaegan_fast.train import TrainingInterrupted, train

STEPS = 6


def run(out, steps=STEPS, resume=False, **kwargs):
    return train({}, data="synthetic", steps=steps, batch_size=16, out=str(out), resume=resume,
                 checkpoint_every=kwargs.pop("checkpoint_every", 1000), grid_every=1000, log_every=1,
                 progress=False, **kwargs)


class SignalsInside:
    """Sends signals to this process from inside the ``nth`` call of ``owner.name``, at given line events of
    everything that call executes (counted by a trace function), or counts those line events."""

    def __init__(self, monkeypatch, owner, name, nth, at_lines=(), signum=signal.SIGINT):
        self.lines, self.at_lines, self.signum, self.calls = 0, set(at_lines), signum, 0
        real = getattr(owner, name)

        def traced(*args, **kwargs):
            self.calls += 1
            if self.calls != nth:
                return real(*args, **kwargs)
            sys.settrace(self._global)
            try:
                return real(*args, **kwargs)
            finally:
                sys.settrace(None)

        monkeypatch.setattr(owner, name, traced)

    def _global(self, frame, event, arg):
        return self._local

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines in self.at_lines:
                os.kill(os.getpid(), self.signum)
        return self._local


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run(out)
    return snapshot(Model.load(out / "checkpoint.pt"))


@pytest.fixture(scope="module")
def lines_in_a_step(tmp_path_factory):
    counter = {}
    with pytest.MonkeyPatch.context() as mp_:
        probe = SignalsInside(mp_, Model, "train_step", nth=3)
        run(tmp_path_factory.mktemp("probe"), steps=3)
        counter["train_step"] = probe.lines
    return counter["train_step"]


def resume_and_compare(out, straight):
    run(out, resume=True)
    assert_same_state(straight, snapshot(Model.load(out / "checkpoint.pt")))
    logged = [int(line.split('"step": ')[1].split(",")[0].rstrip("}")) for line in
              (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1))  # every step logged once, none twice


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("where", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_a_signal_anywhere_in_a_step_stops_after_it_and_resumes_exactly(tmp_path, monkeypatch, straight,
                                                                        lines_in_a_step, signum, where):
    line = max(1, round(where * lines_in_a_step))
    injector = SignalsInside(monkeypatch, Model, "train_step", nth=3, at_lines=[line], signum=signum)
    with pytest.raises(TrainingInterrupted) as stop:
        run(tmp_path)
    assert injector.lines >= line  # the signal was sent inside step 3
    assert stop.value.step == 3 and stop.value.signum == signum
    assert stop.value.exit_code == 128 + signum
    assert Model.load(tmp_path / "checkpoint.pt").step == 3
    monkeypatch.undo()
    resume_and_compare(tmp_path, straight)


@pytest.mark.parametrize("inside", ["batch", "save"])
def test_a_signal_while_fetching_a_batch_or_writing_a_checkpoint_resumes_exactly(tmp_path, monkeypatch, straight,
                                                                            inside):
    owner, name, nth = (BatchStream, "batch", 4) if inside == "batch" else (Model, "save", 2)
    SignalsInside(monkeypatch, owner, name, nth=nth, at_lines=[3])
    with pytest.raises(TrainingInterrupted) as stop:
        run(tmp_path, checkpoint_every=2)
    # While step 4's batch is fetched, or while its checkpoint is written: step 4 completes, then it stops.
    assert stop.value.step == 4
    monkeypatch.undo()
    resume_and_compare(tmp_path, straight)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, straight,
                                                                     lines_in_a_step):
    SignalsInside(monkeypatch, Model, "train_step", nth=3, at_lines=[2, lines_in_a_step // 2])
    with pytest.raises(KeyboardInterrupt) as stop:
        run(tmp_path, checkpoint_every=2)
    assert not isinstance(stop.value, TrainingInterrupted)
    assert Model.load(tmp_path / "checkpoint.pt").step == 2  # the last checkpoint written stands
    monkeypatch.undo()
    resume_and_compare(tmp_path, straight)


def test_the_signal_handlers_are_restored_after_training(tmp_path):
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    run(tmp_path, steps=1)
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before


def _data_parallel_worker(rank, port, out, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    from vaegan_fast.distributed import shutdown
    try:
        if rank == 1:  # only one rank is signalled: both must stop after the same step
            SignalsInside(pytest.MonkeyPatch(), Model, "train_step", nth=3, at_lines=[5], signum=signal.SIGTERM)
        try:
            run(out)
            results[rank] = None
        except TrainingInterrupted as stop:
            results[rank] = stop.step
    finally:
        shutdown()


def test_data_parallel_ranks_agree_on_the_step_to_stop_at(tmp_path):
    from test_distributed import free_port
    results = mp.Manager().dict()
    mp.spawn(_data_parallel_worker, args=(free_port(), str(tmp_path), results), nprocs=2, join=True)
    assert dict(results) == {0: 3, 1: 3}
    assert Model.load(tmp_path / "checkpoint.pt").step == 3
