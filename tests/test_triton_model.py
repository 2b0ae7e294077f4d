"""Model(backend="triton") follows backend="reference" step by step: the kernels inside a real training run."""
import pytest
import torch

from conftest import DEVICE
from triton_helpers import requires_triton
from vaegan_fast import Model
from vaegan_fast.testing import FP32_RELATIVE

pytestmark = requires_triton

SIZES = dict(input_dim=33, latent_dim=5, encoder_hidden=(24, 17), decoder_hidden=(17, 24),
             discriminator_hidden=(19, 11))


def close(name, got, want):
    err = (got.double() - want.double()).abs().max().item()
    bound = FP32_RELATIVE * max(want.double().abs().max().item(), 1e-30)
    assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("options", [dict(), dict(recon_as_fake=False, saturating=True, feature_layer=0,
                                                  activation="gelu", gamma=0.5)], ids=["defaults", "variant"])
def test_five_training_steps_match_the_reference(options):
    models = {b: Model(**SIZES, **options, backend=b, seed=4).to(DEVICE) for b in ("reference", "triton")}
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        x = torch.rand(13, 33, generator=gen).to(DEVICE)
        stats = {b: m.train_step(x) for b, m in models.items()}
        for key, want in stats["reference"].items():
            close(f"step {step + 1} {key}", stats["triton"][key], want)
    for (name, want), got in zip(models["reference"].state_dict().items(), models["triton"].state_dict().values()):
        close(name, got, want)
