"""The native CPU backend (kernels/cpu/*.cpp) against the reference: every op, forward and every gradient.

Tolerances are tests/numerics.py's: fp32 against an fp64 reference; bf16 within twice eager PyTorch's own
bf16 error; fp64 through gradcheck. Every op also runs with 1 and 2 threads (results must be identical:
fixed chunking, ordered combine) and through torch.library.opcheck.
"""
import pytest
import torch

import vaegan_fast.ops as ops
from backend_ops import SHAPES, disc, gen, recon, reparam, shape_id
from numerics import assert_matches
from vaegan_fast.ops import _dispatch

pytestmark = pytest.mark.skipif("native" not in ops.available_backends("cpu", "reparam_kl"),
                                reason="the native library is not built (pip install --no-build-isolation -e .)")

if "native" in ops.available_backends("cpu", "reparam_kl"):
    from vaegan_fast.ops import _native_lib
    from vaegan_fast.ops.layer import native as layer_native

    NATIVE = torch.ops.vaegan_fast_native

DTYPES = [torch.float32, torch.bfloat16]


# ------------------------------------------------------------------------------------------------ helpers
def run(fn, inputs, grad_outputs=None):
    """Outputs of fn(*inputs) and the gradients of every floating tensor input."""
    inputs = [x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) else x for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if grad_outputs is None:
        grad_outputs = [torch.randn(o.shape) for o in outs]
    wrt = [x for x in inputs if isinstance(x, torch.Tensor)]
    grads = torch.autograd.grad(outs, wrt, [g.to(o.dtype) for g, o in zip(grad_outputs, outs)],
                                allow_unused=True, materialize_grads=True)
    return [o.detach() for o in outs], list(grads)


def check(make, inputs, names):
    """make(backend) -> fn; compare "native" to the fp64 reference (and the eager one for bf16)."""
    outs0 = make("reference")(*[x.detach() for x in inputs])
    outs0 = outs0 if isinstance(outs0, tuple) else (outs0,)
    gouts = [torch.randn(o.shape) for o in outs0]  # non-unit incoming gradients
    outs, grads = run(make("native"), inputs, gouts)
    truth_outs, truth_grads = run(make("reference"), [x.detach().double() for x in inputs], gouts)
    eager_outs, eager_grads = run(make("reference"), inputs, gouts)
    for i, (a, t, e) in enumerate(zip(outs, truth_outs, eager_outs)):
        assert a.dtype == inputs[0].dtype
        assert_matches(f"output {i}", a, t, e)
    for name, a, t, e in zip(names, grads, truth_grads, eager_grads):
        assert a.dtype == inputs[0].dtype and a.shape == t.shape
        assert_matches(f"d {name}", a, t, e)


def strided(shape, dtype, kind):
    if kind == "slice":
        return torch.randn(shape[0], 2 * shape[1]).to(dtype)[:, ::2]
    if kind == "transpose":
        return torch.randn(shape[1], shape[0]).to(dtype).t()
    return torch.randn(shape).to(dtype)


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _linear(activation, slope=0.2):
    return lambda backend: (lambda x, w, b: ops.linear_act(x, w, b, activation, negative_slope=slope,
                                                           backend=backend))


# ------------------------------------------------------------------------------------------------ reparam_kl
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_reparam_kl(shape, dtype):
    mu = torch.randn(shape).to(dtype)
    lv = (2 * torch.randn(shape)).to(dtype)
    eps = torch.randn(shape).to(dtype)
    check(reparam, [mu, lv, eps], ["mu", "logvar", "eps"])


@pytest.mark.parametrize("which", ["z", "kl"])
def test_reparam_kl_one_output_used(which):
    mu, lv, eps = (torch.randn(37, 11, requires_grad=True) for _ in range(3))
    for backend in ("native", "reference"):
        z, kl = ops.reparam_kl(mu, lv, eps, backend=backend)
        grads = torch.autograd.grad((z if which == "z" else kl).square().sum(), [mu, lv], allow_unused=True)
        if backend == "native":
            got = grads
        else:
            for name, g, w in zip(("mu", "logvar"), got, grads):
                assert_matches(f"d {name}", g, w.double())


# ------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gan_losses(shape, dtype):
    real = (8 * torch.randn(shape)).to(dtype)  # +-30: both tails of the stable softplus
    fake = (8 * torch.randn(shape)).to(dtype)
    fake2 = torch.randn(shape[0]).to(dtype)  # another size and rank
    check(disc, [real, fake, fake2], ["real", "fake", "fake2"])
    check(lambda b: gen(b, False), [fake, fake2], ["fake", "fake2"])
    check(lambda b: gen(b, True), [fake], ["fake"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(7, 3, 5, 2)], ids=shape_id)
