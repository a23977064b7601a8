"""Combinators: recurrences built from recurrences, in the manner of ``optax.chain``.

Each takes ``Recurrence`` values and returns a ``Recurrence`` that passes the same contract as a
registered model (same four functions, same checks, float32 states)::

    rec = zoo.stack(zoo.residual(zoo.get("lstm")), zoo.residual(zoo.get("lru")))
    params = rec.init(key, d_in)          # a tuple, one entry per layer
    ys, state = rec.apply(params, xs)     # state: a tuple, one entry per layer

* ``stack(*recs)``: layer l's outputs are layer l+1's inputs.
* ``residual(mixer)``: the pre-norm block ``h = x + mixer(norm(x))``, ``y = h + mlp(norm(h))``.
* ``hybrid(mixers, pattern, repeat=)``: residual layers whose mixers follow a pattern, e.g.
  ``hybrid({"mamba": m, "swa": a}, "mamba,swa", repeat=2)`` (Samba), stacked.
* ``bidirectional(forward, backward)``: one half reads time forwards, the other backwards, and the
  outputs are concatenated or summed. It reads the future, so it has no ``step`` (``causal=False``).

Norms and MLPs are written in jnp here (models and combinators never import Flax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.contract import AUTO, Recurrence, make_recurrence, output_width
from zoo.models._common import cast, dense_init

NORMS = ("rms", "layer")
MLPS = ("gelu", "swiglu")
MERGES = ("concat", "sum")


# --------------------------------------------------------------------------------------------
# Shared pieces.


def _union_modes(recs) -> tuple[str, ...]:
    modes: list[str] = []
    for rec in recs:
        modes += [m for m in rec.modes if m not in modes]
    return tuple(modes)


def _mode_for(rec: Recurrence, mode: str) -> str:
    """A named mode goes to the parts that have it; the others choose their own ("auto")."""
    return mode if mode in rec.modes else AUTO


def norm_init(kind: str, d: int) -> dict:
    if kind == "rms":
        return {"scale": jnp.ones((d,), jnp.float32)}
    return {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}


def rms_norm(params: dict, x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / rms(x) * scale over the last axis; statistics in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * params["scale"]).astype(x.dtype)


def layer_norm(params: dict, x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """(x - mean) / std * scale + bias over the last axis; statistics in float32."""
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return (y * params["scale"] + params["bias"]).astype(x.dtype)


def norm_apply(params: dict, x: jax.Array) -> jax.Array:
    return layer_norm(params, x) if "bias" in params else rms_norm(params, x)


def mlp_init(key: jax.Array, kind: str, d: int, ratio: float) -> dict:
    """GeLU MLP with hidden width ratio*d, or SwiGLU with 2/3 of that (the same parameter count)."""
    k1, k2, k3 = jax.random.split(key, 3)
    if kind == "gelu":
        hidden = max(1, int(round(ratio * d)))
        return {"w_in": dense_init(k1, d, hidden), "b_in": jnp.zeros((hidden,)),
                "w_out": dense_init(k2, hidden, d), "b_out": jnp.zeros((d,))}
    hidden = max(1, int(round(2 * ratio * d / 3)))
    return {"w_gate": dense_init(k1, d, hidden), "w_up": dense_init(k2, d, hidden),
            "w_down": dense_init(k3, hidden, d)}


def mlp_apply(params: dict, x: jax.Array) -> jax.Array:
    p = cast(params, x.dtype)
    if "w_gate" in p:
        return (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]
    return jax.nn.gelu(x @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]


# --------------------------------------------------------------------------------------------
# stack


def stack(*recs: Recurrence) -> Recurrence:
    """Layer l's outputs feed layer l+1. Params and state are tuples in layer order.

    A named ``mode`` goes to every layer that lists it; the other layers use ``"auto"``.
    ``reset`` and ``reverse`` go to every layer.
    """
    if not recs:
        raise ValueError("stack: needs at least one recurrence")
    for i, rec in enumerate(recs):
        if not isinstance(rec, Recurrence):
            raise TypeError(f"stack: argument {i} is a {type(rec).__name__}, not a zoo.Recurrence")
    return _stack(recs, f"stack({', '.join(rec.name or '?' for rec in recs)})")


def _stack(recs, name: str) -> Recurrence:
    """``stack`` of checked recurrences under the given name (its error messages use it)."""

    def init(key, d_in):
        params = []
        for rec, k in zip(recs, jax.random.split(key, len(recs)), strict=True):
            p = rec.init(k, d_in)
            params.append(p)
            d_in = output_width(rec, p, d_in)
        return tuple(params)

    def initial_state(params, batch):
        return tuple(rec.initial_state(p, batch) for rec, p in zip(recs, params, strict=True))

    def step(params, state, x_t):
        new_state = []
        for rec, p, s in zip(recs, params, state, strict=True):
            s, x_t = rec.step(p, s, x_t)
            new_state.append(s)
        return tuple(new_state), x_t

    def apply(params, xs, state, reset, mode, reverse):
        final = []
        for rec, p, s in zip(recs, params, state, strict=True):
            xs, s = rec.apply(p, xs, state=s, reset=reset, mode=_mode_for(rec, mode), reverse=reverse)
            final.append(s)
        return xs, tuple(final)

    # The first layer checks the input width itself: its params are opaque here.
    rec = make_recurrence(name, init=init, initial_state=initial_state, step=step, apply=apply,
                          input_width=lambda params: None, modes=_union_modes(recs))
    return rec._replace(causal=all(r.causal for r in recs))


# --------------------------------------------------------------------------------------------
# residual


def residual(mixer: Recurrence, *, mlp_ratio: float = 4, norm: str = "rms",
             mlp: str = "swiglu") -> Recurrence:
    """The pre-norm residual block around a sequence mixer::

        h = x + proj(mixer(norm_1(x)))       proj only when the mixer's width differs from x's
        y = h + mlp(norm_2(h))               dropped when mlp_ratio == 0

    ``norm`` is "rms" (RMSNorm) or "layer" (LayerNorm); ``mlp`` is "swiglu" (hidden width
    2/3 * mlp_ratio * D, the parameter count of a GeLU MLP of ratio mlp_ratio) or "gelu".
    The state is the mixer's state.
    """
    if not isinstance(mixer, Recurrence):
        raise TypeError(f"residual: mixer is a {type(mixer).__name__}, not a zoo.Recurrence")
    if norm not in NORMS:
        raise ValueError(f"residual: norm={norm!r}; choose one of {NORMS}")
    if mlp not in MLPS:
        raise ValueError(f"residual: mlp={mlp!r}; choose one of {MLPS}")
    if not mlp_ratio >= 0:
        raise ValueError(f"residual: mlp_ratio must be >= 0, got {mlp_ratio!r}")
    name = f"residual({mixer.name or '?'})"

    def init(key, d_in):
        k_mix, k_proj, k_mlp = jax.random.split(key, 3)
        params = {"mixer_norm": norm_init(norm, d_in), "mixer": mixer.init(k_mix, d_in)}
        d_mix = output_width(mixer, params["mixer"], d_in)
        if d_mix != d_in:
            params["out_proj"] = dense_init(k_proj, d_mix, d_in)
        if mlp_ratio > 0:
            params["mlp_norm"] = norm_init(norm, d_in)
            params["mlp"] = mlp_init(k_mlp, mlp, d_in, mlp_ratio)
        return params

    def around_mixer(params, x, y):
        """The rest of the block once the mixer's output y is known (any leading axes)."""
        if "out_proj" in params:
            y = y @ params["out_proj"].astype(y.dtype)
        h = x + y.astype(x.dtype)
        if "mlp" in params:
            h = h + mlp_apply(params["mlp"], norm_apply(params["mlp_norm"], h))
        return h

    def initial_state(params, batch):
        return mixer.initial_state(params["mixer"], batch)

    def step(params, state, x_t):
        state, y_t = mixer.step(params["mixer"], state, norm_apply(params["mixer_norm"], x_t))
        return state, around_mixer(params, x_t, y_t)

    def apply(params, xs, state, reset, mode, reverse):
        ys, state = mixer.apply(params["mixer"], norm_apply(params["mixer_norm"], xs), state=state,
                                reset=reset, mode=mode, reverse=reverse)
        return around_mixer(params, xs, ys), state

    rec = make_recurrence(name, init=init, initial_state=initial_state, step=step, apply=apply,
                          input_width=lambda params: params["mixer_norm"]["scale"].shape[0],
                          modes=mixer.modes)
    return rec._replace(causal=mixer.causal)


