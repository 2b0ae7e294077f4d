"""The Python executor of a step plan (vaegan_fast/step/plan.py): the specification of every instruction.

It runs the plan over the kernels of one backend (the reference, the Triton one, or the native one for the
bit-for-bit comparison with the C++ executor, kernels/cpu/plan_step.cpp, which does the same thing in the
same order). What each op does, slots named by position in ``ins`` / ``outs``:

    forward(x) -> y [, tap]         the network's layers in order (layer_forward), caches kept for backward;
                                    ints (net, groups, tap layer or -1, tap point 0 output / 1 pre-norm)
    split(t) -> t[:, :k], t[:, k:]  clamp(t) -> t.clamp(lo, hi)     cat(a, b, ...) -> rows concatenated
    reparam(mu, logvar, eps) -> z, kl                               rows(t) -> t[r0:r1]     mean(t) -> t.mean()
    image_head(logits, x) -> (buffer, images, pixel)   images = sigmoid(logits), written after x's rows in the
                                    buffer when ints[0] (the discriminator's input), and the pixel BCE of the
                                    last B image rows / B when ints[1]
    feature_recon(a, b) -> (loss, (a - b) / N)      u_seed(g) -> -g, or [g; 0; -g] when ints[0] (full rows)
    softplus(x_1..x_n) -> (sum_k c_k mean softplus(s_k x_k), [its gradients, rows concatenated]); floats
                                    (s_1..s_n, c_1..c_n)            softplus_mean(t) -> mean softplus(s t)
    combine(t_1..t_n) -> sum_k c_k t_k                              view_rows(t) -> t as [N, features]
    backward(seed [, joined]) -> dx one stream: ints (net, top layer, entry at the pre-norm point, input
                                    gradient wanted, weight gradients wanted, seed rows s0 s1, the layer where
                                    the second seed joins (-1: none) and its rows j0 j1, then per layer 0..top
                                    the rows of its output gradient it runs on (r0, r1) and of its input gradient
                                    it forms (d0, d1; -1 -1: none)); floats (the joined seed's coefficient);
                                    weight gradients go to the network's gradient list
    image_head_backward(images, x, g, u [, scale]) -> (dec_up, enc_up)   ints (g has reconstruction rows, u
                                    has prior rows, scaled); floats (the decoder's coefficient of u: gamma
                                    over the encoder's weight of the feature term, which u carries; pixel factor)
    sigmoid_backward(s, g) -> g s (1 - s)     pixel_grad(s, x [, scale]) -> (s - x) factor [scale]
    reparam_backward(mu, logvar, eps, dz, kl [, scale]) -> (d mu, d logvar) with d kl = c (times the scale)
    clamp_backward(d, raw) -> d where lo <= raw <= hi, else 0      cat_cols(a, b)    scale(t, s) -> t s
    cast(t) -> t in DTYPES[ints[0]]
"""
from __future__ import annotations

import torch

from ..ops import _dispatch
from ..ops.gan_losses import FEATURE_RECON_TERMS_OP, SOFTPLUS_TERMS_OP, softplus
from ..ops.image_head import BACKWARD_OP as HEAD_BACKWARD_OP, FORWARD_OP as HEAD_FORWARD_OP
from ..ops.layer import BACKWARD_OP as LAYER_BACKWARD_OP, FORWARD_OP as LAYER_FORWARD_OP, LayerParams
from ..ops.reparam_kl import BACKWARD_OP as REPARAM_BACKWARD_OP, FORWARD_OP as REPARAM_FORWARD_OP
from .plan import DTYPES


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] as [N, features] without a copy: channels-last images as [N, H*W*C] (their memory order)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], -1)


