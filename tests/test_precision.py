"""precision="bf16": the step computes in bf16 with fp32 master weights, as accurately as eager bf16."""
import copy

import pytest
import torch

from vaegan_fast import Model
from vaegan_fast.model import NETWORKS
from vaegan_fast.ops import available_backends
from vaegan_fast.step import routed_step_gradients
from vaegan_fast.testing import mismatch

SIZES = dict(input_dim=33, latent_dim=5, encoder_hidden=(24, 17), decoder_hidden=(17, 24),
             discriminator_hidden=(19, 11))
CPU_BACKENDS = [b for b in ("reference", "native") if b in available_backends("cpu", "dense_forward")]


def fixed_noise(model, eps, z_prior):
    """Make the model's step use these eps and z_p (cast to the dtype it asks for)."""
    model._draw_noise = lambda batch, count, dtype: [eps.to(dtype), z_prior.to(dtype)][:count]
    return model


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_gradients_are_within_twice_eager_bf16_error(backend):
    model = Model(**SIZES, backend=backend, precision="bf16")
    x, eps, z_prior = torch.rand(16, 33), torch.randn(16, 5), torch.randn(16, 5)
    truth_model = copy.deepcopy(model).double()
    truth, _ = routed_step_gradients(truth_model, x.double(), eps.double(), z_prior.double())
    eager_model = fixed_noise(copy.deepcopy(model).to(torch.bfloat16), eps, z_prior)
    eager_model.config["backend"] = "reference"
    eager = eager_model.routed_gradients(eager_model.losses(x.to(torch.bfloat16)))  # three-grad step in bf16
    ours, _ = routed_step_gradients(model, x.to(torch.bfloat16), eps.to(torch.bfloat16),
                                    z_prior.to(torch.bfloat16))
    for name in NETWORKS:
        for i, (got, want, low) in enumerate(zip(ours[name], truth[name], eager[name])):
            assert got.dtype == torch.bfloat16
            problem = mismatch(f"{name} parameter {i}", got, want, low)
            assert problem is None, problem


@pytest.mark.parametrize("mode", ["vaegan", "vae", "gan"])
def test_bf16_training_keeps_fp32_master_weights(mode):
    model = Model(**SIZES, precision="bf16", mode=mode, gating=mode != "vae")
    for _ in range(3):
        stats = model.train_step(torch.rand(16, 33))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for opt in model.optimizers.values():
        for state in opt.state.values():
            assert state["exp_avg"].dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert stats["decoder_loss"].dtype == torch.float32


def test_unsupported_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        Model(**SIZES, precision="fp16")
