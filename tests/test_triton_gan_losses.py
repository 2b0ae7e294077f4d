"""GAN losses through backend="triton" against the reference: loss, every gradient, no_grad, double backward."""
import pytest
import torch

import vaegan_fast.ops as ops
from conftest import DEVICE
from backend_ops import SHAPES, disc, gen, recon, shape_id
from numerics import assert_matches
from triton_helpers import DTYPES, as_double, assert_rounded_once, requires_triton, run, strided

pytestmark = requires_triton


def _check(make, inputs, names):
    g = torch.randn((), device=DEVICE)  # a non-unit incoming gradient: backward must scale by it
    outs, grads = run(make("triton"), inputs, [g])
    truth_outs, truth_grads = run(make("reference"), as_double(inputs), [g.double()])
    eager_outs, eager_grads = run(make("reference"), inputs, [g])
    assert outs[0].shape == () and outs[0].dtype == inputs[0].dtype
    assert_matches("loss", outs[0], truth_outs[0], eager_outs[0])
    for name, a, t, e in zip(names, grads, truth_grads, eager_grads):
        assert a.dtype == inputs[0].dtype
        assert_matches(f"d {name}", a, t, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_discriminator_and_generator_losses(shape, dtype):
    # Logits spread over +-30 exercise both tails of the stable softplus.
    real = (8 * torch.randn(shape, device=DEVICE)).to(dtype)
    fake = (8 * torch.randn(shape, device=DEVICE)).to(dtype)
    fake2 = torch.randn(shape[0], device=DEVICE).to(dtype)  # another size and rank
    _check(disc, [real, fake, fake2], ["real", "fake", "fake2"])
    _check(lambda b: gen(b, False), [fake, fake2], ["fake", "fake2"])
    _check(lambda b: gen(b, True), [fake], ["fake"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 3, 7, 13, 31, 61, 63, 65, 127])
def test_odd_batch_sizes(batch, dtype):
    # A discriminator's logits, [batch, 1]. The kernel stores sigmoid(+-x) / batch, rounded once from fp32;
    # under the interpreter its fp32 -> bf16 cast truncated that (off by up to an ulp, where eager is within
    # half of one), so with a unit incoming gradient (backward multiplies by exactly 1) each element must
    # be the fp64 gradient correctly rounded.
    real = (8 * torch.randn(batch, 1, device=DEVICE)).to(dtype)
    fake = (8 * torch.randn(batch, 1, device=DEVICE)).to(dtype)
    _check(disc, [real, fake], ["real", "fake"])
    _check(lambda b: gen(b, False), [fake], ["fake"])
    _check(lambda b: gen(b, True), [fake.view(-1)], ["fake"])
    if dtype.itemsize == 2:
        for make, inputs, names in ((disc, [real, fake], ["real", "fake"]),
                                    (lambda b: gen(b, False), [fake], ["fake"])):
            got = run(make("triton"), inputs)[1]
            want = run(make("reference"), as_double(inputs))[1]
            for name, a, t in zip(names, got, want):
                assert_rounded_once(f"d {name}", a, t)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="subnormal results: whether a GPU's exp and division keep or "
                                                   "flush them is outside the rule")
@pytest.mark.parametrize("batch, margin", [(61, 86.0), (1, 89.0)], ids=["61-subnormal", "1-exp-overflow"])
def test_confident_discriminator(batch, margin):
    # Logits beyond +-86: every gradient, sigmoid(-|x|) / batch, is below bf16's (and fp32's) smallest normal.
    # The interpreter's fp32 -> bf16 cast turned such subnormals into values up to 16 times too large, and
    # 1 / (1 + exp(-t)) gave 0 once exp(-t) overflowed (t < -88.7); sigmoid is now formed from exp(-|t|).
    real = (margin + torch.rand(batch, 1, device=DEVICE)).bfloat16()
    fake = -(margin + torch.rand(batch, 1, device=DEVICE)).bfloat16()
    _check(disc, [real, fake], ["real", "fake"])
    _check(lambda b: gen(b, True), [fake], ["fake"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(7, 3, 5, 2)], ids=shape_id)
