"""The fused layer (product + bias + batch norm + activation) on every backend that runs on CPU tensors against fp64.

Two forms: the fused modules (FusedConv2d, FusedConvTranspose2d, FusedLinear with a norm) through their
backend's differentiable op, forward and every gradient against the plain-PyTorch reference in fp64, running
averages included; and the training step's primitives (layer_forward / layer_backward), against the
differentiable reference on the same inputs, with several norm groups, backward passes over one group's rows,
and a stream entering at the pre-norm point. Shapes: the presets' layers, 1x1 images, odd sizes, channel counts
that are not multiples of the vector width, every stride/padding/output padding the presets use.
"""
import copy

import pytest
import torch

import vaegan_fast.ops as ops
from numerics import assert_matches
from vaegan_fast.nn import FusedConv2d, FusedConvTranspose2d, FusedLinear
from vaegan_fast.ops.layer import LayerParams, layer_impls

# "triton" here: its kernels under the interpreter (TRITON_INTERPRET=1, set by conftest without a GPU); on a GPU
# machine tests/test_triton_conv.py runs them on the device.
BACKENDS = [b for b in ("reference", "native", "triton") if b in ops.available_backends("cpu", "layer_forward")]
ACTS = [("identity", 0.2), ("relu", 0.2), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("tanh", 0.2),
        ("sigmoid", 0.2), ("gelu", 0.2)]
# (kind, in, out, kernel, stride, padding, output padding, per-sample input shape)
LAYERS = [
    ("conv2d", 1, 32, 4, 2, 1, 0, (1, 28, 28)), ("conv2d", 32, 64, 4, 2, 1, 0, (32, 14, 14)),
    ("conv_transpose2d", 64, 32, 4, 2, 1, 0, (64, 7, 7)), ("conv_transpose2d", 32, 1, 4, 2, 1, 0, (32, 14, 14)),
    ("conv2d", 3, 17, 5, 2, 2, 0, (3, 9, 11)), ("conv_transpose2d", 17, 5, 5, 2, 2, 1, (17, 4, 3)),
    ("conv2d", 5, 3, 5, 1, 2, 0, (5, 7, 5)), ("conv2d", 3, 5, 1, 1, 0, 0, (3, 1, 1)), ("conv2d", 2, 3, 3, 1, 1, 0, (2, 1, 1)),
    ("conv_transpose2d", 3, 2, 3, 1, 1, 0, (3, 1, 1)), ("conv_transpose2d", 4, 3, 3, 2, 0, 1, (4, 3, 2)),
    ("conv2d", 4, 6, 3, 3, 0, 0, (4, 10, 7)),
    ("dense", 7, 1, 0, 0, 0, 0, (7,)), ("dense", 1, 17, 0, 0, 0, 0, (1,)), ("dense", 33, 20, 0, 0, 0, 0, (33,)),
]
layer_id = lambda c: f"{c[0]}-{c[1]}to{c[2]}-k{c[3]}s{c[4]}p{c[5]}o{c[6]}-{'x'.join(map(str, c[7]))}"  # noqa: E731


def make_layer(case, norm, activation="leaky_relu", slope=0.2, bias=True, backend="reference"):
    kind, cin, cout, k, s, p, op, _ = case
    kw = dict(bias=bias, norm=norm, activation=activation, negative_slope=slope, backend=backend)
    if kind == "conv2d":
        layer = FusedConv2d(cin, cout, k, s, p, **kw)
    elif kind == "conv_transpose2d":
        layer = FusedConvTranspose2d(cin, cout, k, s, p, op, **kw)
    else:
        layer = FusedLinear(cin, cout, **kw)
    with torch.no_grad():
        if layer.norm is not None:  # away from the defaults, so that every term shows
            layer.norm.weight.uniform_(0.5, 1.5)
            layer.norm.bias.normal_()
            layer.norm.running_mean.normal_()
            layer.norm.running_var.uniform_(0.5, 2.0)
    return layer


def run_module(layer, x, grad, training=True):
    """(y, [dx, dW, db, dgamma, dbeta], norm state) of a fused module, its running averages updated."""
    layer.train(training)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    params = [x, layer.weight] + ([layer.bias] if layer.bias is not None else []) + \
        ([layer.norm.weight, layer.norm.bias] if layer.norm is not None else [])
    grads = torch.autograd.grad(y, params, grad)
    state = None if layer.norm is None else (layer.norm.running_mean, layer.norm.running_var)
    return y.detach(), list(grads), state


