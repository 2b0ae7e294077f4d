"""Model(backend="triton") trains as the reference: every step's gradients against the fp64 three-grad step
on the same weights and noise (tests/stepcheck.py): the kernels inside a real training run."""
import pytest
import torch

from conftest import DEVICE
from stepcheck import check_training_follows_reference
from triton_helpers import requires_triton
from vaegan_fast import Model

pytestmark = requires_triton

SIZES = dict(input_dim=33, latent_dim=5, encoder_hidden=(24, 17), decoder_hidden=(17, 24),
             discriminator_hidden=(19, 11))


@pytest.mark.parametrize("options", [dict(), dict(recon_as_fake=False, saturating=True, feature_layer=0,
                                                  activation="gelu", gamma=0.5)], ids=["defaults", "variant"])
def test_five_training_steps_follow_the_reference(options, monkeypatch):
    model = Model(**SIZES, **options, backend="triton", seed=4).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(13, 33, generator=gen).to(DEVICE) for _ in range(5)]
    check_training_follows_reference(model, batches, monkeypatch)
