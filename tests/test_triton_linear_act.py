"""linear_act through backend="triton" against the reference: output, dx, dW, db, every activation."""
import pytest
import torch

import vaegan_fast.ops as ops
from conftest import DEVICE
from numerics import assert_matches
from triton_helpers import DTYPES, LOW_DTYPES, as_double, requires_triton, run, strided

pytestmark = requires_triton

# (M, K, N): 1x1, one row, one output column, primes, a large one.
SHAPES = [(1, 1, 1), (1, 64, 33), (64, 33, 1), (3, 5, 7), (257, 129, 65), (1000, 784, 129), (2048, 512, 512)]
shape_id = lambda s: "x".join(map(str, s))  # noqa: E731


def _make(backend, activation, slope=0.2, **kw):
    def fn(x, w, b=None):
        return ops.linear_act(x, w, b, activation, negative_slope=slope, backend=backend, **kw)
    return fn


def _inputs(M, K, N, dtype, bias=True):
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    w = (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    return [x, w] + ([b] if bias else [])


def _check(inputs, activation, slope=0.2, grad_out=None):
    M, N = inputs[0].shape[0], inputs[1].shape[0]
    g = torch.randn(M, N, device=DEVICE) if grad_out is None else grad_out
    outs, grads = run(_make("triton", activation, slope), inputs, [g])
    truth_outs, truth_grads = run(_make("reference", activation, slope), as_double(inputs), [g.double()])
    eager_outs, eager_grads = run(_make("reference", activation, slope), inputs, [g])
    assert outs[0].dtype == inputs[0].dtype
    assert_matches(f"y ({activation})", outs[0], truth_outs[0], eager_outs[0])
    for name, a, t, e in zip(("dx", "dW", "db"), grads, truth_grads, eager_grads):
        assert_matches(f"{name} ({activation})", a, t, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_every_activation(activation, dtype):
    _check(_inputs(257, 129, 65, dtype), activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_shapes(shape, dtype):
    _check(_inputs(*shape, dtype), "leaky_relu")


# Tiny problems, where one or two elements decide each max error (and a rounding of y that is off by one
# ulp is not averaged away): the bf16 tanh cases here exceeded the bound while the interpreter's truncating
# fp32 -> bf16 cast made y, da and the stored gradients round toward zero.
TINY_SHAPES = [(1, 1, 2), (2, 1, 1), (1, 3, 2), (2, 3, 2), (2, 4, 2), (3, 2, 3), (4, 1, 1), (5, 13, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("shape", TINY_SHAPES, ids=shape_id)
def test_tiny_shapes(shape, activation, dtype):
    _check(_inputs(*shape, dtype), activation)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 1), (1, 64, 1)], ids=shape_id)
def test_saturated_outputs(shape, activation, dtype):
    # |a| about 2 to 6: y is within a few bf16 ulps of +-1 (or 1), where the derivative from y, 1 - y^2 or
    # y (1 - y), is all in y's last bits. One output element, so nothing averages a mis-rounded y away: a y
    # truncated toward 0 had up to twice the derivative and several times eager's error in dx, dW and db.
    # (Low precision only: the fp32 rule is relative to the fp64 result, and eager fp32's derivative from y
    # misses it there too.)
    M, K, N = shape
    x, w, _ = _inputs(M, K, N, torch.float32)
    b = torch.where(torch.rand(N, device=DEVICE) < 0.5, -1.0, 1.0) * (2 + 4 * torch.rand(N, device=DEVICE))
    if activation == "sigmoid":
        b = b.abs()  # y near 1, where 1 - y loses y's bits (near 0, y (1 - y) ~ y keeps them)
    _check([x.to(dtype), (0.3 * w).to(dtype), b.to(dtype)], activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1e-4, 1e-7])
def test_tanh_of_tiny_preactivations(scale, dtype):
    # All |a| << 1: 2 sigmoid(2a) - 1 cancels there (an fp32 ulp of 1 is 6e-8 against tanh(a) ~ a), which
    # put fp32 y off by 1e-7 where the bound is 2e-5 * max|y|, and bf16 y (for |a| ~ 1e-7) off by most of y.
    x, w, b = _inputs(3, 4, 5, torch.float32)
    _check([x.to(dtype), (scale * w).to(dtype), (scale * b).to(dtype)], "tanh")


@pytest.mark.parametrize("activation", ["gelu", "identity"])
def test_no_bias(activation):
    _check(_inputs(67, 45, 23, torch.float32, bias=False), activation)


@pytest.mark.parametrize("slope", [0.0, -0.5, 1.5])
def test_leaky_relu_slopes(slope):
    _check(_inputs(37, 19, 29, torch.float32), "leaky_relu", slope)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layouts", [("transpose", "slice"), ("slice", "transpose")])
def test_strided_inputs(layouts, dtype):
    x = strided((45, 70), dtype, DEVICE, layouts[0])
    w = strided((33, 70), dtype, DEVICE, layouts[1])
    b = strided((2, 33), dtype, DEVICE, "slice")[0]  # a bias with stride 2
    assert not x.is_contiguous() and not w.is_contiguous() and not b.is_contiguous()
    _check([x, w, b], "tanh")
    # A non-contiguous incoming gradient (column-major) and a broadcast one (y.sum(): stride 0).
    _check([x, w, b], "relu", grad_out=torch.randn(33, 45, device=DEVICE).t())
    got = run(lambda *a: _make("triton", "sigmoid")(*a).sum(), [x, w, b])[1]
    want = run(lambda *a: _make("reference", "sigmoid")(*a).sum(), as_double([x, w, b]))[1]
    eager = run(lambda *a: _make("reference", "sigmoid")(*a).sum(), [x, w, b])[1]
    for name, a, t, e in zip(("dx", "dW", "db"), got, want, eager):
        assert_matches(name, a, t, e)


def test_leading_dims_and_partial_grads():
    x = torch.randn(4, 5, 12, device=DEVICE)
    w = torch.randn(7, 12, device=DEVICE, requires_grad=True)
    y = ops.linear_act(x, w, None, "gelu", backend="triton")
    assert y.shape == (4, 5, 7)
    (gw,) = torch.autograd.grad(y.square().sum(), [w])
    wd = w.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(ops.linear_act(x.double(), wd, None, "gelu", backend="reference").square().sum(),
                                  [wd])
    assert_matches("dW", gw, want)


def test_gradcheck_and_double_backward_fp64():
    x = torch.randn(5, 4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    for activation in ops.ACTIVATIONS:
        fn = _make("triton", activation)
        assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True), activation
        assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=True), activation