# --------------------------------------------------------------------------------------------
# hybrid


def _parse_pattern(pattern, names) -> tuple[str, ...]:
    """``"a,b"`` or ``("a", "b")`` -> ``("a", "b")``; every entry must be a key of ``mixers``."""
    if isinstance(pattern, str):
        entries = [entry.strip() for entry in pattern.split(",")]
    elif isinstance(pattern, (list, tuple)):
        entries = list(pattern)
    else:
        raise ValueError(f"hybrid: pattern must be a comma-separated str such as 'mamba,swa' or a "
                         f"sequence of names, got {type(pattern).__name__} {pattern!r}")
    if not pattern or any(not isinstance(e, str) or not e for e in entries):
        raise ValueError(f"hybrid: pattern={pattern!r} has an empty or non-str entry; it needs one "
                         f"name of mixers {tuple(names)} per layer")
    unknown = [e for e in entries if e not in names]
    if unknown:
        raise ValueError(f"hybrid: pattern={pattern!r} names {unknown}, not keys of mixers "
                         f"{tuple(names)}")
    return tuple(entries)


def hybrid(mixers, pattern=None, *, repeat: int = 1, mlp_ratio: float = 4, norm: str = "rms",
           mlp: str = "swiglu") -> Recurrence:
    """A stack of pre-norm residual layers whose mixers follow a pattern (Griffin, Samba, Jamba)::

        rec = zoo.hybrid({"mamba": zoo.get("mamba", d_model=64), "swa": swa}, "mamba,swa", repeat=4)
        rec = zoo.hybrid([zoo.get("mamba", d_model=64), swa], repeat=4)        # the same layers

    ``mixers`` is either a dict of named mixers, with ``pattern`` the layer order as a
    comma-separated string (``"rnn,rnn,attn"``) or a sequence of those names; or a list/tuple of
    mixers, one per layer, with no ``pattern`` (a single mixer is a list of one). The period is
    repeated ``repeat`` times, so Griffin's (recurrent, recurrent, attention) × 4 is
    ``pattern="rnn,rnn,attn", repeat=4``. Mixers the pattern does not name are ignored.

    Each layer is ``residual(mixer, mlp_ratio=..., norm=..., mlp=...)`` (norm + mixer + add, then
    norm + MLP + add) with its own params, even where the pattern names a mixer twice: a
    Recurrence is a set of functions, and ``init`` draws every layer's weights afresh. The result is
    ``stack`` of those layers: params and state are tuples with one entry per layer in order, the
    modes are the union of the mixers' modes (a named mode goes to the layers that have it, the
    others use "auto"), and it is causal when every mixer is.
    """
    if isinstance(mixers, Recurrence):       # a NamedTuple: tell it from a list of mixers first
        mixers = [mixers]
    if isinstance(mixers, dict):
        if not mixers:
            raise ValueError("hybrid: mixers is an empty dict; give at least one named mixer")
        if pattern is None:
            raise ValueError(f"hybrid: pattern is needed with a dict of mixers (the layer order, e.g. "
                             f"{','.join(mixers)!r})")
        names = _parse_pattern(pattern, tuple(mixers))
        period = [mixers[n] for n in names]
        labels = list(names)
        where = [f"mixers[{n!r}]" for n in names]
    elif isinstance(mixers, (list, tuple)):
        if pattern is not None:
            raise ValueError(f"hybrid: pattern={pattern!r} applies to a dict of named mixers; with a "
                             f"list the list itself is the layer order")
        if not mixers:
            raise ValueError("hybrid: mixers is empty; give at least one mixer")
        period = list(mixers)
        labels = [getattr(m, "name", "") or "?" for m in period]
        where = [f"mixers[{i}]" for i in range(len(period))]
    else:
        raise TypeError(f"hybrid: mixers must be a dict of named zoo.Recurrence (with pattern=) or a "
                        f"list of them, got {type(mixers).__name__}")
    for arg, rec in zip(where, period, strict=True):
        if not isinstance(rec, Recurrence):
            raise TypeError(f"hybrid: {arg} is a {type(rec).__name__}, not a zoo.Recurrence")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"hybrid: repeat must be a positive int, got {repeat!r}")
    layers = [residual(rec, mlp_ratio=mlp_ratio, norm=norm, mlp=mlp) for rec in period] * repeat
    times = f"x{repeat}" if repeat > 1 else ""
    return _stack(layers, f"hybrid({','.join(labels)}){times}")


