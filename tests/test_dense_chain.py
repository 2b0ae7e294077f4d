"""The step's chains (vaegan_fast/ops/dense.py): a network's forward, or one backward stream, in one call.

A backend's own chain must equal the loop over its layer primitives, which is the chains' specification: the
native chain runs the same C++ layer functions, so it must agree bit for bit, for every activation (those that
keep the pre-activation included), layers with and without bias, any block of rows, and every combination of
weight and input gradients. That the layer primitives themselves are right is tests/test_step.py's (the routed
step against the three-grad step) and tests/test_native_ops.py's business.
"""
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from vaegan_fast.ops import _dispatch
from vaegan_fast.ops.dense import BACKWARD_OP, FORWARD_OP, chain_of, dense_chain_impls

pytestmark = pytest.mark.skipif("native" not in _dispatch.available_backends("cpu", "dense_chain_forward"),
                                reason="the native library is not built (pip install --no-build-isolation -e .)")

CPU = torch.device("cpu")


@dataclass
class Layer:
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    activation: str
    negative_slope: float


# (activation, negative slope) per layer, widths: awkward sizes, a kept pre-activation (gelu, slope <= 0),
# a layer without bias, a one-unit output like the discriminator's score.
NETWORKS = [
    ([("leaky_relu", 0.2), ("relu", 0.0), ("identity", 0.0)], [13, 7, 5, 1], [True, True, True]),
    ([("gelu", 0.0), ("leaky_relu", -0.1), ("tanh", 0.0), ("sigmoid", 0.0)], [9, 16, 3, 11, 2],
     [True, False, True, True]),
    ([("identity", 0.0)], [4, 6], [False]),
]


def _network(spec, dtype, seed):
    acts, widths, biases = spec
    g = torch.Generator().manual_seed(seed)
    return [Layer(torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype) if has_b else None,
                  act, slope)
            for (act, slope), k, n, has_b in zip(acts, widths[:-1], widths[1:], biases)]


def _assert_identical(a, b):
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("spec", NETWORKS, ids=["mlp", "keeps-preactivation", "one-layer"])
@pytest.mark.parametrize("rows", [slice(None), slice(0, 5), slice(3, None), slice(2, 9)], ids=str)
@pytest.mark.parametrize("weight_grads,input_grad", [(True, False), (False, True), (True, True)])
def test_native_chain_equals_the_loop_over_its_layers(dtype, spec, rows, weight_grads, input_grad):
    layers = _network(spec, dtype, seed=1)
    x = torch.randn(11, layers[0].weight.shape[1]).to(dtype)
    native = dense_chain_impls("native", CPU, dtype)
    loop = chain_of(_dispatch.implementation(FORWARD_OP, "native"), _dispatch.implementation(BACKWARD_OP, "native"))
    assert native[0] is not loop[0]  # the backend's own chain, not the fallback loop

    y, cache = native[0](layers, x)
    y_ref, cache_ref = loop[0](layers, x)
    _assert_identical(y, y_ref)
    for (inp, saved), (inp_ref, saved_ref) in zip(cache, cache_ref):
        _assert_identical(inp, inp_ref)
        _assert_identical(saved, saved_ref)

    n_rows = len(range(*rows.indices(x.shape[0])))
    dy = torch.randn(n_rows, layers[-1].weight.shape[0]).to(dtype)
    dx, grads = native[1](layers, cache, dy, rows, weight_grads, input_grad)
    dx_ref, grads_ref = loop[1](layers, cache_ref, dy, rows, weight_grads, input_grad)
    _assert_identical(dx, dx_ref)
    assert (grads is None) == (not weight_grads)
    for (dw, db), (dw_ref, db_ref) in zip(grads or [], grads_ref or []):
        _assert_identical(dw, dw_ref)
        _assert_identical(db, db_ref)


def test_a_stream_that_enters_below_the_top_takes_a_prefix_of_the_layers():
    """The feature-reconstruction stream starts at a hidden layer: the chain gets layers[:k] and cache[:k]."""
    layers = _network(NETWORKS[0], torch.float64, seed=2)
    x = torch.randn(8, 13, dtype=torch.float64)
    forward, backward = dense_chain_impls("native", CPU, torch.float64)
    _, cache = forward(layers, x)
    dy = torch.randn(4, layers[1].weight.shape[0], dtype=torch.float64)
    dx, _ = backward(layers[:2], cache[:2], dy, slice(4, None), False, True)
    reference = chain_of(_dispatch.implementation(FORWARD_OP, "reference"),
                         _dispatch.implementation(BACKWARD_OP, "reference"))
    dx_ref, _ = reference[1](layers[:2], cache[:2], dy, slice(4, None), False, True)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)


def test_backends_without_their_own_chain_loop_over_their_layers():
    forward, backward = dense_chain_impls("reference", CPU, torch.float32)
    assert _dispatch.implementation("dense_chain_forward", "reference") is None
    layers = _network(NETWORKS[2], torch.float32, seed=3)
    x = torch.randn(5, 4)
    y, cache = forward(layers, x)
    torch.testing.assert_close(y, torch.addmm(layers[0].bias, x, layers[0].weight.t()) if layers[0].bias is not None
                               else x @ layers[0].weight.t())
    assert cache[0][0] is x


def test_bad_chain_arguments_are_refused_with_the_argument_named():
    ops = torch.ops.vaegan_fast_native
    x, w = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="one entry per layer"):
        ops.dense_chain_forward(x, [w], [None, None], [0], [0.0])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.dense_chain_backward(torch.randn(2, 2), [x], [w], [torch.randn(4, 2)], [0], [0], [0.0], 3, 9, True, False)
