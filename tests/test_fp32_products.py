"""The native backend's two fp32 product paths (vaegan_fast/ops/_native_lib.py, kernels/cpu/products.cpp): "blas"
forms every fp32 GEMM with torch's BLAS, "onednn" the large ones with oneDNN's matmul. The CPU picks one at import;
these tests run the "onednn" path on any CPU with its size threshold at 0, so that every fp32 product of the
awkward shapes goes there: the fused layers (dense, conv and transposed conv on the column path), linear_act,
strided inputs, the bf16 step's upcast products, and whole planned steps, forward and every gradient against fp64
by the project's rule, and the two executors bit for bit.
"""
import os
import subprocess
import sys

import pytest
import torch

import vaegan_fast
import vaegan_fast.ops as ops
from numerics import assert_matches

NATIVE = "native" in ops.available_backends("cpu", "layer_forward")
pytestmark = pytest.mark.skipif(not NATIVE, reason="the native library is not built")
if NATIVE:
    from vaegan_fast.ops import _native_lib
    ONEDNN_PROBLEM = _native_lib._STATE["onednn_problem"]
else:
    ONEDNN_PROBLEM = "the native library is not built"
ONEDNN = not ONEDNN_PROBLEM
needs_onednn = pytest.mark.skipif(not ONEDNN, reason=ONEDNN_PROBLEM)


@pytest.fixture
def every_product_on_onednn():
    with _native_lib.fp32_products("onednn", min_macs=0):
        yield


def test_the_path_is_chosen_from_the_cpu_and_reported():
    info = vaegan_fast.backend_info()
    assert info["fp32_products"] in ("onednn", "blas") and info["fp32_reason"]
    if not os.environ.get(_native_lib.FP32_ENV):
        intel = _native_lib.cpu_vendor() == "GenuineIntel" and torch.backends.mkl.is_available()
        assert info["fp32_products"] == ("blas" if intel or not ONEDNN else "onednn")


def test_without_onednn_the_rule_falls_back_to_blas_and_refuses_a_forced_onednn(monkeypatch):
    monkeypatch.delenv(_native_lib.FP32_ENV, raising=False)
    problem = "oneDNN's matmul refuses fp32 products on this CPU (it said no)"
    assert _native_lib.choose_fp32_products(problem) == ("blas", f"{problem}: torch's BLAS")
    monkeypatch.setenv(_native_lib.FP32_ENV, "onednn")
    with pytest.raises(ImportError, match=r"VAEGAN_FAST_FP32_PRODUCTS=onednn: oneDNN's matmul refuses .* choose blas"):
        _native_lib.choose_fp32_products(problem)
    monkeypatch.setenv(_native_lib.FP32_ENV, "mkl")
    with pytest.raises(ImportError, match="VAEGAN_FAST_FP32_PRODUCTS='mkl': choose one of auto, onednn, blas"):
        _native_lib.choose_fp32_products("")
    with pytest.raises(ValueError, match="fp32 products: choose one of auto, onednn, blas, got 'mkl'"):
        _native_lib.set_fp32_products("mkl")


@pytest.mark.parametrize("mode", ["blas", "onednn"])
def test_the_environment_forces_the_path(mode):
    if mode == "onednn" and not ONEDNN:
        pytest.skip(ONEDNN_PROBLEM)
    code = "import vaegan_fast; i = vaegan_fast.backend_info(); print(i['fp32_products'], '|', i['fp32_reason'])"
    env = dict(os.environ, VAEGAN_FAST_FP32_PRODUCTS=mode)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=300).stdout.strip()
    assert out == f"{mode} | VAEGAN_FAST_FP32_PRODUCTS={mode}"


def test_a_refused_setting_leaves_the_native_backend_unavailable_with_the_reason():
    code = "import vaegan_fast; i = vaegan_fast.backend_info(); print(i['isa'], '|', i['native_error'])"
    env = dict(os.environ, VAEGAN_FAST_FP32_PRODUCTS="mkl")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=300).stdout.strip()
    assert out == "None | VAEGAN_FAST_FP32_PRODUCTS='mkl': choose one of auto, onednn, blas"


def test_where_onednn_may_not_use_avx512_both_rules_keep_off_it_and_a_step_trains():
    # torch's mkldnn_matmul refuses even fp32 where oneDNN may not use AVX-512 (an AVX2-only CPU): the cap stands in
    code = ("import torch, vaegan_fast; i = vaegan_fast.backend_info(); print(i['fp32_products'], '|', i['fp32_reason']);"
            "print(i['bf16_products'], '|', i['bf16_reason']); m = vaegan_fast.Model.preset('seed', precision='bf16');"
            "s = m.train_step(torch.rand(8, *m.input_shape)); print(all(torch.isfinite(v) for v in s.values()))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAEGAN_FAST_") and k != "DNNL_MAX_CPU_ISA"}
    env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    fp32, bf16, trained = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                         check=True, timeout=300).stdout.strip().splitlines()
    assert fp32.startswith("blas | ") and fp32.endswith(": torch's BLAS"), fp32
    if _native_lib.cpu_vendor() != "GenuineIntel" and ONEDNN:  # where the rule would otherwise have picked oneDNN
        assert "oneDNN's matmul refuses fp32 products on this CPU (" in fp32, fp32
    assert bf16.startswith("fp32 | ") and trained == "True", (bf16, trained)


