"""The benchmark tells the truth: a wrong provider is reported as wrong, and a run writes what it promises."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import kernels  # noqa: E402


def test_a_provider_that_disagrees_with_the_reference_is_caught():
    case = kernels.reparam_case(7, 5)

    def off_by_a_little(args):
        z, kl = case.call(args, "reference")
        return z, kl * (1 + 1e-3)

    def wrong_gradient(args):
        z, kl = case.call(args, "reference")
        return z, kl.detach() + (args["mu"] * 0).sum(1)  # the KL's gradient is lost

    assert kernels.check_provider(lambda a: case.call(a, "reference"), case, "cpu", torch.float32) is None
    assert "output1" in kernels.check_provider(off_by_a_little, case, "cpu", torch.float32)
    assert "grad_mu" in kernels.check_provider(wrong_gradient, case, "cpu", torch.float32)


def test_run_writes_json_and_markdown_with_every_field(tmp_path):
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--ops", "feature_recon_loss", "--presets", "seed",
                           "--no-compile", "--budget", "0.02", "--json", str(out), "--plot"],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, VAEGAN_FAST_BF16_PRODUCTS="auto"))  # "auto" changes nothing
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert {"device", "torch", "triton", "git_commit"} <= set(result["environment"])
    assert result["command"] and "telemetry_before" in result and "telemetry_after" in result
    modes = {r["mode"] for r in result["kernels"]}
    assert modes == {"forward", "backward", "both"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 and r["gbs"] > 0
               for r in result["kernels"] if r["provider"] != "bound")
    bound = [r for r in result["kernels"] if r["provider"] == "bound"]  # the yardstick: timed, not checked
    assert {r["mode"] for r in bound} == modes and all(r["status"] == "bound" and r["median_ms"] > 0 for r in bound)
    providers = {r["provider"] for r in result["e2e"]}
    assert "eager" in providers and any(p.startswith("vaegan_fast") for p in providers)
    eager = next(r for r in result["e2e"] if r["provider"] == "eager")
    assert eager["operator_calls"] > 100 and eager["saved_bytes"] > 0 and eager["samples_per_s"] > 0
    assert "| preset |" in out.with_suffix(".md").read_text()
    cpu = result["environment"]["cpu"]
    if Path("/proc/cpuinfo").exists() and "cpu family" in Path("/proc/cpuinfo").read_text():
        # The CPU's generation, not only its name ("AMD EPYC" covers several), beside every figure.
        assert cpu["family"] and cpu["model"] is not None
        assert f"family {cpu['family']} model {cpu['model']}" in out.with_suffix(".md").read_text()
    # The settings that change which kernels run are named, so that a run under them can be told apart.
    assert result["environment"]["settings"]["VAEGAN_FAST_BF16_PRODUCTS"] == "auto"
    assert "VAEGAN_FAST_BF16_PRODUCTS=auto" in next(l for l in out.with_suffix(".md").read_text().splitlines()
                                                    if l.startswith("Environment: "))
    for chart in ("r-e2e.png", "r-kernels.png"):
        assert (tmp_path / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("options", [
    dict(),  # the conv preset's defaults: gamma 0.01, the pixel term, the gate, each set's own batch statistics
    dict(recon_as_fake=False, saturating=True, encoder_llike_weight=0.5, gating=False),
    dict(discriminator_norm="joint"),  # one batch over real, prior and reconstructed rows
    dict(equilibrium=5.0, margin=0.0),  # the gate rests the discriminator
    dict(equilibrium=-5.0, margin=0.0),  # the gate rests the decoder
])
def test_the_eager_yardstick_trains_as_the_model_does(options):
    """bench/baseline.py follows the model's loss options: same losses, same weights after two steps (in fp64:
    Adam's first steps are about lr times the gradient's sign, which fp32 rounding flips where a gradient is
    near zero)."""
    import e2e
    model = e2e.make_model("conv", "cpu", seed=3, **options).to(torch.float64)
    eager = e2e.EagerVAEGAN.like(model)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for _ in range(2):
        got = eager.step(x)
        stats = model.train_step(x)
        want = (stats["encoder_loss"], stats["decoder_loss"], stats["discriminator_loss"])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=0)
    for net, plain in (("encoder", eager.encoder), ("decoder", eager.decoder), ("discriminator", eager.discriminator)):
        for p, q in zip(model.parameters_of(net), plain.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    skips = model.gate_skips.tolist()
    if options.get("equilibrium") == 5.0:
        assert skips == [2, 0]
    if options.get("equilibrium") == -5.0:
        assert skips == [0, 2]