def from_rows(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of rows_view for a gradient of ``like``'s per-sample shape and layout."""
    if g.dim() == like.dim():
        return g
    n = g.shape[0]
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        c, h, w = like.shape[1:]
        return g.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return g.reshape(n, *like.shape[1:])


def scale_rows(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Each row of ``t`` times its entry of ``s`` ([rows] or [rows, 1])."""
    return t * s.view(-1, *[1] * (t.dim() - 1))


def like_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory layout (a copy only when they differ): elementwise kernels read both flat."""
    if t.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


class Kernels:
    """The backend's implementations of the plan's primitives, resolved once."""

    def __init__(self, backend: str, device: torch.device, dtype: torch.dtype, loss_dtype: torch.dtype):
        def get(op, dt):
            return _dispatch.resolve(op, backend, device, dt)[1]
        self.name = _dispatch.resolve(LAYER_FORWARD_OP, backend, device, dtype)[0]
        self.layer_forward = get(LAYER_FORWARD_OP, dtype)
        self.layer_backward = _dispatch.resolve(LAYER_BACKWARD_OP, self.name, device, dtype)[1]
        self.head_forward, self.head_backward = get(HEAD_FORWARD_OP, dtype), get(HEAD_BACKWARD_OP, dtype)
        self.reparam_forward = get(REPARAM_FORWARD_OP, loss_dtype)
        self.reparam_backward = get(REPARAM_BACKWARD_OP, loss_dtype)
        self.softplus_terms = get(SOFTPLUS_TERMS_OP, loss_dtype)
        self.feature_recon_terms = get(FEATURE_RECON_TERMS_OP, loss_dtype)


class NetworkState:
    """One network in a step: its layers' specs and tensors, the forward's caches, the weight gradients."""

    def __init__(self, program, dtype: torch.dtype):
        self.layers = list(program.layers)
        self.specs = program.specs
        self.params = [LayerParams.of(layer, dtype) for layer in self.layers]
        self.caches: list = []
        self.groups = 1
        self.grads = None

    def param_grads(self) -> list:
        """The weight gradients in the order of the network's parameters (weight, bias, norm weight, bias)."""
        out = []
        for layer, spec, g in zip(self.layers, self.specs, self.grads):
            if g is None:
                continue
            dw, db, dgamma, dbeta = g
            out.append(dw)
            if layer.bias is not None:
                out.append(db)
            if spec.norm:
                out += [dgamma, dbeta]
        return out


@torch.no_grad()  # every gradient here is formed explicitly: autograd records nothing
def run_plan(plan, networks: dict, inputs: list, kernels: Kernels, on_network_done=None,
             memory: dict | None = None) -> tuple:
    """({net index: [grads in parameter order]}, {loss name: 0-dim tensor}) of one step.

    networks: {net index: NetworkState}; inputs: [x, eps, z_prior] (and the loss scale).
    ``on_network_done(net, grads)`` is called as soon as a network's weight gradients are complete
    (data-parallel training starts its all-reduce there). ``memory``, if given, receives "saved_bytes": the
    bytes of the distinct tensors the forward passes keep for the backward streams.
    """
    slot = [None] * plan.slots
    slot[:len(inputs)] = inputs
    k = kernels
    for ins in plan.instrs:
        op, a = ins.op, [slot[i] for i in ins.ins]
        if op == "forward":
            net, groups, tap_layer, tap_point = ins.ints
            state = networks[net]
            state.groups, state.caches = groups, []
            h, tapped = a[0], None
            for i, (spec, p) in enumerate(zip(state.specs, state.params)):
                h, cache = k.layer_forward(spec, p, h, groups, True)
                state.caches.append(cache)
                if i == tap_layer:
                    tapped = h if tap_point == 0 else cache.pre
            out = (h,) if tap_layer < 0 else (h, tapped)
        elif op == "split":
            n = ins.ints[0]
            out = (a[0][:, :n], a[0][:, n:])
        elif op == "clamp":
            out = (a[0].clamp(ins.floats[0], ins.floats[1]),)
        elif op == "reparam":
            out = tuple(k.reparam_forward(*a))
        elif op == "cat":
            out = (torch.cat(a),)
        elif op == "image_head":
            logits, x = a
            with_real, with_pixel = ins.ints
            batch = x.shape[0]
            rows = logits.shape[0] + (batch if with_real else 0)
            fmt = torch.channels_last if logits.dim() == 4 and not logits.is_contiguous() else torch.contiguous_format
            buffer = torch.empty((rows, *logits.shape[1:]), device=x.device, dtype=logits.dtype, memory_format=fmt)
            if with_real:
                buffer[:batch].copy_(x)
            images = buffer[batch:] if with_real else buffer
            pixel = k.head_forward(logits, like_layout(x, logits), images, bool(with_pixel))
            out = (buffer, images, pixel)
        elif op == "rows":
            out = (a[0][ins.ints[0]:ins.ints[1]],)
        elif op == "feature_recon":
            out = tuple(k.feature_recon_terms(*a))
        elif op == "u_seed":
            g = a[0]
            out = (torch.cat([g, torch.zeros_like(g), g.neg()]) if ins.ints[0] else g.neg(),)
        elif op == "softplus":
            n = len(a)
            loss, grads = k.softplus_terms(a, list(ins.floats[:n]), list(ins.floats[n:]))
            out = (loss, torch.cat(grads) if len(grads) > 1 else grads[0])
        elif op == "softplus_mean":
            t = a[0] if ins.floats[0] > 0 else a[0].neg()
            out = (softplus(t).mean(),)
        elif op == "mean":
            out = (a[0].mean(),)
        elif op == "combine":
            acc = None
            for t, c in zip(a, ins.floats):
                term = t if c == 1.0 else t * c
                acc = term if acc is None else acc + term
            out = (acc,)
        elif op == "view_rows":
            out = (rows_view(a[0]),)
        elif op == "backward":
            state = networks[ins.ints[0]]
            out = (_backward(state, a, ins.ints, ins.floats, k),)
            if ins.ints[4] and ins.ints[10] == 0 and on_network_done is not None:  # weight gradients, to layer 0
                on_network_done(ins.ints[0], state.param_grads())
        elif op == "image_head_backward":
            g_has_rec, u_has_prior, scaled = ins.ints
            images, x, g, u = a[:4]
            scale = a[4] if scaled else None
            out = tuple(k.head_backward(images, like_layout(x, images), like_layout(g, images),
                                        like_layout(u, images), ins.floats[0], ins.floats[1], bool(g_has_rec),
                                        bool(u_has_prior), scale))
        elif op == "sigmoid_backward":
            images, g = a
            out = (torch.ops.aten.sigmoid_backward(like_layout(g, images), images),)
        elif op == "pixel_grad":
            images, x = a[:2]
            factor = ins.floats[0] if not ins.ints[0] else a[2] * ins.floats[0]
            out = (torch.sub(images, like_layout(x, images)).mul_(factor),)
        elif op == "reparam_backward":
            mu, logvar, eps, dz, kl = a[:5]
            grad_kl = torch.full_like(kl, ins.floats[0])
            if ins.ints[0]:
                grad_kl.mul_(a[5])
            out = tuple(k.reparam_backward(mu, logvar, eps, rows_view(dz), grad_kl))
        elif op == "clamp_backward":
            d, raw = a
            lo, hi = ins.floats
            out = (d * ((raw >= lo) & (raw <= hi)),)
        elif op == "cat_cols":
            out = (torch.cat(a, 1),)
        elif op == "scale":
            out = (a[0] * a[1],)
        elif op == "scale_rows":
            out = (scale_rows(a[0], a[1]),)
        elif op == "cast":
            out = (a[0].to(DTYPES[ins.ints[0]]),)
        else:  # pragma: no cover - the planner emits only the ops above
            raise ValueError(f"unknown plan op {op!r}")
        for i, t in zip(ins.outs, out):
            slot[i] = t
    if memory is not None:
        kept = [t for net in plan.networks for c in networks[net].caches for t in c.tensors()]
        distinct = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t for t in kept}
        memory["saved_bytes"] = sum(t.numel() * t.element_size() for t in distinct.values())
    grads = {net: networks[net].param_grads() for net in plan.networks}
    losses = {name: slot[i] for name, i in plan.outputs.items()}
    return grads, losses


def _backward(state: NetworkState, seeds: list, ints: tuple, floats: tuple, k: Kernels):
    """One backward stream (see run_plan); returns the input gradient, or None."""
    net, top, entry_pre_norm, input_grad, weight_grads, s0, s1, join_layer, j0, j1, bottom, unit = ints[:12]
    layers = [ints[12 + 4 * i:16 + 4 * i] for i in range(top + 1)]  # (r0, r1, d0, d1) per layer
    if weight_grads and top == len(state.specs) - 1:  # a stream from the top starts the network's gradients
        state.grads = [None] * len(state.specs)
    g, g_rows = seeds[0], (s0, s1)
    scale = None
    if unit:  # a seed of ones; the weight gradients read the output gradients times the seed, per row
        scale, g = g, torch.ones_like(g)
    top_cache = state.caches[top]
    like = top_cache.pre if entry_pre_norm else (state.caches[top + 1].x if top + 1 < len(state.caches) else None)
    if like is not None:
        g = from_rows(g, like[s0:s1])
    for i in range(top, bottom - 1, -1):
        r0, r1, d0, d1 = layers[i]
        if (r0, r1) != g_rows:  # the rows this layer runs on: the gradient's rows there, zeros elsewhere
            lo, hi = max(r0, g_rows[0]), min(r1, g_rows[1])
            if (lo, hi) == (r0, r1):
                g = g.narrow(0, r0 - g_rows[0], r1 - r0)
            else:
                wide = g.new_zeros((r1 - r0, *g.shape[1:]))
                if lo < hi:
                    wide[lo - r0:hi - r0] = g[lo - g_rows[0]:hi - g_rows[0]]
                g = wide
        if i == join_layer:  # the second seed enters at this layer's output (on the rows it runs on)
            lo, hi = max(r0, j0), min(r1, j1)
            joined = from_rows(seeds[1], state.caches[i + 1].x[j0:j1])
            if lo < hi:
                g.narrow(0, lo - r0, hi - lo).add_(joined.narrow(0, lo - j0, hi - lo), alpha=floats[0])
        spec = state.specs[i]
        need_dx = d0 >= 0
        if unit:  # no layer here couples rows: the input gradient on its own rows, the weight gradients apart
            dy_w = scale_rows(g, scale.narrow(0, r0 - s0, r1 - r0)) if spec.is_product else None
            dx = None
            if need_dx:
                dx = k.layer_backward(spec, state.params[i], state.caches[i], g.narrow(0, d0 - r0, d1 - d0), d0, d1,
                                      (d0, d1), state.groups, False, True, False, dy_writable=True)[0]
            if dy_w is not None:
                _, dw, db, dgamma, dbeta = k.layer_backward(spec, state.params[i], state.caches[i], dy_w, r0, r1,
                                                            (r0, r1), state.groups, False, False, True,
                                                            dy_writable=True)
        else:  # dy_writable: each stream owns its gradients
            dx, dw, db, dgamma, dbeta = k.layer_backward(spec, state.params[i], state.caches[i], g, r0, r1,
                                                         (d0, d1) if need_dx else (r0, r1), state.groups,
                                                         bool(entry_pre_norm) and i == top, need_dx,
                                                         bool(weight_grads), dy_writable=True)
        if weight_grads and spec.is_product:
            state.grads[i] = (dw, db, dgamma, dbeta)
        g, g_rows = dx, (d0, d1)
    return g if input_grad else None