def _calls_mm(fn) -> bool:
    """Whether fn's product went to torch's BLAS (aten::mm) rather than oneDNN (the native ops' own event)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    keys = {e.key for e in prof.key_averages()}
    assert ("products::onednn_matmul" in keys) != bool(keys & {"aten::mm", "aten::addmm"}), keys
    return "products::onednn_matmul" not in keys


@needs_onednn
def test_only_products_over_the_threshold_go_to_onednn():
    large = torch.randn(300, 700), torch.randn(100, 700)  # 21e6 multiply-adds: over 2^24
    small = torch.randn(30, 70), torch.randn(10, 70)
    run = lambda x, w: lambda: ops.linear_act(x, w, None, "relu", backend="native")  # noqa: E731
    with _native_lib.fp32_products("onednn"):
        assert not _calls_mm(run(*large)) and _calls_mm(run(*small))
        assert _native_lib.get_fp32_products() == "onednn"
        assert vaegan_fast.backend_info()["fp32_products"] == "onednn"
        with _native_lib.fp32_products("blas"):
            assert _calls_mm(run(*large))
        assert not _calls_mm(run(*large))  # restored, threshold included
        with _native_lib.fp32_products("onednn", min_macs=0):
            assert not _calls_mm(run(*small))
    x, w = large
    truth = torch.relu(x.double() @ w.double().t())
    for mode in ("blas", "onednn"):
        with _native_lib.fp32_products(mode):
            assert_matches(f"linear_act on {mode}", ops.linear_act(x, w, None, "relu", backend="native"), truth)


# ------------------------------------------------------------------------------------------------ the layers
if NATIVE:
    from test_layer import LAYERS, compare, layer_id
    from test_native_ops import ACTS, LINEAR_SHAPES, _linear, _linear_inputs, act_id, check, shape_id
else:  # pragma: no cover
    LAYERS, LINEAR_SHAPES, ACTS = [], [], []
    layer_id = act_id = shape_id = str


@needs_onednn
@pytest.mark.parametrize("norm", [None, "batch"], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("case", LAYERS, ids=layer_id)
def test_every_layer_meets_the_fp32_rule_on_onednn(case, norm, every_product_on_onednn):
    compare(case, norm, "native", torch.float32)


@needs_onednn
@pytest.mark.parametrize("case", LAYERS, ids=layer_id)
def test_the_bf16_layers_upcast_products_on_onednn(case, every_product_on_onednn):
    with _native_lib.bf16_products("fp32"):  # operands upcast: the products are fp32 ones
        compare(case, "batch", "native", torch.bfloat16)


@needs_onednn
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("case", [LAYERS[1], LAYERS[5], LAYERS[14]], ids=layer_id)
def test_strided_layer_inputs_on_onednn(case, layout, every_product_on_onednn):
    compare(case, "batch", "native", torch.float32, layout=layout)
    compare(case, None, "native", torch.float32, layout=layout, bias=False)


@needs_onednn
@pytest.mark.parametrize("act", [ACTS[0], ACTS[3], ACTS[6]] if ACTS else [], ids=act_id)
@pytest.mark.parametrize("mkn", LINEAR_SHAPES, ids=shape_id)
def test_linear_act_on_onednn(mkn, act, every_product_on_onednn):
    x, w, b = _linear_inputs(*mkn, torch.float32)
    check(_linear(*act), [x, w, b], ["x", "weight", "bias"])
    xs = torch.cat([x, x], 1)[:, ::2]  # strided
    check(_linear(*act), [xs, w.t().contiguous().t(), b], ["x", "weight", "bias"])


# -------------------------------------------------------------------------------------------- whole steps
if NATIVE:
    from test_plan_step import ARCHS, assert_same_step, batch_for, both_executors
else:  # pragma: no cover
    ARCHS = {}


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_executors_agree_bit_for_bit_on_onednn(arch, dtype, every_product_on_onednn):
    with _native_lib.bf16_products("fp32"):
        model = ARCHS[arch]("native", gamma=0.3, pixel_weight=0.7)
        assert_same_step(*both_executors(model, batch_for(model, 5, torch.float32), dtype))


@needs_onednn
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "custom"])  # custom: a bias before a batch norm, whose
def test_a_step_on_onednn_meets_the_fp32_rule(arch, every_product_on_onednn):  # gradient is 0 plus rounding
    model = ARCHS[arch]("native", gamma=0.3, pixel_weight=0.7)
    x = batch_for(model, 5, torch.float32)
    (got, losses), _, _, _ = both_executors(model, x, torch.float32)
    (want, want_losses), _, _, _ = both_executors(model, x, torch.float64)
    for net in got:
        for i, (a, t) in enumerate(zip(got[net], want[net])):
            assert_matches(f"{arch} {net} gradient {i}", a, t)
    for key in losses:
        assert_matches(f"{arch} {key}", losses[key], want_losses[key])
