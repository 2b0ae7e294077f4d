"""Writes checkpoint-cdfc8bb.pt and what the code of commit cdfc8bb (the last before the step became a plan,
with its own module layout) computed next, for tests/test_checkpoint_compat.py. Regenerate with that code:
    git worktree add /tmp/old cdfc8bb && (the reference backend needs no build)
    PYTHONPATH=/tmp/old python tests/data/make_checkpoint_cdfc8bb.py
"""
import os

import torch
import vaegan_fast

HERE = os.path.dirname(os.path.abspath(__file__))
m = vaegan_fast.Model(input_dim=64, latent_dim=4, encoder_hidden=(16, 8), decoder_hidden=(8, 16),
                      discriminator_hidden=(16, 8), image_shape=(1, 8, 8), gating=True, gamma=0.5, seed=3,
                      backend="reference")
g = torch.Generator().manual_seed(11)
batches = [torch.rand(6, 64, generator=g) for _ in range(3)]
for x in batches[:2]:
    m.train_step(x)
m.save(os.path.join(HERE, "checkpoint-cdfc8bb.pt"))
before = [v.clone() for v in m.state_dict().values()]
adam = {net: [{k: v.clone() for k, v in st.items()} for st in opt.state_dict()["state"].values()]
        for net, opt in m.optimizers.items()}
stats = m.train_step(batches[2])
torch.save({"commit": "cdfc8bb", "batches": batches, "losses": {k: float(v) for k, v in stats.items()},
            "state_before": before, "adam_before": adam, "step": 2, "config": m.config}, os.path.join(HERE, "checkpoint-cdfc8bb-expected.pt"))