def test_feature_recon_loss(shape, dtype):
    a = torch.randn(shape, device=DEVICE).to(dtype)
    b = torch.randn(shape, device=DEVICE).to(dtype)
    _check(recon, [a, b], ["features_real", "features_fake"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(dtype):
    shape = (53, 29)
    real = strided(shape, dtype, DEVICE, "transpose")
    fake = strided(shape, dtype, DEVICE, "slice")
    _check(disc, [real, fake], ["real", "fake"])
    _check(lambda b: gen(b, False), [real[::3], fake.t()], ["fake", "fake2"])
    _check(recon, [real, fake], ["features_real", "features_fake"])
    a = torch.randn(6, 4, 5, 8, device=DEVICE).to(dtype).permute(0, 3, 1, 2)  # 4-d, not viewable as 2-d
    _check(recon, [a, torch.randn(a.shape, device=DEVICE).to(dtype)], ["features_real", "features_fake"])


def test_only_some_inputs_need_grad():
    real, fake = torch.randn(20, 1, device=DEVICE), torch.randn(20, 1, device=DEVICE, requires_grad=True)
    loss = ops.discriminator_loss(real, fake, backend="triton")
    (g,) = torch.autograd.grad(loss, [fake])
    fd = fake.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(ops.discriminator_loss(real.double(), fd, backend="reference"), [fd])
    assert_matches("d fake", g, want)
    a, b = torch.randn(5, 6, device=DEVICE), torch.randn(5, 6, device=DEVICE, requires_grad=True)
    (gb,) = torch.autograd.grad(ops.feature_recon_loss(a, b, backend="triton"), [b])
    bd = b.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(ops.feature_recon_loss(a.double(), bd, backend="reference"), [bd])
    assert_matches("d features_fake", gb, want)


def test_no_grad_computes_only_the_loss(monkeypatch):
    from vaegan_fast.ops.gan_losses import triton as T

    seen = []
    real_launch, recon_launch = T.K_LOSSES.softplus_losses, T.K_LOSSES.feature_recon
    monkeypatch.setattr(T.K_LOSSES, "softplus_losses",
                        lambda xs, s, c, need_grad: seen.append(need_grad) or real_launch(xs, s, c, need_grad))
    monkeypatch.setattr(T.K_LOSSES, "feature_recon",
                        lambda a, b, need_grad: seen.append(need_grad) or recon_launch(a, b, need_grad))
    x = torch.randn(30, 4, device=DEVICE, requires_grad=True)
    y = torch.randn(30, 4, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        l1 = ops.discriminator_loss(x, y, backend="triton")
        l2 = ops.generator_loss(y, backend="triton")
        l3 = ops.feature_recon_loss(x, y, backend="triton")
    with torch.inference_mode():
        l4 = ops.feature_recon_loss(x, y, backend="triton")
    assert seen == [False] * 4
    assert not any(t.requires_grad for t in (l1, l2, l3, l4))
    xd, yd = x.detach().double(), y.detach().double()
    assert_matches("disc", l1, ops.discriminator_loss(xd, yd, backend="reference"))
    assert_matches("gen", l2, ops.generator_loss(yd, backend="reference"))
    assert_matches("recon", l3, ops.feature_recon_loss(xd, yd, backend="reference"))
    assert_matches("recon", l4, ops.feature_recon_loss(xd, yd, backend="reference"))
    seen.clear()
    ops.generator_loss(y, backend="triton")
    assert seen == [True]


def test_gradcheck_and_double_backward_fp64():
    x, y = (torch.randn(4, 3, device=DEVICE, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for fn in (disc("triton"), gen("triton", False), gen("triton", True), recon("triton")):
        assert torch.autograd.gradcheck(fn, (x, y), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x, y), fast_mode=True)


def test_errors():
    x = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(TypeError, match="floating-point"):
        ops.discriminator_loss(x, x.int(), backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        ops.generator_loss(x, x.double(), backend="triton")
    with pytest.raises(TypeError, match="triton"):
        ops.feature_recon_loss(x.to(torch.float8_e5m2), x.to(torch.float8_e5m2), backend="triton")
    with pytest.raises(ValueError, match="shape"):
        ops.feature_recon_loss(x, x[:, :2], backend="triton")
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(ops.BackendUnavailableError, match="CUDA"):
        ops.generator_loss(meta, backend="triton")


def test_autocast_runs_in_fp32():
    x, y = (torch.randn(8, 5, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        losses = [ops.discriminator_loss(x, y, backend="triton"), ops.feature_recon_loss(x, y, backend="triton")]
    assert all(t.dtype == torch.float32 for t in losses)
    assert_matches("disc", losses[0], ops.discriminator_loss(x.double(), y.double(), backend="reference"))


def test_opcheck():
    from vaegan_fast.ops.gan_losses import triton as T

    x = torch.randn(6, 3, device=DEVICE, requires_grad=True)
    y = torch.randn(5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(T.softplus_losses_op, ([x, y], [-1.0, 1.0], [1.0, 1.0], True))
    torch.library.opcheck(T.softplus_losses_op, ([x.detach()], [1.0], [-1.0], False))
    z = torch.randn(6, 3, device=DEVICE, requires_grad=True)
    torch.library.opcheck(T.feature_recon_loss_op, (x, z, True))
    torch.library.opcheck(T.feature_recon_loss_op, (x.detach(), z.detach(), False))
