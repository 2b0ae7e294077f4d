"""The training step as data: a planner that turns the three networks, the options and the mode into a
program of instructions, once per model and batch shape.

The straightforward step builds one autograd graph and calls torch.autograd.grad three times; that
propagates the feature-reconstruction gradient through the discriminator twice, pushes gradients to the
discriminator's input for real rows, and forms products only to drop them. The plan instead names every
forward pass, every vector-Jacobian product (network, seed, layers, rows) and every weight gradient, each
formed once, and the executors (vaegan_fast/step/execute.py in Python, kernels/cpu/plan_step.cpp in C++) carry
it out over the backend's kernels. Rows:

    discriminator  [x; x_p; x_rec]  (3B rows, one batch-norm group: the three share statistics; with
                                     discriminator_norm="separate" three groups, each normalised over its own)
      V  a seed of ones over the rows L_D reads, from the score down to the highest layer where D and G part (a
         coupling layer, or the feature term's join): one score per row makes each row's gradient there its seed
         times V's; the weight gradients read V's output gradients times L_D's seed, and D and G below start
         from V's input gradient times their seeds (none of it when nothing lies above that layer)
      D  dL_D/ds over the rows L_D reads ([x; x_p (; x_rec)]), from below V (or the top) to the bottom, weight
         gradients
      G  dL_G/ds over the fake rows, from below V (or the top), input gradients only
      U  dL_llike/dD_l at the feature tap, input gradients only (encoder and decoder share it: its seed carries
         the encoder's weight of the term, the decoder reads it times gamma / that weight; or, when the
         decoder's share rides on G, U is the encoder's alone)
    decoder        [z_p; z]         (2B rows, two groups: a norm normalises each over its own rows, as two
                                     separate calls of the decoder would)
      Dd the decoder's upstream over both groups, weight gradients;  E the encoder's over the z rows
    encoder        x                (B rows): the reparameterization's and the logvar clamp's gradients, then
                                     its weight gradients
A stream starts on the rows its seed covers; at a layer that couples rows (batch norm in training mode) the
gradient of every row of the group depends on every row's upstream, so from there down the stream runs on
whole groups (its seed padded with zeros). That keeps the plan exact: equal to the three-grad step.

The modes: "vae" (encoder and decoder, KL and pixel likelihood) and "gan" (decoder and discriminator on
[x; x_p]) are plans over the same instructions. LOSSES below is the one place the losses combine; the
autograd path (vaegan_fast.Model.losses) reads it too.

Instructions (``Instr``): an op name, input and output slots (tensors), ints and floats. Slots 0, 1, 2 (and 3)
are the inputs x, eps, z_prior (and fp16's loss scale). See execute.py for what each op does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..nn.networks import LOGVAR_MAX, LOGVAR_MIN

ENCODER, DECODER, DISCRIMINATOR = 0, 1, 2
NETWORK_NAMES = ("encoder", "decoder", "discriminator")
X, EPS, Z_PRIOR, LOSS_SCALE = 0, 1, 2, 3

# Each network's loss: (term, weight), the weight a number or the name of the option that holds it. The
# terms: kl (mean KL to the prior), llike (feature reconstruction), pixel (pixel BCE), generator, disc.
LOSSES = {
    "vaegan": {"encoder": (("kl", 1.0), ("llike", "encoder_llike_weight"), ("pixel", "pixel_weight")),
               "decoder": (("llike", "gamma"), ("generator", 1.0), ("pixel", "pixel_weight")),
               "discriminator": (("disc", 1.0),)},
    "vae": {"encoder": (("kl", 1.0), ("pixel", "pixel_weight")), "decoder": (("pixel", "pixel_weight"),)},
    "gan": {"decoder": (("generator", 1.0),), "discriminator": (("disc", 1.0),)},
}


def loss_weights(mode: str, config: dict) -> dict:
    """{network: {term: weight}} with the options' values, the pixel term only when its weight is > 0."""
    out = {}
    for net, terms in LOSSES[mode].items():
        weights = {t: float(config[w] if isinstance(w, str) else w) for t, w in terms}
        out[net] = {t: w for t, w in weights.items() if t != "pixel" or w > 0}
    return out


