"""vaegan_fast.optim.apply_update: the direct fused-Adam update is torch's fused Adam step, bit for bit."""
import copy

import pytest
import torch

from vaegan_fast.optim import _direct_group, apply_update, apply_updates


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (1, 13), (13,), (3, 1)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _stepped_by_torch(params, opt, grads, found_inf):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.found_inf = found_inf
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_direct_update_equals_fused_adam_step_including_skipped_updates(weight_decay):
    ours, theirs = _params(), _params()
    kw = dict(lr=3e-3, betas=(0.5, 0.999), eps=1e-7, weight_decay=weight_decay, fused=True)
    opt_ours, opt_theirs = torch.optim.Adam(ours, **kw), torch.optim.Adam(theirs, **kw)
    skips = [None, None, torch.tensor(0.0), torch.tensor(1.0), None, torch.tensor(1.0), torch.tensor(0.0)]
    for step, found_inf in enumerate(skips):
        grads = _grads(ours, step)
        if step > 0:  # the first step creates the state through step(); after it the direct path runs
            assert _direct_group(opt_ours, ours) is not None
        apply_update(opt_ours, ours, [g.clone() for g in grads], found_inf)
        _stepped_by_torch(theirs, opt_theirs, grads, found_inf)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
            assert a.grad is None
    for a, b in zip(ours, theirs):
        sa, sb = opt_ours.state[a], opt_theirs.state[b]
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert opt_ours.state[ours[0]]["step"].item() == 5  # two of the seven updates were skipped


def test_state_dict_round_trip_keeps_the_direct_path_exact():
    ours = _params()
    opt = torch.optim.Adam(ours, lr=1e-2, fused=True)
    for step in range(3):
        apply_update(opt, ours, _grads(ours, step))
    saved_params, saved_state = [p.detach().clone() for p in ours], copy.deepcopy(opt.state_dict())
    apply_update(opt, ours, _grads(ours, 3))
    expected = [p.detach().clone() for p in ours]

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = torch.optim.Adam(resumed, lr=1e-2, fused=True)
    opt2.load_state_dict(saved_state)
    assert _direct_group(opt2, resumed) is not None
    apply_update(opt2, resumed, _grads(resumed, 3))
    for a, b in zip(resumed, expected):
        assert torch.equal(a, b)


def test_what_the_direct_path_does_not_cover_goes_through_step():
    params = _params()
    cases = [torch.optim.Adam(params, fused=False), torch.optim.Adam(params, fused=True, amsgrad=True),
             torch.optim.RMSprop(params), torch.optim.Adam(params, lr=torch.tensor(1e-3), fused=True)]
    for opt in cases:
        apply_update(opt, params, _grads(params, 0))  # creates the state
        assert _direct_group(opt, params) is None
    hooked = torch.optim.Adam(params, fused=True)
    apply_update(hooked, params, _grads(params, 0))
    calls = []
    hooked.register_step_post_hook(lambda *_: calls.append(1))
    assert _direct_group(hooked, params) is None
    apply_update(hooked, params, _grads(params, 1))
    assert calls == [1]  # step() ran, so its hooks did


def test_a_missing_gradient_falls_back_to_step():
    params = _params()
    opt = torch.optim.Adam(params, fused=True)
    apply_update(opt, params, _grads(params, 0))
    before = [p.detach().clone() for p in params]
    grads = _grads(params, 1)
    grads[1] = None
    apply_update(opt, params, grads)
    assert torch.equal(params[1], before[1])  # no gradient: untouched, as step() does
    assert not torch.equal(params[0], before[0])


def test_optimizers_sharing_hyperparameters_update_in_one_call_exactly_as_apart():
    nets = [_params(seed) for seed in range(3)]
    refs = [_params(seed) for seed in range(3)]
    lrs = [1e-3, 1e-3, 5e-4]  # two share a call, the third has its own
    opts = [torch.optim.Adam(p, lr=lr, fused=True) for p, lr in zip(nets, lrs)]
    ref_opts = [torch.optim.Adam(p, lr=lr, fused=True) for p, lr in zip(refs, lrs)]
    skip = torch.tensor(1.0)
    for step in range(4):
        found = [None, skip if step == 2 else None, None]  # a gated network does not join the others' call
        apply_updates([(o, p, _grads(p, step), f) for o, p, f in zip(opts, nets, found)])
        for o, p, f in zip(ref_opts, refs, found):
            _stepped_by_torch(p, o, _grads(p, step), f)
        for net, ref in zip(nets, refs):
            for a, b in zip(net, ref):
                assert torch.equal(a, b)