def compare(case, norm, backend, dtype, training=True, activation="leaky_relu", slope=0.2, bias=None,
            layout="contiguous", batch=5):
    # A bias before a batch norm in training mode has a gradient of exactly zero analytically, all rounding
    # (test_a_bias_before_a_norm_gets_no_gradient): by default the norm's layers have none, as the presets.
    bias = (norm is None or not training) if bias is None else bias
    layer = make_layer(case, norm, activation, slope, bias)
    x = torch.randn(batch, *case[7])
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.cat([x, x], 0)[::2]
    truth = copy.deepcopy(layer).double()
    with torch.no_grad():
        grad = torch.randn(copy.deepcopy(truth).train(training)(x.double()).shape, dtype=torch.float64)
    want = run_module(truth, x.double(), grad, training)
    got_layer = copy.deepcopy(layer).to(dtype)
    got_layer.backend = backend
    got = run_module(got_layer, x.to(dtype), grad.to(dtype), training)
    eager = (None, [None] * len(got[1]), None)
    if dtype != torch.float32:
        eager = run_module(copy.deepcopy(layer).to(dtype), x.to(dtype), grad.to(dtype), training)
    assert got[0].dtype == dtype
    assert_matches("y", got[0], want[0], eager[0])
    names = ["dx", "dW"] + (["db"] if bias else []) + (["dgamma", "dbeta"] if norm else [])
    for name, a, t, e in zip(names, got[1], want[1], eager[1]):
        assert_matches(name, a, t, e)
    if norm is not None and dtype == torch.float32:  # the running averages, as nn.BatchNorm updates them
        for name, a, t in zip(("running_mean", "running_var"), got[2], want[2]):
            assert_matches(name, a, t)
        assert int(got_layer.norm.num_batches_tracked) == int(training)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", [None, "batch"], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("case", LAYERS, ids=layer_id)
def test_layers_match_fp64(backend, dtype, norm, case, bf16_products):
    compare(case, norm, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,slope", ACTS, ids=[f"{a}{s}" for a, s in ACTS])
@pytest.mark.parametrize("norm", [None, "batch"], ids=["plain", "batchnorm"])
def test_every_activation(backend, activation, slope, norm, bf16_products):
    for case in (LAYERS[4], LAYERS[5], LAYERS[14]):
        compare(case, norm, backend, torch.float32, activation=activation, slope=slope)
    compare(LAYERS[4], norm, backend, torch.bfloat16, activation=activation, slope=slope)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [LAYERS[0], LAYERS[5], LAYERS[8], LAYERS[14]], ids=layer_id)