# The op of each instruction, and its code in the C++ executor (kernels/cpu/plan_step.cpp's enum Op).
OPS = ("forward", "split", "clamp", "reparam", "cat", "image_head", "rows", "feature_recon", "u_seed",
       "softplus", "softplus_mean", "mean", "combine", "backward", "image_head_backward", "sigmoid_backward",
       "pixel_grad", "reparam_backward", "clamp_backward", "cat_cols", "scale", "cast", "view_rows", "scale_rows")
OP_CODES = {name: code for code, name in enumerate(OPS)}


@dataclass(frozen=True)
class Instr:
    op: str
    ins: tuple
    outs: tuple
    ints: tuple = ()
    floats: tuple = ()


@dataclass
class Stream:
    """One backward pass through a network, for reading and for FLOP counts."""
    name: str
    net: int
    top: int  # program layer where the seed enters
    rows: list  # per program layer (0 .. top): (r0, r1), the rows of its output gradient it runs on
    dx_rows: list  # per program layer: (d0, d1), the rows of its input gradient it forms (None: none)
    weight_grads: bool
    input_grad: bool
    entry_pre_norm: bool = False
    join: Optional[tuple] = None  # (layer, seed rows, coefficient): a second seed added at that layer's output


@dataclass
class Plan:
    mode: str
    batch: int
    instrs: list = field(default_factory=list)
    slots: int = 4
    outputs: dict = field(default_factory=dict)  # loss name -> slot
    streams: list = field(default_factory=list)
    forwards: dict = field(default_factory=dict)  # net -> (rows, groups)
    networks: tuple = ()  # the networks the plan trains

    def slot(self) -> int:
        self.slots += 1
        return self.slots - 1

    def emit(self, op: str, ins=(), n_out: int = 1, ints=(), floats=()) -> tuple:
        outs = tuple(self.slot() for _ in range(n_out))
        self.instrs.append(Instr(op, tuple(ins), outs, tuple(int(v) for v in ints), tuple(float(v) for v in floats)))
        return outs

    def one(self, op: str, ins=(), ints=(), floats=()) -> int:
        return self.emit(op, ins, 1, ints, floats)[0]

    def flops(self, specs: dict) -> int:
        """Product FLOPs of the plan (2 per multiply-add): forward passes, input and weight gradients."""
        total = sum(rows * sum(s.product_flops() for s in specs[net]) for net, (rows, _) in self.forwards.items())
        for st in self.streams:
            for i in range(st.top + 1):
                flops = specs[st.net][i].product_flops()
                if st.dx_rows[i] is not None:
                    total += flops * (st.dx_rows[i][1] - st.dx_rows[i][0])
                if st.weight_grads:
                    total += flops * (st.rows[i][1] - st.rows[i][0])
        return total