# --------------------------------------------------------------------------------------------
# bidirectional


def bidirectional(forward: Recurrence, backward: Recurrence | None = None,
                  merge: str = "concat") -> Recurrence:
    """Run ``forward`` over time and ``backward`` with ``reverse=True``, then merge the outputs.

    ``backward`` defaults to another copy of ``forward`` (same kind, its own params). Params are
    ``{"forward", "backward"}`` and the state is the tuple ``(forward_state, backward_state)``; the
    backward half's final state is its state after reading x_0. ``merge`` is "concat" (width
    D_f + D_b) or "sum" (the widths must agree). The result reads the future, so it is not
    causal: ``step`` raises, and ``causal=False`` says so.
    """
    backward = forward if backward is None else backward
    for arg, rec in (("forward", forward), ("backward", backward)):
        if not isinstance(rec, Recurrence):
            raise TypeError(f"bidirectional: {arg} is a {type(rec).__name__}, not a zoo.Recurrence")
    if merge not in MERGES:
        raise ValueError(f"bidirectional: merge={merge!r}; choose one of {MERGES}")
    name = f"bidirectional({forward.name or '?'}, {backward.name or '?'})"

    def init(key, d_in):
        k_f, k_b = jax.random.split(key)
        params = {"forward": forward.init(k_f, d_in), "backward": backward.init(k_b, d_in)}
        if merge == "sum":
            d_f = output_width(forward, params["forward"], d_in)
            d_b = output_width(backward, params["backward"], d_in)
            if d_f != d_b:
                raise ValueError(f"{name}: merge='sum' needs equal widths, but forward gives {d_f} "
                                 f"and backward gives {d_b}")
        return params

    def initial_state(params, batch):
        return (forward.initial_state(params["forward"], batch),
                backward.initial_state(params["backward"], batch))

    def step(params, state, x_t):
        raise TypeError(f"{name}: step is undefined because the backward half reads the future; "
                        f"use apply over the whole sequence (this recurrence has causal=False)")

    def apply(params, xs, state, reset, mode, reverse):
        ys_f, s_f = forward.apply(params["forward"], xs, state=state[0], reset=reset,
                                  mode=_mode_for(forward, mode), reverse=reverse)
        ys_b, s_b = backward.apply(params["backward"], xs, state=state[1], reset=reset,
                                   mode=_mode_for(backward, mode), reverse=not reverse)
        ys = ys_f + ys_b if merge == "sum" else jnp.concatenate([ys_f, ys_b], axis=-1)
        return ys, (s_f, s_b)

    rec = make_recurrence(name, init=init, initial_state=initial_state, step=step, apply=apply,
                          input_width=lambda params: None, modes=_union_modes((forward, backward)))
    # step raises before any input check: no input could make it defined.
    return rec._replace(step=step, causal=False)
