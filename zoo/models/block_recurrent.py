"""Block-Recurrent Transformer: one recurrent Transformer layer over blocks of W tokens.

Paper: D. Hutchins, I. Schlag, Y. Wu, E. Dyer, B. Neyshabur, "Block-Recurrent Transformers"
(NeurIPS 2022); reference code github:google-research/meliad (``transformer_layer.py`` with
``recurrent_attention``, ``transformer_base.py``, and the gates of ``nn_components.MLP``). A state
of S = ``n_states`` memory vectors C ∈ R^{S×D} is carried from block to block (D = d_model,
H heads of width K = D/H, u = LN(·) a LayerNorm)::

  vertical (tokens t of block τ; h_t = x_t W_in):
    q, k, v, q₂ = u(h_t) [W_q, W_k, W_v, W_q2]
    a_t = softmax attention of q over the keys t-W .. t (sliding window, zoo.ops.softmax)
    c_t = softmax attention of q₂ over the state's keys/values k_C, v_C (below)
    h'_t = h_t + [a_t ; c_t] W_o;   y_t = h'_t + MLP(u(h'_t))
  horizontal (the state, once block τ is complete):
    q_C, k_C, v_C, q₂_C = (u(C) + P) [U_q, U_k, U_v, U_q2]           P: learned state positions
    z = [attn(q_C; k_C, v_C) ; attn(q₂_C; k_block, v_block)] U_o + b_o
    C' = gate₁(C, z);   C_next = gate₂(C', MLP(u(C')))                 (meliad's "dual" gates)
  gates:
    "fixed":  g = σ(b_g),  gate(C, z) = C ⊙ g + z ⊙ (1 - g)
    "lstm":   f = σ(h W_f + b_f + 1),  i = σ(h W_i + b_i - 1),  gate(C, z) = C ⊙ f + z ⊙ i
              (h: the input of z's last linear map, as in meliad's MLP._gate)

Weight sharing as in meliad: the token keys/values serve both the tokens' self-attention and the
state's cross-attention; the state keys/values serve both the state's self-attention and the
tokens' cross-attention. Tokens of block τ read the state C_τ built from the complete blocks
before τ, so the layer is causal. The initial state C_0 is learned.

State (float32): ``{"memory": [B, S, D], "window": {"keys": [B, W, H, K], "values": [B, W, H, K],
"valid": [B, W]}, "count": [B]}``: the state vectors of the current block, the sliding window of
``zoo.ops.softmax`` (the last W keys and values; at a block's end exactly that block's keys), and
the position in the block as an exact integer read with ``floor``. ``step`` is exact and O(W + S)
per token: attention over the window, cross-attention to C, and the state update when the block
fills.

Modes: ``"chunked"`` (``"auto"``): the sliding-window attention in the engine's chunked form over
the whole sequence, the state updates as a ``lax.scan`` over blocks, and everything else per
token in parallel, when every row enters at a block start and no ``reset`` is given; otherwise (and
always in ``"sequential"``) ``apply`` folds ``step`` over time (``zoo.models._segment_common``).
A reset starts a new block from the fresh state; ``reverse=True`` runs time backwards.

Differences from meliad, and why:

* The window: query t sees keys t-W .. t (its own included, as in ``zoo.ops.softmax``); meliad's
  causal mask sees t-W .. t-1 (not itself). The state's cross-attention reads the block's own W
  keys; meliad's also reads the previous block's (its ``keys_w`` is the window pair).
* Keys and queries are scaled by K^-1/2; meliad normalises them and learns the temperature. No
  relative position bias (meliad's T5 bias) and no dropout. LayerNorm with mean and bias, and a
  GeLU MLP; meliad's default norm skips the mean and bias, and its MLP uses ReLU.
* An input projection W_in (d_in -> D) so the layer takes vectors.
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
from zoo.ops import softmax
from zoo.registry import register

GATES = ("fixed", "lstm")


@dataclasses.dataclass(frozen=True)
class BlockRecurrentConfig:
    d_model: int = 16           # D
    n_heads: int = 2            # H heads of width D / H
    block_size: int = 4         # W tokens per block (also the sliding window)
    n_states: int = 4           # S state vectors
    mlp_ratio: float = 2.0      # MLP hidden width = mlp_ratio * D
    gate: str = "fixed"         # "fixed" or "lstm"

    def __post_init__(self):
        check_heads("block_recurrent", self.d_model, self.n_heads)
        check_positive_int("block_recurrent", "block_size", self.block_size)
        check_positive_int("block_recurrent", "n_states", self.n_states)
        check_positive_float("block_recurrent", "mlp_ratio", self.mlp_ratio)
        if self.gate not in GATES:
            raise ValueError(f"block_recurrent: gate must be one of {GATES}, got {self.gate!r}")

    @property
    def d_mlp(self) -> int:
        return max(1, int(round(self.mlp_ratio * self.d_model)))


def _state_size(c: BlockRecurrentConfig) -> int:
    return c.n_states * c.d_model + 2 * c.block_size * c.d_model + c.block_size + 1


def gate_init(key: jax.Array, kind: str, d_hidden: int, d: int) -> dict:
    """meliad's gate initialisation: biases N(0, 0.1²), kernels with a tenth of LeCun's variance."""
    k_b, k_i, k_f, k_bi, k_bf = jax.random.split(key, 5)
    if kind == "fixed":
        return {"bias": 0.1 * jax.random.normal(k_b, (d,), jnp.float32)}
    return {"w_i": 0.1 ** 0.5 * dense_init(k_i, d_hidden, d),
            "b_i": 0.1 * jax.random.normal(k_bi, (d,), jnp.float32),
            "w_f": 0.1 ** 0.5 * dense_init(k_f, d_hidden, d),
            "b_f": 0.1 * jax.random.normal(k_bf, (d,), jnp.float32)}


def gated(params: dict, carried, update, hidden):
    """Combine the carried state with its update (see the module docstring)."""
    if "bias" in params:
        g = jax.nn.sigmoid(params["bias"].astype(carried.dtype))
        return carried * g + update * (1 - g)
    forget = jax.nn.sigmoid(project(hidden, params["w_f"], params["b_f"]) + 1)
    write = jax.nn.sigmoid(project(hidden, params["w_i"], params["b_i"]) - 1)
    return carried * forget + update * write


@register("block_recurrent", config=BlockRecurrentConfig, paper="Block-Recurrent Transformers",
          engine="softmax+nonlinear", modes=MODES, state_size=_state_size)
def build(config: BlockRecurrentConfig):
    d, n_heads, width, n_states = config.d_model, config.n_heads, config.block_size, config.n_states

    def init(key, d_in):
        keys = jax.random.split(key, 12)
        return {
            "w_in": dense_init(keys[0], d_in, d),
            "tokens": {"norm": norm_init("layer", d), "w_qkvq": dense_init(keys[1], d, 4 * d),
                       "w_o": dense_init(keys[2], 2 * d, d), "mlp_norm": norm_init("layer", d),
                       "mlp": mlp_init(keys[3], d, config.d_mlp)},
            "state": {"norm": norm_init("layer", d), "w_qkvq": dense_init(keys[4], d, 4 * d),
                      "w_o": dense_init(keys[5], 2 * d, d), "b_o": jnp.zeros((d,), jnp.float32),
                      "gate_attn": gate_init(keys[6], config.gate, 2 * d, d),
                      "mlp_norm": norm_init("layer", d), "mlp": mlp_init(keys[7], d, config.d_mlp),
                      "gate_mlp": gate_init(keys[8], config.gate, config.d_mlp, d),
                      # meliad: state positions N(0, 1), initial state N(0, 0.1²).
                      "positions": jax.random.normal(keys[9], (n_states, d), jnp.float32)},
            "memory_init": 0.1 * jax.random.normal(keys[10], (n_states, d), jnp.float32),
        }

    # ---- the state side (float32 whatever the compute dtype: it is the recurrent state) ----

    def state_projections(p, memory):
        """(q_C, k_C, v_C, q₂_C), each [B, S, H, K]."""
        u = layer_norm(p["norm"], memory) + p["positions"]
        return tuple(split_heads(part, n_heads) for part in jnp.split(project(u, p["w_qkvq"]), 4, axis=-1))

    def update_memory(params, memory, block_keys, block_values, block_weights):
        """C_next from C [B, S, D] and the block's keys and values [B, W, H, K] (weights [B, W])."""
        p = params["state"]
        q, k, v, q2 = state_projections(p, memory)
        to_self = attention(q, k, v)
        to_block = attention(q2, block_keys.astype(jnp.float32), block_values.astype(jnp.float32),
                             weights=block_weights)
        hidden = merge_heads(jnp.concatenate([to_self, to_block], axis=-2))
        memory = gated(p["gate_attn"], memory, project(hidden, p["w_o"], p["b_o"]), hidden)
        hidden = mlp_hidden(p["mlp"], layer_norm(p["mlp_norm"], memory))
        return gated(p["gate_mlp"], memory, mlp_output(p["mlp"], hidden), hidden)

    def memory_keys_values(params, memory, dtype):
        _, k, v, _ = state_projections(params["state"], memory)
        return k.astype(dtype), v.astype(dtype)

    # ---- the token side (compute dtype) ----

    def token_projections(params, xs):
        """h = x W_in and (q, k, v, q₂) [..., H, K] for tokens xs [..., D_in]."""
        h = project(xs, params["w_in"])
        u = layer_norm(params["tokens"]["norm"], h)
        parts = jnp.split(project(u, params["tokens"]["w_qkvq"]), 4, axis=-1)
        return h, tuple(split_heads(part, n_heads) for part in parts)

    def token_outputs(params, h, local, to_state):
        p = params["tokens"]
        h = h + project(merge_heads(jnp.concatenate([local, to_state], axis=-2)), p["w_o"])
        return h + mlp_output(p["mlp"], mlp_hidden(p["mlp"], layer_norm(p["mlp_norm"], h)))

    def initial_state(params, batch):
        return {"memory": jnp.broadcast_to(params["memory_init"], (batch, n_states, d)).astype(jnp.float32),
                "window": softmax.initial_state(batch, width, n_heads, d // n_heads, d // n_heads),
                "count": jnp.zeros((batch,), jnp.float32)}

    def step(params, state, x_t):
        h, (q, k, v, q2) = token_projections(params, x_t)
        window, local = softmax.step(state["window"], q, k, v)
        mem_k, mem_v = memory_keys_values(params, state["memory"], x_t.dtype)
        to_state = attention(q2[:, None], mem_k, mem_v)[:, 0]
        y_t = token_outputs(params, h, local, to_state)
        # The window now holds the last W keys: at a block's end, exactly that block's.
        full = read_count(state["count"], width) == width - 1
        updated = update_memory(params, state["memory"], window["keys"], window["values"], window["valid"])
        new = {"memory": jnp.where(full[:, None, None], updated, state["memory"]), "window": window,
               "count": jnp.where(full, 0.0, read_count(state["count"], width) + 1.0)}
        return new, y_t

    def aligned(params, xs, state):
        """From a block start with no reset: the window attention over the whole sequence, a scan
        over the complete blocks for the state, and the rest per token."""
        batch, time = xs.shape[:2]
        h, (q, k, v, q2) = token_projections(params, xs)
        local, window = softmax.apply(q, k, v, initial_state=state["window"], mode="chunked")
        n_full, n_blocks = time // width, -(-time // width)

        def body(memory, block):
            block_keys, block_values = block
            ones = jnp.ones(block_keys.shape[:2], jnp.float32)
            return update_memory(params, memory, block_keys, block_values, ones), memory

        def by_block(x):
            return jnp.swapaxes(x[:, :n_full * width].reshape(batch, n_full, width, *x.shape[2:]), 0, 1)

        memory, entering = lax.scan(body, state["memory"], (by_block(k), by_block(v)))
        memories = jnp.concatenate([jnp.swapaxes(entering, 0, 1), memory[:, None]], axis=1)[:, :n_blocks]
        mem_k, mem_v = memory_keys_values(params, memories, xs.dtype)                 # [B, n, S, H, K]
        padded = jnp.pad(q2, ((0, 0), (0, n_blocks * width - time), (0, 0), (0, 0)))
        to_state = attention(padded.reshape(batch, n_blocks, width, n_heads, -1), mem_k, mem_v)
        to_state = to_state.reshape(batch, n_blocks * width, n_heads, -1)[:, :time]
        ys = token_outputs(params, h, local, to_state)
        count = jnp.full((batch,), float(time % width), jnp.float32)
        return ys, {"memory": memory, "window": window, "count": count}

    def apply(params, xs, state, reset, mode, reverse):
        fresh = initial_state(params, xs.shape[0])
        return run_segments(step, aligned, params, xs, state, reset, mode, reverse, fresh=fresh, size=width)

    step_jit, apply_jit = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("block_recurrent", init=init, initial_state=initial_state, step=step_jit,
                           apply=apply_jit, input_width=lambda params: params["w_in"].shape[0], modes=MODES,
                           default_d_in=d)
