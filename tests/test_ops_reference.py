"""The reference ops are the specification: check them against independent formulations and check that
every op validates its inputs with errors that name the argument."""
import math

import pytest
import torch
import torch.nn.functional as F

from vaegan_fast import ops
from vaegan_fast.ops import BackendUnavailableError

R = dict(backend="reference")
D64 = torch.float64


def test_reparam_kl_matches_the_closed_form_kl_of_two_gaussians():
    mu, logvar, eps = torch.randn(7, 5, dtype=D64), torch.randn(7, 5, dtype=D64), torch.randn(7, 5, dtype=D64)
    z, kl = ops.reparam_kl(mu, logvar, eps, **R)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(posterior, prior).sum(1))
    torch.testing.assert_close(z, mu + posterior.stddev * eps)
    assert kl.shape == (7,)


def test_reparam_kl_draws_eps_from_the_given_generator():
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    z1, _ = ops.reparam_kl(mu, logvar, generator=torch.Generator().manual_seed(5), **R)
    z2, _ = ops.reparam_kl(mu, logvar, generator=torch.Generator().manual_seed(5), **R)
    eps = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(z1, z2)
    torch.testing.assert_close(z1, mu + torch.exp(0.5 * logvar) * eps)


def test_reparam_kl_gradients_pass_gradcheck():
    mu, logvar, eps = (torch.randn(3, 4, dtype=D64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda m, l, e: ops.reparam_kl(m, l, e, **R), (mu, logvar, eps))


MODULES = {"identity": torch.nn.Identity(), "relu": torch.nn.ReLU(), "leaky_relu": torch.nn.LeakyReLU(0.2),
           "tanh": torch.nn.Tanh(), "sigmoid": torch.nn.Sigmoid(), "gelu": torch.nn.GELU(approximate="tanh")}


@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_linear_act_equals_nn_linear_then_the_activation(activation):
    linear = torch.nn.Linear(6, 5).double()
    x = torch.randn(2, 3, 6, dtype=D64)
    y = ops.linear_act(x, linear.weight, linear.bias, activation, **R)
    torch.testing.assert_close(y, MODULES[activation](linear(x)))
    assert y.shape == (2, 3, 5)


def test_linear_act_gelu_is_the_tanh_approximation():
    a = torch.linspace(-4, 4, 101, dtype=D64)
    expected = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
    torch.testing.assert_close(ops.apply_activation(a, "gelu", 0.2), expected)


@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_linear_act_gradients_pass_gradcheck(activation):
    x = torch.randn(4, 3, dtype=D64, requires_grad=True)
    w = torch.randn(2, 3, dtype=D64, requires_grad=True)
    b = torch.randn(2, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.linear_act(x, w, b, activation, **R), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: ops.linear_act(x, w, None, activation, **R), (x, w))


def test_discriminator_and_generator_losses_are_binary_cross_entropies():
    real, rec, prior = torch.randn(8, 1, dtype=D64), torch.randn(8, dtype=D64), torch.randn(5, dtype=D64)
    bce = F.binary_cross_entropy_with_logits
    d = ops.discriminator_loss(real, prior, rec, **R)
    expected = (bce(real, torch.ones_like(real)) + bce(prior, torch.zeros_like(prior))
                + bce(rec, torch.zeros_like(rec)))
    torch.testing.assert_close(d, expected)
    g = ops.generator_loss(prior, rec, **R)
    torch.testing.assert_close(g, bce(prior, torch.ones_like(prior)) + bce(rec, torch.ones_like(rec)))
    sat = ops.generator_loss(prior, rec, saturating=True, **R)
    torch.testing.assert_close(sat, -(bce(prior, torch.zeros_like(prior)) + bce(rec, torch.zeros_like(rec))))
    assert d.dim() == g.dim() == sat.dim() == 0


def test_losses_stay_finite_and_exact_at_huge_logits():
    big = torch.tensor([1000.0, -1000.0, 80.0, -80.0])
    assert ops.discriminator_loss(big, big, **R).item() == pytest.approx((1080.0 / 4) * 2)
    assert torch.isfinite(ops.generator_loss(big, **R))
    for t in (torch.tensor([30.0, -30.0], dtype=D64),):
        torch.testing.assert_close(ops.softplus(t), torch.log1p(torch.exp(t)))


def test_feature_recon_loss_is_half_the_summed_square_error_per_row():
    a, b = torch.randn(6, 4, 3, dtype=D64), torch.randn(6, 4, 3, dtype=D64)
    torch.testing.assert_close(ops.feature_recon_loss(a, b, **R), 0.5 * F.mse_loss(a, b, reduction="sum") / 6)


def test_loss_gradients_pass_gradcheck():
    r, f1, f2 = (torch.randn(5, dtype=D64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda r, a, b: ops.discriminator_loss(r, a, b, **R), (r, f1, f2))
    assert torch.autograd.gradcheck(lambda a, b: ops.generator_loss(a, b, saturating=True, **R), (f1, f2))
    a, b = torch.randn(3, 4, dtype=D64, requires_grad=True), torch.randn(3, 4, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.feature_recon_loss(a, b, **R), (a, b))


# ------------------------------------------------------------------------------------------ bad input
x, w = torch.randn(4, 3), torch.randn(2, 3)
BAD_CALLS = [
    (lambda: ops.reparam_kl([[1.0]], torch.randn(1, 1)), TypeError, "mu must be a torch.Tensor"),
    (lambda: ops.reparam_kl(torch.ones(2, 3, dtype=torch.long), torch.randn(2, 3)), TypeError, "mu must have a floating"),
    (lambda: ops.reparam_kl(torch.randn(2, 3), torch.randn(2, 4)), ValueError, "logvar must have the shape"),
    (lambda: ops.reparam_kl(torch.randn(2, 3), torch.randn(2, 3), torch.randn(3, 3)), ValueError, "eps must have"),
    (lambda: ops.reparam_kl(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "mu must have a non-empty batch"),
    (lambda: ops.reparam_kl(torch.randn(6), torch.randn(6)), ValueError, "mu must be 2-D"),
    (lambda: ops.reparam_kl(torch.randn(2, 3), torch.randn(2, 3, dtype=D64)), TypeError, "logvar has dtype"),
    (lambda: ops.reparam_kl(torch.randn(2, 3), torch.randn(2, 3, device="meta")), ValueError, "logvar is on meta"),
    (lambda: ops.linear_act(x, torch.randn(2, 4), None), ValueError, "x has 3 features"),
    (lambda: ops.linear_act(x, w, torch.randn(3)), ValueError, r"bias must have shape \(2,\)"),
    (lambda: ops.linear_act(x, w, None, "swish"), ValueError, "activation must be one of"),
    (lambda: ops.linear_act(x, w.half(), None), TypeError, "weight has dtype"),
    (lambda: ops.linear_act(x, torch.randn(3), None), ValueError, "weight must be 2-D"),
    (lambda: ops.linear_act(torch.randn(0, 3), w, None), ValueError, "must not be empty"),
    (lambda: ops.linear_act(x.int(), w, None), TypeError, "x must have a floating"),
    (lambda: ops.discriminator_loss(torch.randn(3)), ValueError, "at least one fake"),
    (lambda: ops.discriminator_loss(torch.randn(3), torch.randn(0)), ValueError, r"fake_logits\[0\] must not be empty"),
    (lambda: ops.discriminator_loss(torch.randn(3), torch.ones(3, dtype=torch.long)), TypeError, r"fake_logits\[0\]"),
    (lambda: ops.generator_loss(), ValueError, "at least one"),
    (lambda: ops.generator_loss(torch.randn(3), saturating="yes"), TypeError, "saturating must be a bool"),
    (lambda: ops.feature_recon_loss(torch.randn(3, 2), torch.randn(3, 4)), ValueError, "features_fake must have"),
    (lambda: ops.feature_recon_loss(torch.randn(0, 2), torch.randn(0, 2)), ValueError, "non-empty batch"),
]


@pytest.mark.parametrize("call,error,message", BAD_CALLS)
def test_bad_input_gets_an_error_that_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ops.linear_act(x, w, None, backend="cuda")
    assert "reference" in ops.available_backends("cpu")
    for backend in ("native", "triton"):
        if backend not in ops.available_backends("cpu"):
            with pytest.raises(BackendUnavailableError, match=backend):
                ops.linear_act(x, w, None, backend=backend)
    torch.testing.assert_close(ops.linear_act(x, w, None, backend="auto"), ops.linear_act(x, w, None, **R))
