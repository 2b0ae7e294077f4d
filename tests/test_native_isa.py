"""The native library's CPU dispatch: one build per ISA (generic, AVX2, AVX-512), chosen at import like ATen's own
kernels, VAEGAN_FAST_ARCH to override it, and the bf16 product path (VAEGAN_FAST_BF16_PRODUCTS).

Each ISA this CPU can execute runs tests/isa_calls.py (linear_act, reparam_kl, the losses, the fused layer
forward and backward, a planned step) in its own process, once per bf16 product path; every result must meet
the project's rule against fp64 (fp32: 2e-5 of the reference's magnitude; bf16: twice eager's error plus a
floor), and the fp32 results of different ISAs must agree with each other within the fp32 rule.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vaegan_fast
import vaegan_fast.ops as ops
from numerics import assert_matches

NATIVE = "native" in ops.available_backends("cpu", "layer_forward")
pytestmark = pytest.mark.skipif(not NATIVE, reason="the native library is not built")
if NATIVE:
    from vaegan_fast.ops import _native_lib

    BUILT = [isa for isa in _native_lib.cpu_isas() if os.path.exists(_native_lib.library_path(isa))]
else:
    BUILT = []
HERE = Path(__file__).resolve().parent


def run_calls(tmp_path, isa, products):
    out = tmp_path / f"{isa}-{products}.pt"
    env = dict(os.environ, VAEGAN_FAST_ARCH=isa, VAEGAN_FAST_BF16_PRODUCTS=products, OMP_NUM_THREADS="2")
    env.pop("ATEN_CPU_CAPABILITY", None)
    subprocess.run([sys.executable, str(HERE / "isa_calls.py"), str(out)], env=env, check=True, cwd=HERE,
                   timeout=600)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def isa_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isa")
    return {(isa, p): run_calls(tmp, isa, p) for isa in BUILT for p in ("fp32", "bf16")}


def test_the_library_of_the_cpus_isa_is_loaded():
    info = vaegan_fast.backend_info()
    assert info["isa"] in _native_lib.ISAS and info["library"].endswith(f"_{info['isa']}.so")
    forced = os.environ.get("VAEGAN_FAST_ARCH")
    want = forced or {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "generic")
    if want in BUILT:
        assert info["isa"] == want
    assert info["bf16_products"] in ("bf16", "fp32") and info["bf16_reason"]
    if not os.environ.get("VAEGAN_FAST_BF16_PRODUCTS"):
        capped = _native_lib.onednn_isa_cap()[1] in _native_lib.ONEDNN_ISAS_WITHOUT_BF16
        assert (info["bf16_products"] == "bf16") == (_native_lib.cpu_has_bf16_units() and not capped)


@pytest.mark.parametrize("isa", BUILT)
@pytest.mark.parametrize("products", ["fp32", "bf16"])
def test_each_isa_meets_the_rule_on_both_product_paths(isa_results, isa, products):
    res = isa_results[(isa, products)]
    assert res["info"]["isa"] == isa and res["info"]["bf16_products"] == products
    assert res["info"]["bf16_reason"] == f"VAEGAN_FAST_BF16_PRODUCTS={products}"
    for (name, dtype), r in res["calls"].items():
        assert len(r["native"]) == len(r["truth"]) == len(r["eager"]), name
        for i, (a, t, e) in enumerate(zip(r["native"], r["truth"], r["eager"])):
            assert_matches(f"{isa}/{products} {name} {dtype} result {i}", a, t, e)


@pytest.mark.skipif(len(BUILT) < 2, reason="this CPU executes one ISA only")
def test_the_isas_agree_with_each_other_in_fp32(isa_results):
    base = isa_results[(BUILT[0], "fp32")]["calls"]
    for isa in BUILT[1:]:
        for products in ("fp32", "bf16"):
            other = isa_results[(isa, products)]["calls"]
            for key, r in base.items():
                if key[1] != str(torch.float32):
                    continue
                for i, (a, b) in enumerate(zip(r["native"], other[key]["native"])):
                    assert_matches(f"{isa}/{products} against {BUILT[0]}: {key[0]} result {i}", a, b.double())


def test_the_bf16_products_path_can_be_switched():
    before = _native_lib.get_bf16_products()
    x, w = torch.randn(64, 96).bfloat16(), torch.randn(48, 96).bfloat16()
    outs = {}
    for path in ("fp32", "bf16"):
        with _native_lib.bf16_products(path):
            assert vaegan_fast.backend_info()["bf16_products"] == path
            outs[path] = ops.linear_act(x, w, None, "identity", backend="native")
        assert _native_lib.get_bf16_products() == before
    truth = x.double() @ w.double().t()
    for path, y in outs.items():
        assert_matches(f"linear_act on the {path} path", y, truth, x @ w.t())
    with pytest.raises(ValueError, match="bf16, fp32"):
        _native_lib.set_bf16_products("fp16")


def test_an_isa_the_cpu_cannot_execute_is_refused(monkeypatch):
    monkeypatch.setattr(_native_lib, "_cpu_has", lambda isa: False)
    monkeypatch.setenv("VAEGAN_FAST_ARCH", "avx512")
    with pytest.raises(ImportError, match="cannot execute avx512"):
        _native_lib.choose_isa()
    monkeypatch.setenv("VAEGAN_FAST_ARCH", "sse9")
    with pytest.raises(ImportError, match="choose one of generic, avx2, avx512"):
        _native_lib.choose_isa()
    monkeypatch.delenv("VAEGAN_FAST_ARCH")
    assert _native_lib.choose_isa()[0] == "generic"  # a CPU with neither gets the generic build


@pytest.mark.parametrize("amx", [False, True])
def test_a_cap_on_onednns_isa_below_bf16_keeps_the_fp32_products(monkeypatch, amx):
    monkeypatch.setattr(_native_lib, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    for env in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "VAEGAN_FAST_BF16_PRODUCTS"):
        monkeypatch.delenv(env, raising=False)
    units = "AMX" if amx else "avx512_bf16"
    assert _native_lib.choose_bf16_products() == ("bf16", f"the CPU has bf16 units ({units}): oneDNN bf16 products")
    for env, cap, path, named in [("ONEDNN_MAX_CPU_ISA", "avx2", "fp32", "AVX2"),
                                  ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI", "fp32", "AVX512_CORE_VNNI"),
                                  ("DNNL_MAX_CPU_ISA", "Avx512_Core", "fp32", "AVX512_CORE"),
                                  ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", "bf16", "avx512_bf16"),
                                  ("ONEDNN_MAX_CPU_ISA", "AVX10_1_512_AMX", "bf16", units),
                                  ("ONEDNN_MAX_CPU_ISA", "ALL", "bf16", units)]:
        monkeypatch.setenv(env, cap)
        got, why = _native_lib.choose_bf16_products()
        assert got == path and named in why, (env, cap, why)
        if path == "fp32":
            assert why.startswith(f"{env}={named} ")
        monkeypatch.delenv(env)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")  # oneDNN reads ONEDNN_MAX_CPU_ISA first
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert _native_lib.choose_bf16_products()[0] == "bf16"
    monkeypatch.setenv("VAEGAN_FAST_BF16_PRODUCTS", "bf16")  # forcing still wins over the cap
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert _native_lib.choose_bf16_products() == ("bf16", "VAEGAN_FAST_BF16_PRODUCTS=bf16")


def test_an_unknown_bf16_products_setting_is_refused(monkeypatch):
    monkeypatch.setenv("VAEGAN_FAST_BF16_PRODUCTS", "fast")
    with pytest.raises(ImportError, match="VAEGAN_FAST_BF16_PRODUCTS"):
        _native_lib.choose_bf16_products()


def test_a_refused_isa_leaves_the_native_backend_unavailable_with_the_reason(tmp_path):
    code = ("import vaegan_fast, vaegan_fast.ops as ops; i = vaegan_fast.backend_info(); "
            "print(i['isa'], '|', i['native_error'], '|', 'native' in ops.available_backends('cpu'))")
    env = dict(os.environ, VAEGAN_FAST_ARCH="sse9")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("None |") and "VAEGAN_FAST_ARCH='sse9'" in out and out.strip().endswith("False")
