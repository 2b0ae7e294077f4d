"""Every kernel compiles for a GPU (sm_90, default configuration) on this machine, and torch.compile traces
the ops without graph breaks."""
import os
import subprocess
import sys

import torch

import vaegan_fast.ops as ops
from conftest import DEVICE
from numerics import assert_matches
from triton_helpers import requires_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_configs_compile_for_sm80_and_sm90_without_spills():
    # triton.compile cannot take interpreted kernels, so compile in a child process without TRITON_INTERPRET.
    # The default configurations only (a few seconds each); `python bench/compile_report.py` checks them all.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_report.py"), "--default-only",
                           "--arch", "80", "--arch", "90"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " 0 failed, 0 with spills" in proc.stdout, proc.stdout[-4000:]


@requires_triton
def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def step(x, w1, b1, w2, mu_w, eps):
        h = ops.linear_act(x, w1, b1, "gelu", backend="triton")
        stats = ops.linear_act(h, mu_w, None, "identity", backend="triton")
        mu, logvar = stats.chunk(2, dim=1)
        z, kl = ops.reparam_kl(mu, logvar, eps, backend="triton")
        logits = ops.linear_act(z, w2, None, "identity", backend="triton")
        return (ops.discriminator_loss(logits, -logits, backend="triton")
                + ops.generator_loss(logits, backend="triton")
                + ops.feature_recon_loss(h, h.detach() * 0.5, backend="triton") + kl.mean())

    x = torch.randn(32, 20, device=DEVICE)
    params = [torch.randn(24, 20, device=DEVICE) / 5, torch.randn(24, device=DEVICE),
              torch.randn(1, 8, device=DEVICE) / 3, torch.randn(16, 24, device=DEVICE) / 5]
    eps = torch.randn(32, 8, device=DEVICE)
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        ps = [p.clone().requires_grad_(True) for p in params]
        loss = fn(x, *ps, eps)
        results.append([loss.detach()] + list(torch.autograd.grad(loss, ps)))
    for a, b in zip(*results):
        assert_matches("compiled vs eager", b, a.double())
