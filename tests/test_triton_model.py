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


# The conv presets on triton: every step's gradients against the fp64 three-grad reference step, on batches the
# interpreter runs in seconds (larsen64's network on 16x16 images: its every layer kind and geometry; at 64x64 a
# step is about 20 s). Not batches of 2: a norm over two rows has a gradient of zero up to eps, all rounding.
# conv's default runs the discriminator's norms per set, larsen64's jointly: the triton backend meets both.
@pytest.mark.parametrize("preset,overrides,batch", [("conv", {}, 4), ("larsen64", dict(image_shape=(3, 16, 16)), 4)],
                         ids=["conv", "larsen64"])
def test_conv_presets_follow_the_reference(preset, overrides, batch, monkeypatch):
    model = Model.preset(preset, **overrides, backend="triton", seed=5).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.rand(batch, *model.input_shape, generator=gen).to(DEVICE) for _ in range(2)]
    check_training_follows_reference(model, batches, monkeypatch)


def test_conv_preset_steps_run_only_project_kernels(monkeypatch):
    # Every conv, transposed conv and batch norm of a conv-preset step on triton is a kernel of
    # kernels/triton/conv.py: torch's own would raise here.
    import torch.nn.functional as F

    def refuse(*args, **kwargs):
        raise AssertionError("a torch convolution / batch norm ran on the triton backend")
    model = Model.preset("conv", backend="triton", seed=6).to(DEVICE)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for name in ("conv2d", "conv_transpose2d", "batch_norm"):
        monkeypatch.setattr(F, name, refuse)
    for name in ("convolution", "convolution_backward", "native_batch_norm"):
        monkeypatch.setattr(torch.ops.aten, name, refuse)
    stats = model.train_step(x)
    model.eval()
    with torch.no_grad():
        images = model.sample(2)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.values())
    assert torch.isfinite(images).all()