def test_feature_recon_loss(shape, dtype):
    a, b = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    check(recon, [a, b], ["features_real", "features_fake"])


def test_losses_under_no_grad_compute_only_the_loss():
    x = torch.randn(100, 3)
    with torch.no_grad():
        loss = ops.discriminator_loss(x, x, backend="native")
        assert torch.allclose(loss, ops.discriminator_loss(x, x, backend="reference"), rtol=1e-6)
    out = NATIVE.softplus_losses([x], [1.0], [1.0], False)
    assert out[1].numel() == 0
    assert NATIVE.feature_recon_loss(x, x + 1).item() == pytest.approx(1.5)  # the loss alone: no gradient pass
    loss, grad = NATIVE.feature_recon_terms(x, x + 1)  # the step's primitive: the loss and its gradient
    assert loss.item() == pytest.approx(1.5)
    torch.testing.assert_close(grad, torch.full_like(x, -1 / 100))


def test_only_some_inputs_need_grad():
    real, fake = torch.randn(20, 1), torch.randn(20, 1, requires_grad=True)
    (g,) = torch.autograd.grad(ops.discriminator_loss(real, fake, backend="native"), [fake])
    fd = fake.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(ops.discriminator_loss(real.double(), fd, backend="reference"), [fd])
    assert_matches("d fake", g, want)
    a, b = torch.randn(5, 6), torch.randn(5, 6, requires_grad=True)
    (gb,) = torch.autograd.grad(ops.feature_recon_loss(a, b, backend="native"), [b])
    assert_matches("d b", gb, ((b.detach() - a) / 5).double())