def test_gradient_penalty_matches_reference():
    # A gradient penalty differentiates d D(x) / d x again: the double-backward path.
    x, w, b = _inputs(16, 8, 4, torch.float64)
    x.requires_grad_(True)
    w2 = torch.randn(1, 4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    grads = []
    for backend in ("triton", "reference"):
        h = _make(backend, "gelu")(x, w, b)
        out = ops.linear_act(h, w2, None, "identity", backend=backend)
        (gx,) = torch.autograd.grad(out.sum(), [x], create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), [w2]))
    assert_matches("d penalty / d w2", grads[0][0], grads[1][0])


def test_no_grad_and_inference_mode():
    x, w, b = _inputs(30, 20, 10, torch.float32)
    with torch.no_grad():
        y = _make("triton", "gelu")(x, w, b)
    with torch.inference_mode():
        y2 = _make("triton", "gelu")(x, w, b)
    truth = _make("reference", "gelu")(*as_double([x, w, b]))
    assert_matches("y", y, truth)
    assert_matches("y", y2, truth)


def test_allow_tf32_flag():
    x, w, b = _inputs(40, 32, 24, torch.float32)
    y = ops.linear_act(x, w, b, "relu", allow_tf32=True, backend="triton")
    assert y.shape == (40, 24)
    with pytest.raises(TypeError, match="allow_tf32"):
        ops.linear_act(x, w, b, "relu", allow_tf32=1, backend="triton")
    # the reference ignores the flag (follows torch's global setting)
    ops.linear_act(x, w, b, "relu", allow_tf32=True, backend="reference")


def test_errors():
    x, w = torch.randn(4, 3, device=DEVICE), torch.randn(5, 3, device=DEVICE)
    with pytest.raises(TypeError, match="floating-point"):
        ops.linear_act(x.int(), w, None, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        ops.linear_act(x, w.double(), None, backend="triton")
    with pytest.raises(TypeError, match="triton"):
        ops.linear_act(x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn), None, backend="triton")
    with pytest.raises(ValueError, match="activation"):
        ops.linear_act(x, w, None, "swish", backend="triton")
    with pytest.raises(ops.BackendUnavailableError, match="CUDA"):
        ops.linear_act(x.to("meta"), w.to("meta"), None, backend="triton")


def test_autocast_runs_in_low_precision():
    x, w, b = _inputs(24, 16, 8, torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = _make("triton", "relu")(x, w, b)
        eager = _make("reference", "relu")(x, w, b)
    assert y.dtype == eager.dtype == torch.bfloat16
    truth = _make("reference", "relu")(*as_double([x.bfloat16(), w.bfloat16(), b.bfloat16()]))
    assert_matches("y", y, truth, eager)


def test_opcheck():
    from vaegan_fast.ops.layer import triton as T

    x = torch.randn(9, 6, device=DEVICE, requires_grad=True)
    w = torch.randn(5, 6, device=DEVICE, requires_grad=True)
    b = torch.randn(5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(T.linear_act_op, (x, w, b, "relu", 0.2, False, False))
    torch.library.opcheck(T.linear_act_op, (x, w, None, "gelu", 0.2, False, True))
    dy = torch.randn(9, 5, device=DEVICE)
    y = torch.randn(9, 5, device=DEVICE)
    for args in ((dy, x.detach(), w.detach(), y, True, "tanh", 0.2, False, True, True),
                 (dy, x.detach(), w.detach(), y, False, "leaky_relu", 0.1, False, False, True),
                 (dy, x.detach(), w.detach(), y, True, "identity", 0.2, False, True, False)):
        torch.library.opcheck(T.linear_act_backward_op, args)
