"""The training step's image head (vaegan_fast/ops/image_head/) on every backend against the fp64 reference.

Forward: images = sigmoid(logits) written into the caller's buffer, and the pixel BCE term of the
reconstruction rows; backward: the gradients at the decoder's logits and at its reconstruction rows, with the
generator's gradient on [prior] or [prior; rec] rows and the feature term's on [rec] or [prior; rec].
Tolerances are tests/numerics.py's (fp32 against fp64; bf16 within twice eager bf16's error).
"""
import pytest
import torch

import vaegan_fast.ops as ops
from numerics import assert_matches
from vaegan_fast.ops.image_head import image_head_backward, image_head_forward
from vaegan_fast.ops.image_head.reference import image_head_backward_reference, image_head_forward_reference

# The Triton backend runs on CPU tensors under its interpreter (tests/conftest.py), on the GPU where there is one.
BACKENDS = [b for b in ("reference", "native", "triton") if b in ops.available_backends("cpu", "image_head_forward")]
SHAPES = [(1, 1), (1, 784), (3, 7), (37, 129), (256, 784)]  # (B, P): one row, one column, primes, the preset


def _inputs(batch, pixels, dtype):
    logits = 4 * torch.randn(2 * batch, pixels, dtype=torch.float64)
    logits.view(-1)[::7] *= 10  # saturated logits, where a naive log(sigmoid) would lose everything
    x = torch.rand(batch, pixels, dtype=torch.float64)
    g_fake = 1e-2 * torch.randn(2 * batch, pixels, dtype=torch.float64)
    u_rec = 1e-2 * torch.randn(2 * batch, pixels, dtype=torch.float64)
    return [t.to(dtype) for t in (logits, x, g_fake, u_rec)]


def _run(backend, logits, x, g_fake, u, with_pixel, recon_as_fake, u_has_prior=False, gamma=0.7, images_in=None):
    """(images, pixel, dec_up, enc_up); the backward reads ``images_in`` when given (else the forward's)."""
    batch = x.shape[0]
    images = torch.empty_like(logits)
    pixel = image_head_forward(logits, x, images, with_pixel, backend)
    if images_in is not None:
        images = images_in
    g = g_fake if recon_as_fake else g_fake[:batch].contiguous()
    u = u if u_has_prior else u[batch:].contiguous()
    factor = 1.3 / batch if with_pixel else 0.0
    dec_up, enc_up = image_head_backward(images, x, g, u, gamma, factor, recon_as_fake, u_has_prior, None, backend)
    return images, pixel, dec_up, enc_up


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("with_pixel", [True, False], ids=["pixel", "no-pixel"])
@pytest.mark.parametrize("recon_as_fake", [True, False], ids=["recon-fake", "recon-real"])
@pytest.mark.parametrize("u_has_prior", [False, True], ids=["u-rec", "u-all"])
def test_matches_fp64_reference(backend, dtype, shape, with_pixel, recon_as_fake, u_has_prior):
    inputs = _inputs(*shape, dtype)
    got = _run(backend, *inputs, with_pixel, recon_as_fake, u_has_prior)
    truth = _run("reference", *[t.double() for t in inputs], with_pixel, recon_as_fake, u_has_prior)
    eager = _run("reference", *inputs, with_pixel, recon_as_fake, u_has_prior) if dtype != torch.float32 else [None] * 4
    # The backward is a function of the images it is given: its truth takes the same (rounded) images, as
    # s' = s (1 - s) of a rounded s near 1 carries the rounding of s, whoever computes it.
    backward_truth = _run("reference", *[t.double() for t in inputs], with_pixel, recon_as_fake, u_has_prior,
                          images_in=got[0].double())
    truth = truth[:2] + backward_truth[2:]
    if eager[0] is not None:
        eager = eager[:2] + _run("reference", *inputs, with_pixel, recon_as_fake, u_has_prior, images_in=got[0])[2:]
    for name, a, t, e in zip(("images", "pixel", "dec_up", "enc_up"), got, truth, eager):
        if t is None:
            assert a is None, f"{name}: expected no pixel term"
            continue
        assert a.shape == t.shape, f"{name}: shape {tuple(a.shape)} != {tuple(t.shape)}"
        assert_matches(name, a, t, e)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "native"])
