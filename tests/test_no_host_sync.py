"""The training step never waits for the device (the precondition for capturing it in a CUDA graph): with
check_inputs=False it reads no tensor value on the host, gating included."""
import contextlib

import pytest
import torch

from vaegan_fast import Model

SIZES = dict(input_dim=20, latent_dim=3, encoder_hidden=(12, 7), decoder_hidden=(7, 12),
             discriminator_hidden=(11, 6))


@contextlib.contextmanager
def host_reads_forbidden(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("the step read a tensor value on the host")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
            m.setattr(torch.Tensor, name, refuse)
        yield


CASES = {"plain": dict(), "gated": dict(gating=True), "discriminator skipped": dict(gating=True, equilibrium=50.0),
         "decoder skipped": dict(gating=True, equilibrium=-50.0),
         # fp16: the overflow check, the skip and the scale's update stay on the device too
         "fp16": dict(precision="fp16"), "fp16 gated": dict(precision="fp16", gating=True, equilibrium=50.0),
         "fp16 overflowing": dict(precision="fp16", loss_scale=dict(init=2.0 ** 40)),
         "fp16 autograd path": dict(precision="fp16", mode="vae")}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_train_step_reads_no_value_on_the_host(monkeypatch, options):
    model = Model(**SIZES, **options, check_inputs=False)
    x = torch.rand(9, 20)
    model.train_step(x)  # the optimizers' lazy state initialisation happens here
    with host_reads_forbidden(monkeypatch):
        for _ in range(2):
            stats = model.train_step(x)
    assert set(stats) >= {"encoder_loss", "train_discriminator", "train_decoder"}


def test_the_guard_catches_a_host_read(monkeypatch):
    model = Model(**SIZES)  # check_inputs=True reads whether x is finite: a host read, caught
    with host_reads_forbidden(monkeypatch), pytest.raises(AssertionError, match="host"):
        model.train_step(torch.rand(9, 20))