def test_feature_recon_keeps_only_its_inputs_for_backward():
    """The backward forms the gradient again from the features: autograd keeps a and b (which it holds
    anyway for the layers below) and no gradient-sized tensor of the loss's own."""
    a, b = torch.randn(37, 11, requires_grad=True), torch.randn(37, 11, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        loss = ops.feature_recon_loss(a, b, backend="native")
    assert len(packed) == 2 and all(p is a or p is b for p in packed)
    ga, gb = torch.autograd.grad(loss, [a, b], torch.tensor(0.5))
    assert_matches("d a", ga, 0.5 * (a - b).detach().double() / 37)
    assert torch.equal(gb, -ga)


# ------------------------------------------------------------------------------------------------ linear_act
LINEAR_SHAPES = [(1, 1, 1), (1, 37, 5), (41, 1, 3), (3, 5, 7), (257, 129, 65), (1000, 784, 128)]
ACTS = [("identity", 0.2), ("relu", 0.2), ("leaky_relu", 0.2), ("leaky_relu", -0.5), ("tanh", 0.2),
        ("sigmoid", 0.2), ("gelu", 0.2)]
act_id = lambda a: f"{a[0]}{a[1]}" if a[0] == "leaky_relu" else a[0]  # noqa: E731


def _linear_inputs(M, K, N, dtype, bias=True):
    x = torch.randn(M, K).to(dtype)
    w = (torch.randn(N, K) / K ** 0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=act_id)
@pytest.mark.parametrize("mkn", LINEAR_SHAPES, ids=shape_id)
def test_linear_act(mkn, act, dtype, bf16_products):
    if mkn[0] * mkn[1] > 10_000 and act[0] not in ("relu", "gelu", "leaky_relu"):
        pytest.skip("large shapes: relu, leaky_relu and gelu only (keeps the suite fast)")
    x, w, b = _linear_inputs(*mkn, dtype)
    check(_linear(*act), [x, w, b], ["x", "weight", "bias"])


@pytest.mark.parametrize("act", ["identity", "relu", "gelu"])
def test_linear_act_without_bias_and_3d_input(act):
    x, w, _ = _linear_inputs(12, 9, 5, torch.float32, bias=False)
    make = lambda backend: (lambda x, w: ops.linear_act(x.reshape(3, 4, 9), w, None, act, backend=backend))  # noqa
    check(make, [x, w], ["x", "weight"])


def test_linear_act_only_weight_needs_grad():
    x, w, b = _linear_inputs(30, 8, 6, torch.float32)
    w.requires_grad_(True)
    for backend in ("native", "reference"):
        (g,) = torch.autograd.grad(ops.linear_act(x, w, b, "tanh", backend=backend).sum(), [w])
        if backend == "native":
            got = g
    assert_matches("d weight", got, g.double())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("wrt", ["x", "weight"])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_linear_act_one_input_gradient(act, wrt, bias, dtype, bf16_products):
    """One product in backward (only x's or only weight's gradient), no bias gradient: on bf16's fp32 product
    path the identity's fp32 copy of grad_y then comes from the derivative pass without a bias sum."""
    x, w, b = _linear_inputs(37, 29, 11, dtype, bias=bias)
    g = torch.randn(37, 11)

    def grad(backend, as_dtype):
        xs = [t if t is None else t.detach().to(as_dtype) for t in (x, w, b)]
        target = xs[0 if wrt == "x" else 1].requires_grad_(True)
        y = ops.linear_act(xs[0], xs[1], xs[2], act, backend=backend)
        return torch.autograd.grad(y, [target], g.to(y.dtype))[0]

    got = grad("native", dtype)
    assert got.dtype == dtype
    assert_matches(f"d {wrt}", got, grad("reference", torch.float64), grad("reference", dtype))


# ------------------------------------------------------------------------------------------------ strided
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(dtype, bf16_products):
    shape = (53, 29)
    check(reparam, [strided(shape, dtype, "transpose"), strided(shape, dtype, "slice"),
                     strided(shape, dtype, "transpose")], ["mu", "logvar", "eps"])
    real, fake = strided(shape, dtype, "transpose"), strided(shape, dtype, "slice")
    check(disc, [real, fake], ["real", "fake"])
    check(lambda b: gen(b, False), [real[::3], fake.t()], ["fake", "fake2"])
    check(recon, [real, fake], ["features_real", "features_fake"])
    a = torch.randn(6, 4, 5, 8).to(dtype).permute(0, 3, 1, 2)
    check(recon, [a, torch.randn(a.shape).to(dtype)], ["features_real", "features_fake"])
    x = strided((53, 29), dtype, "slice")
    w = strided((17, 29), dtype, "transpose")
    b = torch.randn(34).to(dtype)[::2]
    for act in ("leaky_relu", "gelu"):
        check(_linear(act), [x, w, b], ["x", "weight", "bias"])


# ------------------------------------------------------------------------------------------------ fp64
def _gradcheck(fn, *inputs):
    inputs = [t.double().requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_reparam_kl_and_losses():
    mu, lv, eps = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    _gradcheck(lambda *t: ops.reparam_kl(*t, backend="native"), mu, lv, eps)
    _gradcheck(lambda r, f: ops.discriminator_loss(r, f, backend="native"), 3 * torch.randn(7, 1),
               3 * torch.randn(5))
    _gradcheck(lambda f: ops.generator_loss(f, saturating=True, backend="native"), 3 * torch.randn(9))
    _gradcheck(lambda f, g: ops.generator_loss(f, g, backend="native"), 3 * torch.randn(9), torch.randn(2, 2))
    _gradcheck(lambda a, b: ops.feature_recon_loss(a, b, backend="native"), torch.randn(3, 4, 2),
               torch.randn(3, 4, 2))


@pytest.mark.parametrize("act", ACTS, ids=act_id)
def test_gradcheck_linear_act(act):
    x, w, b = _linear_inputs(5, 4, 3, torch.float64)
    _gradcheck(lambda x, w, b: ops.linear_act(x, w, b, act[0], negative_slope=act[1], backend="native"), x, w, b)


def test_fp64_matches_reference_tightly():
    x, w, b = _linear_inputs(33, 17, 9, torch.float64)
    check(_linear("gelu"), [x, w, b], ["x", "weight", "bias"])
    mu, lv, eps = torch.randn(33, 17).double(), torch.randn(33, 17).double(), torch.randn(33, 17).double()
    check(reparam, [mu, lv, eps], ["mu", "logvar", "eps"])


def test_double_backward_falls_back_to_differentiable_formulas():
    x, w, b = (t.double().requires_grad_(True) for t in _linear_inputs(4, 3, 2, torch.float64))
    assert torch.autograd.gradgradcheck(lambda x, w, b: ops.linear_act(x, w, b, "tanh", backend="native"),
                                        [x, w, b])
    r = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda r: ops.discriminator_loss(r, r * 2, backend="native"), [r])


# ------------------------------------------------------------------------------------------------ threads
def test_results_do_not_depend_on_thread_count(threads):
    """1 and 2 threads: elementwise ops and losses bitwise equal to a 2-thread (resp. 1-thread) run."""
    shape = (1000, 784)  # many tasks
    mu, lv, eps = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    x, y = 8 * torch.randn(shape), torch.randn(shape)
    gz, gkl, g = torch.randn(shape), torch.randn(shape[0]), torch.randn(())
    (z, kl), grads_r = run(reparam("native"), [mu, lv, eps], [gz, gkl])
    (d,), grads_d = run(disc("native"), [x, y], [g])
    (f,), grads_f = run(recon("native"), [x, y], [g])
    xl, wl, bl = _linear_inputs(1000, 64, 300, torch.float32)
    gl = torch.randn(1000, 300)
    (yl,), grads_l = run(_linear("gelu")("native"), [xl, wl, bl], [gl])
    torch.set_num_threads(3 - threads)
    (z2, kl2), grads_r2 = run(reparam("native"), [mu, lv, eps], [gz, gkl])
    (d2,), grads_d2 = run(disc("native"), [x, y], [g])
    (f2,), grads_f2 = run(recon("native"), [x, y], [g])
    for a, b in zip([z, kl, d, f, *grads_r, *grads_d, *grads_f], [z2, kl2, d2, f2, *grads_r2, *grads_d2, *grads_f2]):
        assert torch.equal(a, b)
    # linear_act: the GEMMs are BLAS's (its own threading); check against the fp64 reference instead.
    truth, truth_grads = run(_linear("gelu")("reference"), [xl.double(), wl.double(), bl.double()], [gl])
    assert_matches("y", yl, truth[0])
    for name, g, t in zip(("x", "weight", "bias"), grads_l, truth_grads):
        assert_matches(f"d {name}", g, t)


# ------------------------------------------------------------------------------------------------ autocast
def test_autocast_runs_linear_act_in_low_precision_and_the_rest_in_fp32(bf16_products):
    """Under CPU autocast (bf16): linear_act casts its inputs to bf16 and returns bf16, as F.linear does; the
    losses and reparam+KL upcast bf16 inputs and return fp32. Gradients come back in each input's dtype."""
    x, w, b = _linear_inputs(24, 16, 8, torch.float32)
    x.requires_grad_(True)
    lo = torch.randn(8, 5, dtype=torch.bfloat16, requires_grad=True)
    hi = torch.randn(8, 5, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear_act(x, w, b, "relu", backend="native")
        eager_y = ops.linear_act(x, w, b, "relu", backend="reference")
        d = ops.discriminator_loss(lo, hi, backend="native")
        f = ops.feature_recon_loss(lo, hi, backend="native")
        z, kl = ops.reparam_kl(lo, hi, eps=hi.detach(), backend="native")
    assert y.dtype == eager_y.dtype == torch.bfloat16
    truth_y = ops.linear_act(*(t.bfloat16().double() for t in (x.detach(), w, b)), "relu", backend="reference")
    assert_matches("y", y, truth_y, eager_y)
    assert all(t.dtype == torch.float32 for t in (d, f, z, kl))
    lo64, hi64 = lo.detach().double(), hi.detach().double()
    assert_matches("discriminator_loss", d, ops.discriminator_loss(lo64, hi64, backend="reference"))
    assert_matches("feature_recon_loss", f, ops.feature_recon_loss(lo64, hi64, backend="reference"))
    z64, kl64 = ops.reparam_kl(lo64, hi64, eps=hi64, backend="reference")
    assert_matches("z", z, z64)
    assert_matches("kl", kl, kl64)
    gx, glo = torch.autograd.grad(y.float().sum() + d + f + z.sum() + kl.sum(), [x, lo])
    assert gx.dtype == torch.float32 and glo.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ opcheck
def _opcheck_cases():
    mu, lv, eps = torch.randn(5, 7), torch.randn(5, 7), torch.randn(5, 7)
    x, w, b = _linear_inputs(6, 4, 3, torch.float32)
    g = torch.randn(())
    cases = [
        ("reparam_kl", (mu.requires_grad_(), lv.requires_grad_(), eps)),
        ("reparam_kl_backward", (mu.detach(), lv.detach(), eps, torch.randn(5, 7), torch.randn(5), True)),
        ("reparam_kl_backward", (mu.detach(), lv.detach(), eps, None, torch.randn(5), False)),
        ("softplus_losses", ([torch.randn(4, 1, requires_grad=True), torch.randn(3)], [-1.0, 1.0], [1.0, 1.0],
                             True)),
        ("softplus_losses", ([torch.randn(4)], [1.0], [-1.0], False)),
        ("feature_recon_loss", (torch.randn(3, 5, requires_grad=True), torch.randn(3, 5))),
        ("feature_recon_loss", (torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True))),
        ("feature_recon_loss_backward", (torch.randn(3, 5), torch.randn(3, 5), g, [True, True])),
        ("feature_recon_loss_backward", (torch.randn(3, 5), torch.randn(3, 5), g, [False, True])),
        ("feature_recon_terms", (torch.randn(3, 5), torch.randn(3, 5))),
        ("scale_grad", (torch.randn(3, 5), g, True)),
    ]
    for i, (act, slope) in enumerate(ACTS):
        cases.append(("linear_act", (x.clone().requires_grad_(), w.clone().requires_grad_(),
                                     b.clone().requires_grad_(), ops.ACTIVATIONS.index(act), slope)))
        keep = layer_native.keeps_preactivation(ops.ACTIVATIONS.index(act), slope)
        cases.append(("linear_act_backward", (torch.randn(6, 3), x, w, torch.randn(6, 3), not keep,
                                              ops.ACTIVATIONS.index(act), slope, [True, True, True])))
    cases.append(("linear_act", (x.clone().requires_grad_(), w, None, 1, 0.2)))
    images, xi = torch.rand(6, 5), torch.rand(3, 5)
    cases.append(("image_head_forward", (torch.randn(6, 5), xi, torch.empty(6, 5), True)))
    cases.append(("image_head_backward", (images, xi, torch.randn(3, 5), torch.randn(6, 5), 0.5, 0.1, False, True)))
    for kind, xin, weight in ((1, torch.randn(4, 3, 5, 7), torch.randn(6, 3, 3, 3)),
                              (2, torch.randn(4, 3, 5, 7), torch.randn(3, 6, 3, 3)),
                              (0, torch.randn(4, 5), torch.randn(6, 5))):
        bn = [torch.rand(6) + 0.5, torch.randn(6), torch.zeros(6), torch.ones(6), torch.zeros((), dtype=torch.long)]
        conv = ([2, 1], [1, 0], [1, 0] if kind == 2 else [0, 0])
        cases.append(("fused_layer_forward", (xin, weight, torch.randn(6), *bn, kind, *conv, True, True, 0.1, 1e-5, 2,
                                              2, 0.2)))
        y, x_used, pre, kept, mean, rstd = NATIVE.fused_layer_forward(xin, weight, None, *bn, kind, *conv, True, True,
                                                                      0.1, 1e-5, 2, 2, 0.2)
        x_used, kept = (x_used if x_used.numel() else xin), (kept if kept.numel() else y)  # empty: an alias
        cases.append(("fused_layer_backward", (torch.randn_like(y), x_used, weight, False, pre, kept, mean, rstd, bn[0],
                                               kind, *conv, True, True, 2, 2, 0.2, False, True, True, 2, 2, False)))
    cases.append(("linear_act", (x.clone().to(torch.bfloat16).requires_grad_(), w.to(torch.bfloat16),
                                 b.to(torch.bfloat16), 5, 0.2)))
    return cases


@pytest.mark.parametrize("case", range(len(_opcheck_cases()) if "native" in ops.available_backends() else 0))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(NATIVE, name).default, args)


