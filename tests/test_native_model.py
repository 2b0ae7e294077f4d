"""Model(backend="native") trains like Model(backend="reference"): 5 steps from one seed, same losses and weights."""
import pytest
import torch

import vaegan_fast.ops as ops
from vaegan_fast import Model

pytestmark = pytest.mark.skipif("native" not in ops.available_backends("cpu", "reparam_kl"),
                                reason="the native library is not built (pip install --no-build-isolation -e .)")

SMALL = dict(input_dim=20, latent_dim=3, encoder_hidden=(12, 7), decoder_hidden=(7, 12),
             discriminator_hidden=(11, 6))


@pytest.mark.parametrize("options", [dict(), dict(activation="gelu", saturating=True, recon_as_fake=False)],
                         ids=["default", "gelu-saturating"])
def test_native_model_tracks_reference_over_five_steps(options):
    data = torch.rand(5, 16, 20)
    models = {b: Model(**SMALL, **options, seed=3, backend=b) for b in ("native", "reference")}
    history = {b: [] for b in models}
    for b, model in models.items():
        for x in data:
            out = model.train_step(x)
            history[b].append({k: float(v) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1})
    for step, (n, r) in enumerate(zip(history["native"], history["reference"])):
        assert n.keys() == r.keys()
        for k in n:
            assert n[k] == pytest.approx(r[k], rel=1e-4, abs=1e-5), (step, k)
    # 5 Adam steps of lr 2e-4: fp32 rounding differences stay far below one step's size.
    for (name, p), q in zip(models["native"].state_dict().items(), models["reference"].state_dict().values()):
        if torch.is_tensor(p) and p.is_floating_point():
            assert (p - q).abs().max().item() <= 2e-6, name