def _expand(rows: tuple, group: int) -> tuple:
    r0, r1 = rows
    return (r0 // group) * group, -(-r1 // group) * group


def _hull(a, b):
    if a is None:
        return b
    return (min(a[0], b[0]), max(a[1], b[1])) if b is not None else a


def _meet(a, b):
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else (lo, lo)


def stream_rows(specs: list, top: int, seed_rows: tuple, group: int, entry_pre_norm: bool, weight_grads: bool,
                out_rows, join: Optional[tuple] = None) -> tuple:
    """([rows of each layer's output gradient it runs on], [rows of its input gradient it forms, or None])
    for layers 0..top of a stream whose seed covers ``seed_rows`` (and ``join`` = (layer, rows): a second seed
    entering at that layer's output) and whose input gradient is wanted on ``out_rows`` (None: not wanted).

    Top down, the rows where the gradient can be non-zero widen to whole groups at each layer that couples
    rows. Bottom up, each layer forms its input gradient only on the rows the layer below needs: a layer
    without coupling needs its output gradient on those rows alone, a coupling layer on their whole groups
    (its norm backward mixes them), and a layer whose weight gradients are wanted on every non-zero row."""
    couples = [specs[i].couples_rows and not (i == top and entry_pre_norm) for i in range(top + 1)]
    nonzero = [None] * (top + 1)  # rows of layer i's output gradient that can be non-zero
    current = seed_rows
    for i in range(top, -1, -1):
        if join is not None and i == join[0]:
            current = _hull(current, join[1])
        nonzero[i] = current
        if couples[i]:
            current = _expand(current, group)
    below = current  # rows of layer 0's input gradient that can be non-zero
    rows, dx_rows = [None] * (top + 1), [None] * (top + 1)
    need = _meet(out_rows, below) if out_rows is not None else None
    for i in range(top + 1):
        dx_rows[i] = need if (i > 0 or out_rows is not None) else None
        wanted = None
        if need is not None:
            wanted = _expand(need, group) if couples[i] else need
        rows[i] = _hull(nonzero[i] if weight_grads else None, wanted)
        need = _meet(rows[i], nonzero[i])  # what the layer above must form of its input gradient
    return rows, dx_rows


def _couples_at_or_below(specs: list, top: int, entry_pre_norm: bool) -> bool:
    return any(s.couples_rows for s in specs[:top]) or (specs[top].couples_rows and not entry_pre_norm)


def build_plan(specs: dict, tap: tuple, config: dict, mode: str, batch: int, compute_dtype: torch.dtype,
               loss_dtype: torch.dtype, noise_dtype: torch.dtype, loss_scale: bool = False) -> Plan:
    """The plan of one training step.

    specs: {net: [LayerSpec per program layer]} for the networks the mode uses; tap: the discriminator's
    feature tap (program layer, "output" | "pre_norm"); batch: B; compute_dtype: the layers' dtype;
    loss_dtype: the losses' and the reparameterization's (fp32 for fp16); noise_dtype: eps's dtype as drawn.
    """
    plan = Plan(mode, batch)
    plan.networks = tuple(NETWORK_NAMES.index(n) for n in LOSSES[mode])
    weights = loss_weights(mode, config)
    B = batch
    scale_seeds = loss_scale

    def cast(slot, to: torch.dtype, frm: torch.dtype):
        return slot if to == frm else plan.one("cast", (slot,), ints=(DTYPE_CODES[to],))

    def seeded(slot):
        """A loss's gradient that starts a backward stream: times the loss scale, in the compute dtype."""
        if scale_seeds:
            slot = plan.one("scale", (slot, LOSS_SCALE))
        return cast(slot, compute_dtype, loss_dtype)

    def forward(net, x_slot, rows, groups, tap_=None):
        plan.forwards[net] = (rows, groups)
        ints = (net, groups, -1 if tap_ is None else tap_[0], 0 if tap_ is None or tap_[1] == "output" else 1)
        return plan.emit("forward", (x_slot,), 1 if tap_ is None else 2, ints=ints)

    def backward(name, net, seed, seed_rows, top, group, weight_grads, out_rows=None, entry_pre_norm=False,
                 join=None, bottom=0, unit_seed=False):
        """A stream from layer ``top`` down to layer ``bottom``; ``group``: rows per norm group in that network's
        forward; ``out_rows``: the rows of the input gradient of layer ``bottom`` wanted (None: none); ``join``:
        (seed slot, layer, rows, coefficient), a second seed added at that layer's output; ``unit_seed``: the
        stream runs on a seed of ones and its weight gradients read their output gradients times ``seed`` per
        row (see the discriminator's streams). Returns the input gradient's slot and its rows."""
        join_rows = (join[1] - bottom, join[2]) if join is not None else None
        sub_rows, sub_dx = stream_rows(specs[net][bottom:], top - bottom, seed_rows, group, entry_pre_norm,
                                       weight_grads, out_rows, join_rows)
        rows, dx_rows = [(0, 0)] * bottom + sub_rows, [None] * bottom + sub_dx
        input_grad = out_rows is not None
        plan.streams.append(Stream(name, net, top, rows, dx_rows, weight_grads, input_grad, entry_pre_norm,
                                   None if join is None else join[1:]))
        flat = [v for i in range(top + 1) for v in (*rows[i], *(dx_rows[i] or (-1, -1)))]
        joined = (join[1], *join[2]) if join is not None else (-1, 0, 0)
        ints = (net, top, int(entry_pre_norm), int(input_grad), int(weight_grads), seed_rows[0], seed_rows[1],
                *joined, bottom, int(unit_seed), *flat)
        ins = (seed,) if join is None else (seed, join[0])
        dx = plan.one("backward", ins, ints=ints, floats=() if join is None else (join[3],))
        return dx, dx_rows[bottom]

    terms = {}  # each loss term's slot
    # ---- forward
    if "encoder" in weights:
        (stats,) = forward(ENCODER, X, B, 1)
        latent = specs[ENCODER][-1].out_shape[0] // 2
        mu, logvar_raw = plan.emit("split", (stats,), 2, ints=(latent,))
        logvar = plan.one("clamp", (logvar_raw,), floats=(LOGVAR_MIN, LOGVAR_MAX))
        mu_l, logvar_l = cast(mu, loss_dtype, compute_dtype), cast(logvar, loss_dtype, compute_dtype)
        eps = cast(EPS, loss_dtype, noise_dtype)
        z, kl = plan.emit("reparam", (mu_l, logvar_l, eps), 2)
        z = cast(z, compute_dtype, loss_dtype)
        terms["kl"] = plan.one("mean", (kl,))
    with_pixel = "pixel" in weights.get("encoder", weights.get("decoder", {}))
    pixel_weight = weights.get("decoder", {}).get("pixel", 0.0)
    if mode == "vaegan":
        dec_in, dec_rows = plan.one("cat", (Z_PRIOR, z)), 2 * B
    elif mode == "vae":
        dec_in, dec_rows = z, B
    else:
        dec_in, dec_rows = Z_PRIOR, B
    # Two groups in the decoder (prior, reconstruction) when it sees both: a norm keeps their statistics apart.
    dec_groups = 2 if mode == "vaegan" else 1
    (logits,) = forward(DECODER, dec_in, dec_rows, dec_groups)
    with_real = mode != "vae"
    dis_in, images, pixel = plan.emit("image_head", (logits, X), 3, ints=(int(with_real), int(with_pixel)))
    if with_pixel:
        terms["pixel"] = cast(pixel, loss_dtype, compute_dtype)

    if "discriminator" in weights:
        dis_rows = 3 * B if mode == "vaegan" else 2 * B
        dis_group = B if config["discriminator_norm"] == "separate" else dis_rows  # rows per norm group
        dis_specs = specs[DISCRIMINATOR]
        with_tap = mode == "vaegan"
        outs = forward(DISCRIMINATOR, dis_in, dis_rows, dis_rows // dis_group, tap if with_tap else None)
        scores = plan.one("view_rows", (outs[0],))  # [N, 1] -> [N]
        scores = cast(scores, loss_dtype, compute_dtype)
        s_real = plan.one("rows", (scores,), ints=(0, B))
        s_prior = plan.one("rows", (scores,), ints=(B, 2 * B))
        fakes = [s_prior]
        recon_as_fake = mode == "vaegan" and config["recon_as_fake"]
        if recon_as_fake:
            fakes.append(plan.one("rows", (scores,), ints=(2 * B, 3 * B)))
        fakes_end = B + B * len(fakes)
        n = len(fakes)
        terms["disc"], d_seed = plan.emit("softplus", (s_real, *fakes), 2, floats=(-1.0, *[1.0] * n, 1.0, *[1.0] * n))
        if config["saturating"]:
            terms["generator"], g_seed = plan.emit("softplus", fakes, 2, floats=(*[1.0] * n, *[-1.0] * n))
        else:
            terms["generator"], g_seed = plan.emit("softplus", fakes, 2, floats=(*[-1.0] * n, *[1.0] * n))
        d_real = plan.one("softplus_mean", (s_real,), floats=(-1.0,))
        d_fake = plan.one("softplus_mean", (s_prior,), floats=(1.0,))
        plan.outputs.update(d_real=d_real, d_fake=d_fake)
        top = len(dis_specs) - 1
        if mode == "vaegan":
            tap_layer, tap_point = tap
            pre = tap_point == "pre_norm"
            features = outs[1]
            f_real = plan.one("rows", (features,), ints=(0, B))
            f_rec = plan.one("rows", (features,), ints=(2 * B, 3 * B))
            fr = cast(plan.one("view_rows", (f_real,)), loss_dtype, compute_dtype)
            ff = cast(plan.one("view_rows", (f_rec,)), loss_dtype, compute_dtype)
            terms["llike"], grad_real = plan.emit("feature_recon", (fr, ff), 2)
            # With a coupling layer at or below the tap whose groups span the sets, the real rows' features
            # depend on the fakes too: the seed covers [x; x_p; x_rec] (zeros on x_p), else the reconstruction
            # rows alone.
            u_full = dis_group > B and _couples_at_or_below(dis_specs, tap_layer, pre)
            u_rows_seed = (0, 3 * B) if u_full else (2 * B, 3 * B)
            # The decoder's share of the feature term, gamma U, can ride on G from the tap down when G covers
            # those rows there anyway (reconstructions as fakes, or a coupling layer): one stream less through
            # the lower layers for the decoder, and U then runs for the encoder's reconstruction rows alone.
            g_rows_at_tap = stream_rows(dis_specs, top, (B, fakes_end), dis_group, False, False, (B, dis_rows))[0][
                tap_layer]
            gamma, enc_llike = weights["decoder"]["llike"], weights["encoder"]["llike"]
            # The image head's backward hands the encoder U times 1 and the decoder U times a coefficient. With
            # the encoder's weight w of the feature term (encoder_llike_weight), U's seed is the encoder's (w
            # times the term's gradient) and the decoder reads it times gamma / w; joined, G carries the
            # decoder's gamma times the unweighted seed. With w = 0 the encoder reads no U (its upstream is the
            # pixel term alone) and U is the decoder's: no join then.
            join = (enc_llike > 0 and not pre and g_rows_at_tap[0] <= u_rows_seed[0]
                    and u_rows_seed[1] <= g_rows_at_tap[1])
            u_seed = u_enc = None
            if join or enc_llike in (0.0, 1.0):
                u_seed = u_enc = seeded(plan.one("u_seed", (grad_real,), ints=(int(u_full),)))
            if enc_llike not in (0.0, 1.0):
                weighted = plan.one("combine", (grad_real,), floats=(enc_llike,))
                u_enc = seeded(plan.one("u_seed", (weighted,), ints=(int(u_full),)))
        # ---- discriminator streams
        # The decoder needs the discriminator's input gradients on the image rows alone: [x_p (; x_rec)].
        images_rows = (B, dis_rows)
        d_seed, g_seed = seeded(d_seed), seeded(g_seed)
        # The discriminator gives one score per row, so above the highest layer where D and G must part (a layer
        # that couples rows, or where the feature term joins G) each row's gradient is its seed times the same
        # gradient of its score: "V", the stream of a seed of ones, runs there once, the weight gradients reading
        # its output gradients times L_D's seed, and D and G start below it from V times their seeds.
        part = max([i for i, sp in enumerate(dis_specs) if sp.couples_rows] +
                   [tap_layer if mode == "vaegan" and join else -1])
        g_top, g_from = g_seed, top
        if part < top:
            v_out = (0, fakes_end) if part >= 0 else images_rows
            v_dx, v_rows = backward("V", DISCRIMINATOR, d_seed, (0, fakes_end), top, dis_group, True, v_out,
                                    bottom=part + 1, unit_seed=True)
            g_v = plan.one("rows", (v_dx,), ints=(B - v_rows[0], fakes_end - v_rows[0]))
            g_top, g_from = plan.one("scale_rows", (g_v, g_seed)), part
            if part >= 0:
                d_seed = plan.one("scale_rows", (v_dx, d_seed))
        if part >= 0:  # (part = -1: V formed every weight gradient)
            backward("D", DISCRIMINATOR, d_seed, (0, fakes_end), g_from, dis_group, True)

        def g_stream(join_=None):
            if g_from < 0:  # V reached the input: G's input gradient is V's times its seed
                return g_top, (B, fakes_end)
            return backward("G" if join_ is None else "G+U", DISCRIMINATOR, g_top, (B, fakes_end), g_from,
                            dis_group, False, images_rows, join=join_)
        if mode == "vaegan":
            if join:  # the decoder's gamma U on G from the tap down; U for the encoder's rows alone
                g_dx, g_rows = g_stream((u_seed, tap_layer, u_rows_seed, gamma))
                u_dx, u_rows = backward("U", DISCRIMINATOR, u_enc, u_rows_seed, tap_layer, dis_group, False,
                                        (2 * B, 3 * B), entry_pre_norm=pre)
                dec_u = 0.0
            else:
                g_dx, g_rows = g_stream()
                u_dx, u_rows = backward("U", DISCRIMINATOR, u_enc, u_rows_seed, tap_layer, dis_group, False,
                                        images_rows, entry_pre_norm=pre)
                dec_u = gamma / enc_llike if enc_llike > 0 else gamma
            # Through the sigmoid into the decoder's logits ([prior; reconstruction]), with the pixel term.
            g_img = plan.one("rows", (g_dx,), ints=(B - g_rows[0], g_rows[1] - g_rows[0]))
            u_img = plan.one("rows", (u_dx,), ints=(max(B, u_rows[0]) - u_rows[0], u_rows[1] - u_rows[0]))
            g_has_rec = g_rows[1] == 3 * B
            u_has_prior = u_rows[0] <= B
            dec_up, enc_up = plan.emit(
                "image_head_backward", (images, X, g_img, u_img, *((LOSS_SCALE,) if scale_seeds else ())), 2,
                ints=(int(g_has_rec), int(u_has_prior), int(scale_seeds)),
                floats=(dec_u, pixel_weight / B))
            if enc_llike == 0:  # the encoder's upstream without U: the pixel term's gradient alone
                rec = plan.one("rows", (images,), ints=(B, 2 * B))
                enc_up = plan.one("pixel_grad", (rec, X, *((LOSS_SCALE,) if scale_seeds else ())),
                                  ints=(int(scale_seeds),), floats=(pixel_weight / B,))
        else:
            g_dx, g_rows = g_stream()
        if mode == "gan":  # the generator's gradient through the sigmoid, on the prior rows
            g_img = plan.one("rows", (g_dx,), ints=(B - g_rows[0], g_rows[1] - g_rows[0]))
            dec_up = plan.one("sigmoid_backward", (images, g_img))
    else:  # vae: the pixel term alone, at the logits
        dec_up = plan.one("pixel_grad", (images, X, *((LOSS_SCALE,) if scale_seeds else ())),
                          ints=(int(scale_seeds),), floats=(pixel_weight / B,))
        enc_up = dec_up

    # ---- decoder streams
    dec_top = len(specs[DECODER]) - 1
    if mode == "vae":  # one upstream for both: weights and the input gradient in one stream
        dz, _ = backward("Dd+E", DECODER, dec_up, (0, B), dec_top, B, True, (0, B))
    else:
        backward("Dd", DECODER, dec_up, (0, dec_rows), dec_top, B, True)
        if mode == "vaegan":  # the z rows are the second group whole: no coupling reaches outside them
            dz, _ = backward("E", DECODER, enc_up, (B, 2 * B), dec_top, B, False, (B, 2 * B))

    # ---- encoder: the reparameterization, the KL and the clamp, then its layers
    if "encoder" in weights:
        dz_l = cast(dz, loss_dtype, compute_dtype)
        d_mu, d_logvar = plan.emit("reparam_backward", (mu_l, logvar_l, eps, dz_l, kl,
                                                        *((LOSS_SCALE,) if scale_seeds else ())), 2,
                                   ints=(int(scale_seeds),), floats=(weights["encoder"]["kl"] / B,))
        d_logvar = plan.one("clamp_backward", (d_logvar, logvar_raw), floats=(LOGVAR_MIN, LOGVAR_MAX))
        seed = cast(plan.one("cat_cols", (d_mu, d_logvar)), compute_dtype, loss_dtype)
        backward("Enc", ENCODER, seed, (0, B), len(specs[ENCODER]) - 1, B, True)

    # ---- the losses, combined once from LOSSES
    for net, ws in weights.items():
        names = list(ws)
        plan.outputs[net] = plan.one("combine", [terms[t] for t in names], floats=[ws[t] for t in names])
    for name in ("kl", "llike", "pixel", "generator"):
        if name in terms:
            plan.outputs[name] = terms[name]
    return plan


DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
