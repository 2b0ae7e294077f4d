"""The Triton conv layers (kernels/triton/conv.py) through backend="triton" on the test device (the interpreter
without a GPU): forward and every gradient (input, weight, bias, the norm's affine parameters) and the running
averages against fp64, over the presets' layer geometries and awkward ones (1x1 images, odd sizes, strides
larger than the kernel, rectangular kernels, channel counts that are not multiples of a block), in fp32, bf16
and (on a GPU) fp16, contiguous, channels-last and strided; gradcheck in fp64, the custom ops' opcheck, and the
weight gradient's split reduction (what the GPU launcher picks for small outputs). tests/test_layer.py runs the
same layers through the modules and the step's primitives on CPU tensors."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import vaegan_fast.ops as ops
from conftest import DEVICE
from numerics import assert_matches
from triton_helpers import DTYPES, requires_triton

pytestmark = requires_triton

# (kind, in channels, out channels, kernel, stride, padding, output padding, per-sample input shape)
CASES = [
    # the conv preset (Fashion-MNIST)
    ("conv2d", 1, 32, 4, 2, 1, 0, (1, 28, 28)), ("conv2d", 32, 64, 4, 2, 1, 0, (32, 14, 14)),
    ("conv_transpose2d", 64, 32, 4, 2, 1, 0, (64, 7, 7)), ("conv_transpose2d", 32, 1, 4, 2, 1, 0, (32, 14, 14)),
    # larsen64's geometries, channels cut down: 5x5 stride 2 (padding 2, output padding 1), the 5x5 stride-1 head
    ("conv2d", 3, 20, 5, 2, 2, 0, (3, 32, 32)), ("conv_transpose2d", 24, 12, 5, 2, 2, 1, (24, 8, 8)),
    ("conv2d", 12, 3, 5, 1, 2, 0, (12, 16, 16)),
    # DCGAN-style 3x3 and 1x1
    ("conv2d", 3, 8, 3, 1, 1, 0, (3, 17, 13)), ("conv2d", 2, 3, 1, 2, 0, 0, (2, 7, 7)),
    # 1x1 images
    ("conv2d", 5, 7, 3, 1, 1, 0, (5, 1, 1)), ("conv_transpose2d", 6, 5, 4, 2, 1, 0, (6, 1, 1)),
    # odd: stride 3 without padding, stride above the kernel (phases with no taps), output padding 2,
    # a rectangular kernel with per-dimension stride and padding, channels that are not multiples of 16
    ("conv2d", 3, 5, 4, 3, 0, 0, (3, 11, 10)), ("conv_transpose2d", 3, 2, 2, 3, 0, 1, (3, 3, 4)),
    ("conv_transpose2d", 5, 3, 3, 3, 1, 2, (5, 4, 3)), ("conv2d", 3, 4, (3, 2), (2, 1), (1, 0), 0, (3, 6, 5)),
    ("conv2d", 33, 17, 3, 2, 1, 0, (33, 9, 9)),
]
case_id = lambda c: f"{c[0]}-{c[1]}to{c[2]}-k{c[3]}s{c[4]}p{c[5]}o{c[6]}-{'x'.join(map(str, c[7]))}"  # noqa: E731
LARGE = ("conv2d", 64, 128, 5, 2, 2, 0, (64, 16, 16))


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def _make(case, norm: bool, bias: bool, layout: str, batch: int):
    """(x, weight, bias, nn.BatchNorm2d or None), fresh random, in fp32 (cast per run)."""
    kind, cin, cout, k, s, p, op, shape = case
    kh, kw = _pair(k)
    wshape = (cout, cin, kh, kw) if kind == "conv2d" else (cin, cout, kh, kw)
    w = torch.randn(wshape, device=DEVICE) / (cin * kh * kw) ** 0.5
    b = torch.randn(cout, device=DEVICE) if bias else None
    bn = None
    if norm:
        bn = nn.BatchNorm2d(cout).to(DEVICE)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(batch, *shape, device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # every other sample of a batch twice the size, and a transposed weight layout
        x = torch.cat([x, torch.randn_like(x)], 0)[::2]
        w = w.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "hw_transposed":  # H and W strides swapped
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    return x, w, b, bn


def _run(case, backend, dtype, x, w, b, bn, training, activation, slope, grad):
    kind, _, _, _, s, p, op, _ = case
    x = x.to(dtype).detach().requires_grad_(True)
    w = w.to(dtype).detach().requires_grad_(True)
    b = b.to(dtype).detach().requires_grad_(True) if b is not None else None
    norm = None
    if bn is not None:
        norm = nn.BatchNorm2d(bn.num_features).to(DEVICE)
        norm.load_state_dict(bn.state_dict())
        norm = norm.to(dtype).train(training)
    kw = dict(stride=s, padding=p, negative_slope=slope, norm=norm, training=training, backend=backend)
    if kind == "conv2d":
        y = ops.conv2d_act(x, w, b, activation, **kw)
    else:
        y = ops.conv_transpose2d_act(x, w, b, activation, output_padding=op, **kw)
    if grad is None:
        return y.detach()
    params = [x, w] + ([b] if b is not None else []) + ([norm.weight, norm.bias] if norm is not None else [])
    grads = torch.autograd.grad(y, params, grad.to(dtype))
    state = (norm.running_mean, norm.running_var) if norm is not None else None
    return y.detach(), grads, state


def compare(case, dtype, norm=False, training=True, activation="leaky_relu", slope=0.2, bias=None,
            layout="contiguous", batch=3):
    # A bias before a batch norm in training mode has a gradient of exactly zero analytically (all rounding):
    # by default only the layers without one (or in eval mode) have a bias.
    bias = (not norm or not training) if bias is None else bias
    x, w, b, bn = _make(case, norm, bias, layout, batch)
    args = (x, w, b, bn, training, activation, slope)
    grad = torch.randn_like(_run(case, "reference", torch.float64, *args, None))
    truth = _run(case, "reference", torch.float64, *args, grad)
    got = _run(case, "triton", dtype, *args, grad)
    eager = _run(case, "reference", dtype, *args, grad) if dtype != torch.float32 else (None, [None] * 5, None)
    assert got[0].dtype == dtype
    assert_matches("y", got[0], truth[0], eager[0])
    names = ["dx", "dW"] + (["db"] if bias else []) + (["dgamma", "dbeta"] if norm else [])
    for name, a, t, e in zip(names, got[1], truth[1], eager[1]):
        assert_matches(name, a, t, e)
    if norm and training and dtype == torch.float32:  # the running averages, as nn.BatchNorm updates them
        for name, a, t in zip(("running_mean", "running_var"), got[2], truth[2]):
            assert_matches(name, a, t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layers_match_fp64(case, norm, dtype):
    compare(case, dtype, norm)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_large_layer(dtype):
    compare(LARGE, dtype, norm=True, batch=4)
    compare(LARGE, dtype, norm=False, batch=2)


@pytest.mark.parametrize("activation,slope", [("identity", 0.2), ("relu", 0.2), ("leaky_relu", -0.3),
                                              ("tanh", 0.2), ("sigmoid", 0.2), ("gelu", 0.2)])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "batchnorm"])
def test_every_activation(activation, slope, norm):
    for case in (CASES[4], CASES[5]):
        compare(case, torch.float32, norm, activation=activation, slope=slope)
    compare(CASES[5], torch.bfloat16, norm, activation=activation, slope=slope)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[9], CASES[13]], ids=case_id)
def test_eval_mode_uses_the_running_averages(case, dtype):
    compare(case, dtype, norm=True, training=False)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "hw_transposed"])
@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[14]], ids=case_id)
def test_strided_inputs(case, layout):
    compare(case, torch.float32, norm=True, layout=layout)
    compare(case, torch.float32, norm=False, layout=layout)


def test_one_sample_and_a_bias_before_a_norm():
    compare(CASES[9], torch.float32, norm=False, batch=1)
    # before a norm in training mode the bias's gradient is zero analytically: what is left is rounding
    x, w, b, bn = _make(CASES[4], True, True, "contiguous", 2)
    _, (dx, dw, db, dgamma, dbeta), _ = _run(CASES[4], "triton", torch.float32, x, w, b, bn, True, "relu", 0.2,
                                             torch.randn(2, 20, 16, 16, device=DEVICE))
    assert db.abs().max() <= 1e-5 * dbeta.abs().max()


def test_outputs_are_channels_last():
    x, w, b, _ = _make(CASES[1], False, True, "contiguous", 2)
    y = ops.conv2d_act(x, w, b, "relu", stride=2, padding=1, backend="triton")
    assert y.is_contiguous(memory_format=torch.channels_last)


# gradcheck differentiates numerically, one forward per input element: tiny layers of the three geometries
TINY = [("conv_transpose2d", 2, 3, 3, 2, 1, 1, (2, 3, 2)), ("conv_transpose2d", 2, 2, 2, 3, 0, 1, (2, 2, 2)),
        ("conv2d", 3, 2, (3, 2), (2, 1), (1, 0), 0, (3, 4, 3))]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", TINY, ids=case_id)
def test_gradcheck_in_fp64(case, training):
    kind, cin, cout, k, s, p, op, shape = case
    x, w, b, bn = _make(case, True, True, "contiguous", 3)
    x, w, b = (t.double().requires_grad_(True) for t in (x, w, b))
    bn = bn.double().train(training)
    gamma, beta = (t.detach().clone().requires_grad_(True) for t in (bn.weight, bn.bias))
    state = [t.clone() for t in (bn.running_mean, bn.running_var)]

    def f(x, w, b, gamma, beta):
        if training:  # the running averages move with every call; the output never reads them then
            bn.running_mean.copy_(state[0])
            bn.running_var.copy_(state[1])
        norm = SimpleNamespace(weight=gamma, bias=beta, running_mean=bn.running_mean, running_var=bn.running_var,
                               eps=bn.eps, momentum=bn.momentum, num_features=bn.num_features)
        kw = dict(stride=s, padding=p, norm=norm, training=training, backend="triton")
        if kind == "conv2d":
            return ops.conv2d_act(x, w, b, "tanh", **kw)
        return ops.conv_transpose2d_act(x, w, b, "tanh", output_padding=op, **kw)
    # fast mode: a few random directions instead of one forward per input element (each is several interpreted
    # kernel launches); a wrong gradient still shows in any direction
    assert torch.autograd.gradcheck(f, (x, w, b, gamma, beta), eps=1e-6, atol=1e-7, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b, gamma, beta), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_the_weight_gradient_split_over_its_reduction(splits):
    # The GPU launcher splits the reduction over N OH OW when the output has few tiles (fp32 partials, summed
    # in a fixed order); under the interpreter it never does by itself, so the split is forced here.
    from vaegan_fast.ops._triton_lib import kernels
    kind, cin, cout, k, s, p, _, shape = CASES[4]
    x = torch.randn(5, *shape, device=DEVICE, dtype=torch.float64)
    w = torch.randn(cout, cin, k, k, device=DEVICE, dtype=torch.float64)
    da = torch.randn(torch.nn.functional.conv2d(x, w, stride=s, padding=p).shape, device=DEVICE,
                     dtype=torch.float64)
    want = torch.ops.aten.convolution_backward(da, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
                                               [False, True, False])[1]
    got = kernels.conv.weight_grad(da, x, (k, k), (s, s), (p, p), torch.float64, splits=splits)
    assert_matches("dW", got, want)


def _op_args(case, training, norm):
    kind, cin, cout, k, s, p, op, shape = case
    from vaegan_fast.ops.layer import _conv_spec
    from vaegan_fast.ops.layer.triton import _spec_args
    x, w, b, bn = _make(case, norm, True, "contiguous", 3)
    spec = _conv_spec(kind, x, w, b, "leaky_relu", s, p, op, 0.2, bn)
    extra = (bn.weight, bn.bias, bn.running_mean, bn.running_var) if norm else (None,) * 4
    return spec, x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), extra, \
        (*_spec_args(spec), training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "batchnorm"])
def test_opcheck(norm, training):
    from vaegan_fast.ops.layer.triton import fused_layer_backward_op, fused_layer_op
    spec, x, w, b, extra, static = _op_args(CASES[5], training, norm)
    torch.library.opcheck(fused_layer_op, (x, w, b, *extra, *static))
    with torch.no_grad():
        y, a, kept, mean, rstd, _ = fused_layer_op(x.detach(), w.detach(), b.detach(), *extra, *static)
    dy = torch.randn_like(y)
    gamma = extra[0].detach() if extra[0] is not None else None
    torch.library.opcheck(fused_layer_backward_op, (dy, x.detach(), w.detach(), gamma, a, kept, mean, rstd,
                                                    *static, True, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_autocast_runs_in_low_precision():
    x, w, b, _ = _make(CASES[1], False, True, "contiguous", 2)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = ops.conv2d_act(x, w, b, "relu", stride=2, padding=1, backend="triton")
        want = ops.conv2d_act(x, w, b, "relu", stride=2, padding=1, backend="reference")
    assert got.dtype == want.dtype == torch.bfloat16
    truth = ops.conv2d_act(x.double(), w.double(), b.double(), "relu", stride=2, padding=1, backend="reference")
    assert_matches("y", got, truth, want)


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_the_norm_reductions_over_several_chunks(chunk):
    # On the GPU a group's rows are reduced in chunks of 128 and merged (Chan's update for the moments, sums
    # in order); the interpreter's one chunk per group would never merge, so the chunk is forced small here.
    from vaegan_fast.ops._triton_lib import kernels
    groups, rows, channels = 3, 37, 19
    a = (torch.randn(groups * rows, channels, device=DEVICE, dtype=torch.float64) * 3 + 5)
    dy = torch.randn_like(a)
    mean, var, rstd = kernels.conv.channel_moments(a, groups, 1e-5, chunk=chunk)
    want_var, want_mean = torch.var_mean(a.view(groups, rows, channels), dim=1, correction=0)
    assert_matches("mean", mean, want_mean)
    assert_matches("var", var, want_var)
    assert_matches("rstd", rstd, torch.rsqrt(want_var + 1e-5))
    sums, totals = kernels.conv.grad_sums(dy, None, a, mean, rstd, groups, "identity", 0.0, chunk=chunk)
    xhat = (a.view(groups, rows, channels) - want_mean[:, None]) * torch.rsqrt(want_var + 1e-5)[:, None]
    g = dy.view(groups, rows, channels)
    assert_matches("sum dh", sums[:, 0], g.sum(1))
    assert_matches("sum dh xhat", sums[:, 1], (g * xhat).sum(1))
    assert_matches("totals", totals, torch.stack([g.sum((0, 1)), (g * xhat).sum((0, 1))]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5], CASES[15], LARGE], ids=case_id)
def test_the_gpu_tiles(case, dtype, monkeypatch):
    # The GPU's tiles (several row, column and channel tiles, reductions in chunks, split weight gradients),
    # which the interpreter's own large tiles never reach: run here too (a GPU runs them anyway).
    from vaegan_fast.ops._triton_lib import kernels
    monkeypatch.setattr(kernels.conv, "TILES", "gpu")
    compare(case, dtype, norm=True, batch=4)
    compare(case, dtype, norm=False, batch=2)
