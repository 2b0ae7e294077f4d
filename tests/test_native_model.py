"""Model(backend="native") trains as the reference: every step's gradients against the fp64 three-grad step
on the same weights and noise (tests/stepcheck.py), whatever the CPU."""
import pytest
import torch

import vaegan_fast.ops as ops
from stepcheck import check_training_follows_reference
from vaegan_fast import Model

pytestmark = pytest.mark.skipif("native" not in ops.available_backends("cpu", "reparam_kl"),
                                reason="the native library is not built (pip install --no-build-isolation -e .)")

SMALL = dict(input_dim=20, latent_dim=3, encoder_hidden=(12, 7), decoder_hidden=(7, 12),
             discriminator_hidden=(11, 6))


@pytest.mark.parametrize("options", [dict(), dict(activation="gelu", saturating=True, recon_as_fake=False),
                                     dict(gating=True, equilibrium=0.9, margin=0.1, feature_layer=0)],
                         ids=["default", "gelu-saturating", "gated"])
def test_native_model_follows_the_reference_step_by_step(options, monkeypatch):
    model = Model(**SMALL, **options, seed=3, backend="native")
    check_training_follows_reference(model, torch.rand(5, 16, 20), monkeypatch)
