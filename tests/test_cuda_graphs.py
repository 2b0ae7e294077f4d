"""CudaGraphStep: the whole train_step captured in one CUDA graph and replayed.

On a CPU only the refusals run; on a GPU a replayed run must equal an eager run step by step (same kernels,
same noise stream), gate decisions included, and a batch of another shape must still train (eagerly).
"""
import warnings

import pytest
import torch

from vaegan_fast import CudaGraphStep, Model

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _model(device="cpu", **options):
    options = {"check_inputs": False, "seed": 3, **options}
    return Model.preset("seed", **options).to(device)


# ------------------------------------------------------------------------------------------ refusals
def test_refuses_a_cpu_model():
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphStep(_model())


@pytest.mark.parametrize("warmup", [0, -1, 1.5])
def test_refuses_a_warmup_below_one(warmup):
    with pytest.raises(ValueError, match="warmup"):
        CudaGraphStep(_model(), warmup=warmup)


@gpu
def test_refuses_checked_inputs_and_host_side_gating():
    with pytest.raises(ValueError, match="check_inputs=False"):
        CudaGraphStep(_model("cuda", check_inputs=True))
    with pytest.raises(ValueError, match="optimizer='adam'"):
        CudaGraphStep(_model("cuda", gating=True, optimizer="rmsprop"))
    with pytest.raises(ValueError, match="precision='fp16' needs optimizer='adam'"):
        CudaGraphStep(_model("cuda", precision="fp16", optimizer="rmsprop"))


# ------------------------------------------------------------------------------------------ on a GPU
def _batches(n, rows=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(rows, 784, generator=gen).cuda() for _ in range(n)]


@gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("options", [{}, {"gating": True, "equilibrium": 0.9, "margin": 0.05},
                                     {"precision": "fp16", "loss_scale": {"init": 2.0 ** 40, "growth_interval": 2}}],
                         ids=["plain", "gated", "fp16-overflow-then-growth"])
def test_replays_equal_eager_steps(backend, options):
    eager, graphed = _model("cuda", backend=backend, **options), _model("cuda", backend=backend, **options)
    step = CudaGraphStep(graphed, warmup=2)
    for i, x in enumerate(_batches(8)):
        want = eager.train_step(x)
        got = {k: v.clone() for k, v in step(x).items()}  # static outputs: the next replay overwrites them
        for key in want:
            torch.testing.assert_close(got[key], want[key], msg=lambda m, k=key, i=i: f"step {i} {k}: {m}")
    assert step.graph is not None, "the step was never captured"
    assert graphed.step == eager.step == 8
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(b, a, msg=lambda m, n=name: f"{n}: {m}")
    # The noise stream advanced on every replay exactly as in the eager run.
    assert torch.equal(graphed._rng().get_state(), eager._rng().get_state())


@gpu
def test_a_batch_of_another_shape_runs_eagerly():
    eager, graphed = _model("cuda"), _model("cuda")
    step = CudaGraphStep(graphed, warmup=1)
    batches = _batches(3) + _batches(1, rows=17, seed=1) + _batches(1, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in batches:
            want = eager.train_step(x)
            got = {k: v.clone() for k, v in step(x).items()}
            torch.testing.assert_close(got["encoder_loss"], want["encoder_loss"])
    assert any("runs eagerly" in str(w.message) for w in caught)
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a)


def test_cli_refuses_cuda_graph_without_a_gpu(tmp_path):
    from vaegan_fast.train import train
    with pytest.raises(ValueError, match="--cuda-graph needs --device cuda"):
        train({}, data="synthetic", steps=1, batch_size=8, out=str(tmp_path), device="cpu", cuda_graph=True)


@gpu
def test_cli_trains_from_a_cuda_graph(tmp_path):
    from vaegan_fast.train import train
    model = train({}, data="synthetic", steps=6, batch_size=32, out=str(tmp_path), device="cuda",
                  checkpoint_every=3, grid_every=100, log_every=2, progress=False, cuda_graph=True)
    assert model.step == 6 and (tmp_path / "checkpoint.pt").exists()
    assert all(torch.isfinite(p).all() for p in model.parameters())
