"""The native Adam update from bf16 gradients (kernels/cpu/adam.cpp, called by vaegan_fast.optim.apply_updates):
torch's fused Adam on the widened gradients is its specification."""
import pytest
import torch

import vaegan_fast.model as model_module
from vaegan_fast import Model
from vaegan_fast.ops import _dispatch
from vaegan_fast.optim import apply_update, apply_updates

pytestmark = pytest.mark.skipif("native" in _dispatch._load_errors, reason="the native library is not built")

# One row, one column, primes, a vector width's multiple, and sizes past one task (16384) with a remainder.
SHAPES = [(1,), (1, 13), (7, 1), (13, 7), (37,), (64, 16), (16385,), (301, 67)]
FP32_ULP = 2.0 ** -23


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    exp_avgs = [0.1 * torch.randn(s, generator=g) for s in SHAPES]
    exp_avg_sqs = [0.01 * torch.rand(s, generator=g) + 1e-6 for s in SHAPES]
    steps = [torch.tensor(float(3 + i)) for i in range(len(SHAPES))]
    return params, exp_avgs, exp_avg_sqs, steps


def _bf16_grads(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(s, generator=g).to(torch.bfloat16) for s in SHAPES]


def _assert_close_to_torch(name, ours, theirs):
    """Within 2 ulp elementwise: the vectorised body gives torch's bits, a parameter's scalar remainder may
    differ in the last place (torch's own build contracts its multiply-adds there as its compiler chose)."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        bound = 2 * FP32_ULP * b.abs() + 1e-30
        worst = ((a - b).abs() - bound).max().item()
        assert worst <= 0, f"{name}[{i}] {tuple(a.shape)}: off torch's fused Adam by more than 2 ulp"


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_step_is_fused_adam_on_the_widened_gradients(weight_decay):
    ours, theirs = _state(0), _state(0)
    kw = dict(lr=2e-3, beta1=0.5, beta2=0.999, weight_decay=weight_decay, eps=1e-8)
    for step in range(4):
        grads = _bf16_grads(step)
        for s in ours[3] + theirs[3]:
            s.add_(1)
        torch.ops.vaegan_fast_native.adam_step_(ours[0], grads, ours[1], ours[2], ours[3], kw["lr"], kw["beta1"], kw["beta2"],
                                                kw["weight_decay"], kw["eps"], None)
        torch._fused_adam_(theirs[0], [g.float() for g in grads], theirs[1], theirs[2], [], theirs[3],
                           amsgrad=False, maximize=False, grad_scale=None, found_inf=None, **kw)
        for name, k in (("params", 0), ("exp_avgs", 1), ("exp_avg_sqs", 2)):
            _assert_close_to_torch(f"step {step + 1} {name}", ours[k], theirs[k])
        # The vectorised part of a large parameter is torch's bit for bit.
        body = SHAPES.index((64, 16))
        assert torch.equal(ours[0][body], theirs[0][body])


def test_found_inf_skips_every_update_and_strided_gradients_are_read_as_they_are():
    params, exp_avgs, exp_avg_sqs, steps = _state(1)
    before = [t.clone() for t in params + exp_avgs + exp_avg_sqs]
    grads = _bf16_grads(0)
    torch.ops.vaegan_fast_native.adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, 1e-3, 0.9, 0.999, 0.0,
                                            1e-8, torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(params + exp_avgs + exp_avg_sqs, before))
    # A transposed gradient: the same update as its contiguous copy.
    p2, m2, v2, s2 = _state(1)
    strided = [g.t().contiguous().t() if g.dim() == 2 else g for g in grads]
    assert any(not g.is_contiguous() for g in strided)
    torch.ops.vaegan_fast_native.adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, 1e-3, 0.9, 0.999, 0.0,
                                            1e-8, torch.tensor(0.0))
    torch.ops.vaegan_fast_native.adam_step_(p2, strided, m2, v2, s2, 1e-3, 0.9, 0.999, 0.0, 1e-8, None)
    assert all(torch.equal(a, b) for a, b in zip(params + exp_avgs + exp_avg_sqs, p2 + m2 + v2))


@pytest.mark.parametrize("case", ["fp32 grads", "fp64 params", "shape", "count", "strided param"])
def test_bad_input_is_refused_by_name_before_anything_changes(case):
    params, exp_avgs, exp_avg_sqs, steps = _state(2)
    grads = _bf16_grads(0)
    name = {"fp32 grads": "grads", "fp64 params": "params", "shape": "grads", "count": "grads",
            "strided param": "params"}[case]
    if case == "fp32 grads":
        grads[3] = grads[3].float()
    elif case == "fp64 params":
        params[3] = params[3].double()
    elif case == "shape":
        grads[3] = grads[3].reshape(-1)
    elif case == "count":
        grads = grads[:-1]
    else:
        params[3] = params[3].t()
    before = [t.clone() for t in params + exp_avgs + exp_avg_sqs]
    with pytest.raises((RuntimeError, TypeError), match=name):
        torch.ops.vaegan_fast_native.adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, 1e-3, 0.9, 0.999, 0.0,
                                                1e-8, None)
    assert all(torch.equal(a, b) for a, b in zip(params + exp_avgs + exp_avg_sqs, before))
    assert all(s.item() == 3 + i for i, s in enumerate(steps))


def _adams(seed, **kw):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    return params, torch.optim.Adam(params, fused=True, **kw)


def test_apply_updates_widens_bf16_gradients_natively_and_matches_the_cast_path(monkeypatch):
    ours, opt_ours = _adams(0, lr=1e-3, betas=(0.5, 0.999))
    theirs, opt_theirs = _adams(0, lr=1e-3, betas=(0.5, 0.999))
    native_calls = []
    real = torch.ops.vaegan_fast_native.adam_step_
    monkeypatch.setattr(torch.ops.vaegan_fast_native, "adam_step_",
                        lambda *a: native_calls.append(1) or real(*a), raising=False)
    for step in range(4):
        grads = _bf16_grads(step)
        apply_updates([(opt_ours, ours, grads, torch.tensor(1.0) if step == 2 else None)])
        apply_update(opt_theirs, theirs, [g.float() for g in grads], torch.tensor(1.0) if step == 2 else None)
        _assert_close_to_torch(f"step {step + 1}", [p.detach() for p in ours], [p.detach() for p in theirs])
    assert len(native_calls) == 3  # the first step creates the state through step(), with the cast gradients
    assert opt_ours.state[ours[0]]["step"].item() == opt_theirs.state[theirs[0]]["step"].item() == 3


def test_optimizers_outside_the_direct_path_get_the_gradients_cast():
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = torch.optim.RMSprop(params, lr=1e-2), torch.optim.RMSprop(twins, lr=1e-2)
    for step in range(2):
        grads = [torch.randn(p.shape).to(torch.bfloat16) for p in params]
        apply_update(opt, params, grads)
        apply_update(ref, twins, [g.float() for g in grads])
        assert all(torch.equal(a, b) for a, b in zip(params, twins))


def test_a_bf16_training_step_hands_adam_its_bf16_gradients_and_updates_as_with_cast_ones(monkeypatch):
    """The whole-step executor's bf16 gradients reach Adam as bf16; the update equals the one from the same
    gradients cast to fp32 (the data-parallel path's) within Adam's last-place differences."""
    kw = dict(precision="bf16", backend="native", check_inputs=False, seed=3, gating=False)
    model, twin = Model.preset("seed", **kw), Model.preset("seed", **kw)
    x = torch.rand(16, 784, generator=torch.Generator().manual_seed(0))
    for m in (model, twin):
        m.train_step(x)  # creates the optimizers' state
    seen = []
    real_apply = model_module.apply_updates

    def recording(updates):
        seen.append([(opt, [g.clone() for g in grads]) for opt, params, grads, skip in updates])
        real_apply(updates)

    monkeypatch.setattr(model_module, "apply_updates", recording)
    model.train_step(x)
    monkeypatch.setattr(model_module, "apply_updates", real_apply)
    (updates,) = seen
    assert all(g.dtype == torch.bfloat16 for _, grads in updates for g in grads)
    # The twin applies the same gradients, cast to fp32, through torch's fused Adam.
    twin._draw_noise = model._draw_noise  # not drawn again: only the update is compared
    name_of = {id(opt): name for name, opt in model.optimizers.items()}
    for opt, grads in updates:
        name = name_of[id(opt)]
        apply_update(twin.optimizers[name], twin.parameters_of(name), [g.float() for g in grads])
    _assert_close_to_torch("weights", [p.detach() for p in model.parameters()],
                           [p.detach() for p in twin.parameters()])