def test_loss_scale_multiplies_the_pixel_gradient_on_the_device(backend):
    """fp16's loss scale S, a device tensor, scales the pixel term's gradient (and nothing else)."""
    logits, x, g_fake, u = _inputs(5, 11, torch.float32)
    u_rec = u[5:].contiguous()
    images = torch.sigmoid(logits)
    scale = torch.tensor(1024.0)
    plain = image_head_backward(images, x, g_fake, u_rec, 0.7, 0.2, True, False, None, backend)
    scaled = image_head_backward(images, x, g_fake, u_rec, 0.7, 0.2 * 1024.0, True, False, None, backend)
    got = image_head_backward(images, x, g_fake, u_rec, 0.7, 0.2, True, False, scale, backend)
    for a, want, other in zip(got, scaled, plain):
        torch.testing.assert_close(a, want, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(a, other)


@pytest.mark.skipif("native" not in BACKENDS, reason="the native library is not built")
@pytest.mark.parametrize("threads", [1, 2])
def test_native_does_not_depend_on_thread_count(threads):
    inputs = _inputs(300, 784, torch.float32)  # many row tasks
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        first = _run("native", *inputs, True, True)
        torch.set_num_threads(3 - threads)
        second = _run("native", *inputs, True, True)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif("native" not in BACKENDS, reason="the native library is not built")
def test_native_refuses_mismatched_inputs():
    logits, x, g_fake, u = _inputs(4, 9, torch.float32)
    images = torch.empty_like(logits)
    with pytest.raises(RuntimeError, match="logits must hold B or 2B rows for x's B"):
        image_head_forward(logits, x[:3], images, True, "native")
    with pytest.raises(RuntimeError, match="x must be"):
        image_head_forward(logits, x[:, :8], images, True, "native")
    with pytest.raises(RuntimeError, match="u must be"):
        image_head_backward(images, x, g_fake, u[4:, :8], 1.0, 0.1, True, False, None, "native")
    with pytest.raises(TypeError, match="float16"):
        image_head_forward(logits.half(), x.half(), images.half(), True, "native")


def test_reference_writes_the_images_into_the_given_buffer():
    logits, x, _, _ = _inputs(3, 5, torch.float32)
    buffer = torch.zeros(9, 5)
    pixel = image_head_forward_reference(logits, x, buffer[3:], True)
    assert torch.equal(buffer[3:], torch.sigmoid(logits)) and torch.equal(buffer[:3], torch.zeros(3, 5))
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits[3:], x, reduction="sum") / 3
    assert torch.equal(pixel, want)


def test_reference_backward_is_the_chain_rule_through_the_sigmoid():
    """dec_up and enc_up are the autograd gradients of <g, s(l)> + gamma <u, s(l_rec)> + c BCE(l_rec, x)."""
    logits, x, g_fake, u = _inputs(3, 5, torch.float64)
    u_rec = u[3:]
    gamma, c = 0.7, 0.4
    l = logits.clone().requires_grad_(True)
    s = torch.sigmoid(l)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(l[3:], x, reduction="sum")
    (dec_truth,) = torch.autograd.grad((g_fake * s).sum() + gamma * (u_rec * s[3:]).sum() + c * bce, l)
    l2 = logits.clone().requires_grad_(True)
    (enc_truth,) = torch.autograd.grad((u_rec * torch.sigmoid(l2[3:])).sum()
                                       + c * torch.nn.functional.binary_cross_entropy_with_logits(
                                           l2[3:], x, reduction="sum"), l2)
    dec_up, enc_up = image_head_backward_reference(torch.sigmoid(logits), x, g_fake, u_rec, gamma, c, True, False,
                                                   None)
    torch.testing.assert_close(dec_up, dec_truth, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(enc_up, enc_truth[3:], rtol=1e-12, atol=1e-15)
