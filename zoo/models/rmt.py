"""RMT: the Recurrent Memory Transformer, decoder (causal) variant.

Paper: A. Bulatov, Y. Kuratov, M. Burtsev, "Recurrent Memory Transformer" (NeurIPS 2022), the
decoder-only memory layout; compare github:booydar/recurrent-memory-transformer and
github:lucidrains/recurrent-memory-transformer-pytorch. The sequence is read in segments
X_τ of L = ``segment_size`` tokens. M_τ [m, D] (m = ``n_memory`` vectors) is placed both before the
segment (read memory) and after it (write memory); a small causal Transformer runs over the
m + L + m positions, and the outputs at the write positions are the next memory::

    H⁰_τ = [M_τ + P_read ; X_τ W_in + P_tok ; M_τ + P_write]          learned position embeddings
    Hˡ = Hˡ⁻¹ + MHA_causal(LN(Hˡ⁻¹)),  Hˡ ← Hˡ + MLP(LN(Hˡ))           l = 1 .. n_layers (pre-norm)
    [_ ; Y_τ ; M_{τ+1}] = LN_f(H^{n_layers})
    M_0 = learned initial memory

Gradients flow through the memory from segment to segment (full BPTT; no truncation). Token j
of segment τ sees only M_τ (built from complete earlier segments) and tokens ≤ j of X_τ.

State (float32): ``{"memory": [B, m, D], "buffer": [B, L, D], "count": [B]}``: the memory that
the current segment reads, the embedded tokens X W_in seen so far in the current segment (zeros
past ``count``), and the number of them, stored as an exact integer read with ``floor``
(``zoo.models._segment_common``). ``step`` writes the token into the buffer and re-runs the
segment's Transformer over [M; buffer; M] (causal, so the empty slots after the token do not
matter) for the token's output; when the segment fills, the write outputs become the new memory
and the buffer empties. Decoding thus costs O((2m + L)² D) per token and O(L D) state.

Modes: ``"chunked"`` (``"auto"``) runs whole segments under ``lax.scan`` when every row enters
at a segment start and no ``reset`` is given; otherwise (and always in ``"sequential"``) ``apply``
folds ``step`` over time. A reset starts a new segment from the fresh state at that token;
``reverse=True`` runs time backwards.

Choices where the sources differ:

* The write memory input is M_τ itself (the paper's decoder layout: the same memory tokens at
  both ends). lucidrains' version feeds learned write tokens instead and lets the read memory
  attend to itself bidirectionally; here the whole [M; X; M] is plainly causal, as in the
  paper's GPT-2 set-up.
* Positions: learned absolute embeddings for the token slots and the two memory blocks (the
  paper's GPT-2 has absolute positions too). The memory is taken after the final LayerNorm (as
  lucidrains does), which keeps its scale fixed across many segments.
* An input projection W_in (d_in -> D) replaces the token embedding, so the model takes vectors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from zoo.combinators import layer_norm, norm_init
from zoo.contract import make_recurrence
from zoo.models._common import dense_init
from zoo.models._matrix_common import (
    check_positive_float,
    check_positive_int,
    merge_heads,
    project,
    split_heads,
)
from zoo.models._segment_common import (
    MODES,
    attention,
    check_heads,
    mlp_hidden,
    mlp_init,
    mlp_output,
    read_count,
    run_segments,
)
from zoo.registry import register


@dataclasses.dataclass(frozen=True)
class RMTConfig:
    d_model: int = 16           # D
    n_heads: int = 2            # heads of width D / n_heads
    n_layers: int = 2
    segment_size: int = 4       # L tokens per segment
    n_memory: int = 2           # m memory vectors
    mlp_ratio: float = 2.0      # MLP hidden width = mlp_ratio * D
    memory_init_std: float = 0.02   # scale of the learned initial memory (lucidrains' 0.02)

    def __post_init__(self):
        check_heads("rmt", self.d_model, self.n_heads)
        for name in ("n_layers", "segment_size", "n_memory"):
            check_positive_int("rmt", name, getattr(self, name))
        check_positive_float("rmt", "mlp_ratio", self.mlp_ratio)
        check_positive_float("rmt", "memory_init_std", self.memory_init_std)

    @property
    def d_mlp(self) -> int:
        return max(1, int(round(self.mlp_ratio * self.d_model)))


def _state_size(c: RMTConfig) -> int:
    return c.n_memory * c.d_model + c.segment_size * c.d_model + 1


def causal_mask(size: int) -> jax.Array:
    return jnp.tril(jnp.ones((size, size), bool))


@register("rmt", config=RMTConfig, paper="Recurrent Memory Transformer", engine="nonlinear",
          modes=MODES, state_size=_state_size)
def build(config: RMTConfig):
    d, m, seg = config.d_model, config.n_memory, config.segment_size
    n_heads = config.n_heads

    def init(key, d_in):
        keys = jax.random.split(key, 4)

        def layer_init(k):
            k_qkv, k_o, k_mlp = jax.random.split(k, 3)
            return {"attn_norm": norm_init("layer", d), "w_qkv": dense_init(k_qkv, d, 3 * d),
                    "w_o": dense_init(k_o, d, d), "mlp_norm": norm_init("layer", d),
                    "mlp": mlp_init(k_mlp, d, config.d_mlp)}

        # The layers' params stacked on a leading axis, run by lax.scan (one compiled layer body).
        layers = jax.vmap(layer_init)(jax.random.split(keys[3], config.n_layers))
        return {
            "w_in": dense_init(keys[0], d_in, d),
            "memory_init": config.memory_init_std * jax.random.normal(keys[1], (m, d), jnp.float32),
            # Slot embeddings of [read memory; tokens; write memory].
            "positions": 0.02 * jax.random.normal(keys[2], (2 * m + seg, d), jnp.float32),
            "layers": layers,
            "final_norm": norm_init("layer", d),
        }

    def transformer(params, memory, tokens):
        """memory [B, m, D] float32, tokens [B, L, D] embedded (compute dtype) -> (Y [B, L, D],
        next memory [B, m, D] float32)."""
        dtype = tokens.dtype
        mem = memory.astype(dtype)
        h = jnp.concatenate([mem, tokens, mem], axis=1) + params["positions"].astype(dtype)
        mask = causal_mask(2 * m + seg)

        def layer_body(h, layer):
            qkv = project(layer_norm(layer["attn_norm"], h), layer["w_qkv"])
            q, k, v = (split_heads(part, n_heads) for part in jnp.split(qkv, 3, axis=-1))
            h = h + project(merge_heads(attention(q, k, v, mask=mask)), layer["w_o"])
            hidden = mlp_hidden(layer["mlp"], layer_norm(layer["mlp_norm"], h))
            return h + mlp_output(layer["mlp"], hidden), None

        h, _ = lax.scan(layer_body, h, params["layers"])
        h = layer_norm(params["final_norm"], h)
        return h[:, m:m + seg], h[:, m + seg:].astype(jnp.float32)

    def initial_state(params, batch):
        return {"memory": jnp.broadcast_to(params["memory_init"], (batch, m, d)).astype(jnp.float32),
                "buffer": jnp.zeros((batch, seg, d), jnp.float32),
                "count": jnp.zeros((batch,), jnp.float32)}

    def step(params, state, x_t):
        dtype = x_t.dtype
        at = read_count(state["count"], seg)                                  # [B]
        slots = jnp.arange(seg)[None, :]
        token = project(x_t, params["w_in"]).astype(jnp.float32)
        buffer = jnp.where((slots == at[:, None])[..., None], token[:, None], state["buffer"])
        buffer = jnp.where((slots <= at[:, None])[..., None], buffer, 0.0)   # empty past the token
        ys, written = transformer(params, state["memory"], buffer.astype(dtype))
        y_t = jnp.take_along_axis(ys, at[:, None, None], axis=1)[:, 0]
        full = (at == seg - 1)[:, None, None]
        new = {"memory": jnp.where(full, written, state["memory"]),
               "buffer": jnp.where(full, 0.0, buffer),
               "count": jnp.where(full[:, 0, 0], 0.0, (at + 1).astype(jnp.float32))}
        return new, y_t

    def aligned(params, xs, state):
        """Whole segments from a segment start: lax.scan over them (the last may be partial; its
        write outputs are dropped, and its tokens stay in the buffer)."""
        batch, time = xs.shape[:2]
        n_seg = -(-time // seg)
        tokens = project(xs, params["w_in"])
        padded = jnp.pad(tokens, ((0, 0), (0, n_seg * seg - time), (0, 0)))
        by_segment = jnp.swapaxes(padded.reshape(batch, n_seg, seg, d), 0, 1)
        complete = jnp.arange(n_seg) < time // seg

        def body(memory, inputs):
            segment, is_complete = inputs
            ys, written = transformer(params, memory, segment)
            return jnp.where(is_complete, written, memory), ys

        memory, ys = lax.scan(body, state["memory"], (by_segment, complete))
        ys = jnp.swapaxes(ys, 0, 1).reshape(batch, n_seg * seg, d)[:, :time]
        left = time % seg
        buffer = jnp.zeros((batch, seg, d), jnp.float32)
        if left:
            buffer = buffer.at[:, :left].set(tokens[:, time - left:].astype(jnp.float32))
        final = {"memory": memory, "buffer": buffer, "count": jnp.full((batch,), float(left), jnp.float32)}
        return ys, final

    def apply(params, xs, state, reset, mode, reverse):
        fresh = initial_state(params, xs.shape[0])
        return run_segments(step, aligned, params, xs, state, reset, mode, reverse, fresh=fresh, size=seg)

    step_jit, apply_jit = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("rmt", init=init, initial_state=initial_state, step=step_jit, apply=apply_jit,
                           input_width=lambda params: params["w_in"].shape[0], modes=MODES,
                           default_d_in=d)