# ------------------------------------------------------------------------------------------------ errors
def test_fp16_is_refused_clearly():
    h = torch.randn(4, 3, dtype=torch.float16)
    with pytest.raises(TypeError, match="float16"):
        ops.reparam_kl(h, h, h, backend="native")
    with pytest.raises(TypeError, match="float16"):
        ops.discriminator_loss(h, h, backend="native")
    with pytest.raises(TypeError, match="float16"):
        ops.linear_act(h, h, None, "relu", backend="native")
    with pytest.raises(TypeError, match="float16"):  # the C++ op itself refuses it too
        NATIVE.reparam_kl(h, h, h)


def test_missing_library_is_reported_with_the_build_command(tmp_path, monkeypatch):
    with pytest.raises(ImportError, match="not built"):
        _native_lib.find_library(str(tmp_path))
    reason = "the native CPU library is not built; build it with `pip install --no-build-isolation -e .`"
    monkeypatch.setitem(_dispatch._load_errors, "native", reason)
    monkeypatch.setattr(_dispatch, "_warned_load_errors", set())
    x = torch.randn(8, 3)
    with pytest.raises(ops.BackendUnavailableError, match="pip install --no-build-isolation -e ."):
        ops.discriminator_loss(x, x, backend="native")
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation") as record:
        got = ops.discriminator_loss(x, x, backend="auto")
        ops.reparam_kl(x, x, x, backend="auto")
    assert len([w for w in record if "native" in str(w.message)]) == 1  # one warning, not one per call
    assert torch.equal(got, ops.discriminator_loss(x, x, backend="reference"))
    assert "native" not in ops.available_backends("cpu")


def test_auto_picks_native_on_cpu():
    assert _dispatch.resolve("linear_act", "auto", torch.device("cpu"))[0] == "native"