def test_eval_mode_uses_the_running_averages(backend, case, bf16_products):
    compare(case, "batch", backend, torch.float32, training=False)
    compare(case, "batch", backend, torch.bfloat16, training=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("case", [LAYERS[1], LAYERS[5], LAYERS[14]], ids=layer_id)
def test_strided_inputs(backend, layout, case):
    compare(case, "batch", backend, torch.float32, layout=layout)
    compare(case, None, backend, torch.float32, layout=layout, bias=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bias_before_a_norm_gets_no_gradient(backend):
    layer = make_layer(LAYERS[4], "batch", backend=backend)
    x = torch.randn(5, *LAYERS[4][7])
    y, (dx, dw, db, dgamma, dbeta), _ = run_module(layer, x, torch.randn(layer(x).shape))
    assert db.abs().max() <= 1e-5 * dbeta.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_sample_without_a_norm_and_one_pixel_images(backend):
    compare(LAYERS[7], None, backend, torch.float32, batch=1)
    compare(LAYERS[8], "batch", backend, torch.float32, batch=3)  # (2 rows: a norm's output is +-1 whatever x)


@pytest.mark.skipif("native" not in BACKENDS, reason="the native library is not built")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
# A transposed conv on oneDNN, both column-path kinds (few input channels, few output channels), a dense layer.
@pytest.mark.parametrize("case", [LAYERS[5], LAYERS[11], LAYERS[10], LAYERS[12]], ids=layer_id)
def test_native_gradcheck_in_fp64(case, training):
    layer = make_layer(case, "batch", "tanh", backend="native").double().train(training)
    x = torch.randn(4, *case[7], dtype=torch.float64, requires_grad=True)
    params = [layer.weight, layer.bias, layer.norm.weight, layer.norm.bias]
    state = [t.clone() for t in (layer.norm.running_mean, layer.norm.running_var)]

    def f(x, *ps):
        # The running averages move with every call in training mode; the output never reads them then.
        layer.norm.running_mean.copy_(state[0])
        layer.norm.running_var.copy_(state[1])
        return layer(x)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ step primitives
def primitive_run(backend, spec, p, x, groups, rows, dy, entry_pre_norm):
    _, forward, backward = layer_impls(backend, x.device, x.dtype)
    y, cache = forward(spec, p, x, groups, True)
    r0, r1 = rows
    return y, cache, backward(spec, p, cache, dy, r0, r1, (r0, r1), groups, entry_pre_norm, True, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", [LAYERS[1], LAYERS[5], LAYERS[11], LAYERS[14]], ids=layer_id)
def test_step_primitives_equal_the_differentiable_layer_per_group(backend, dtype, case):
    """layer_forward over two groups normalises each over its own rows (as two calls of the layer would);
    layer_backward over the second group's rows gives that call's gradients."""
    layer = make_layer(case, "batch", "gelu", bias=False).to(dtype)
    groups, size = 2, 3
    x = torch.randn(groups * size, *case[7], dtype=dtype)
    spec = layer.spec_for(x) if not hasattr(layer, "spec") else layer.spec
    prim = copy.deepcopy(layer)
    p = LayerParams.of(prim, dtype)
    calls = [copy.deepcopy(layer).double() for _ in range(groups)]
    outs = []
    for g, module in enumerate(calls):  # the reference: one call per group, in row order
        if g > 0:
            module.norm.load_state_dict(calls[g - 1].norm.state_dict())
        outs.append(run_module(module, x[g * size:(g + 1) * size].double(),
                               torch.randn((size, *spec.out_shape), dtype=torch.float64)))
    dy = torch.randn((size, *spec.out_shape), dtype=torch.float64)
    ref2 = copy.deepcopy(layer).double()
    ref2.norm.load_state_dict(calls[0].norm.state_dict())
    want = run_module(ref2, x[size:].double(), dy)
    y, cache, (dx, dw, db, dgamma, dbeta) = primitive_run(backend, spec, p, x, groups, (size, 2 * size),
                                                          dy.to(dtype), False)
    assert_matches("y group 1", y[size:], want[0])
    assert_matches("y group 0", y[:size], outs[0][0])
    assert db is None
    for name, a, t in zip(("dx", "dW", "dgamma", "dbeta"), (dx, dw, dgamma, dbeta), want[1]):
        assert_matches(name, a, t)
    assert_matches("running_mean", prim.norm.running_mean, calls[1].norm.running_mean)
    assert_matches("running_var", prim.norm.running_var, calls[1].norm.running_var)
    assert int(prim.norm.num_batches_tracked) == groups


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [LAYERS[1], LAYERS[14]], ids=layer_id)
def test_a_stream_entering_before_the_norm_differentiates_the_product_alone(backend, case):
    layer = make_layer(case, "batch").double()
    x = torch.randn(4, *case[7], dtype=torch.float64)
    spec = layer.spec_for(x) if not hasattr(layer, "spec") else layer.spec
    p = LayerParams.of(layer, torch.float64)
    da = torch.randn((4, *spec.out_shape), dtype=torch.float64)
    _, _, (dx, dw, db, dgamma, dbeta) = primitive_run(backend, spec, p, x, 1, (0, 4), da, True)
    xr = x.clone().requires_grad_(True)
    from vaegan_fast.ops import layer as layer_ops
    a = layer_ops.product_reference(spec, xr, layer.weight, layer.bias)
    want = torch.autograd.grad(a, [xr, layer.weight, layer.bias], da)
    for name, got, t in zip(("dx", "dW", "db"), (dx, dw, db), want):
        assert_matches(name, got, t)
    assert dgamma is None and dbeta is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [LAYERS[1], LAYERS[5], LAYERS[0], LAYERS[3]], ids=layer_id)
def test_the_input_gradient_on_fewer_rows_than_the_norm_runs_on(backend, case):
    """A stream through a norm runs the norm's backward on whole groups and forms the input gradient only on
    the rows the layer below needs: those rows equal the full computation's."""
    layer = make_layer(case, "batch", bias=False).double()
    x = torch.randn(6, *case[7], dtype=torch.float64)
    spec = layer.spec_for(x)
    p = LayerParams.of(layer, torch.float64)
    _, forward, backward = layer_impls(backend, x.device, x.dtype)
    _, cache = forward(spec, p, x, 1, True)
    dy = torch.randn((6, *spec.out_shape), dtype=torch.float64)
    full = backward(spec, p, cache, dy, 0, 6, (0, 6), 1, False, True, True)
    part = backward(spec, p, cache, dy, 0, 6, (2, 5), 1, False, True, True)
    assert_matches("dx rows 2..5", part[0], full[0][2:5])
    for name, a, b in zip(("dW", "dgamma", "dbeta"), (part[1], part[3], part[4]), (full[1], full[3], full[4])):
        assert_matches(name, a, b)
