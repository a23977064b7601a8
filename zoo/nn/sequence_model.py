"""``SequenceModel``: embedding or linear input -> residual recurrent blocks -> norm -> linear head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zoo
from zoo.contract import AUTO, Recurrence, output_width
from zoo.nn.recurrent import Recurrent

POOLS = ("none", "last", "mean")
BLOCKS = ("residual", "plain")


class SequenceModel(nnx.Module):
    """A language model or sequence classifier around any registered mixer::

        inputs -> embed (vocab_size) or linear (d_input) -> n_layers x residual(mixer)
               -> RMSNorm -> linear head -> logits [B, T, d_output]   (or [B, d_output] pooled)

    ``mixer`` is a registered name, built as ``zoo.get(mixer, d_model=d_model, **mixer_config)``
    and wrapped in ``zoo.residual(..., mlp_ratio=mlp_ratio)``; a ``zoo.Recurrence`` is used as it
    is for every layer. ``block="plain"`` drops the residual blocks and the final norm: the layers'
    cells are stacked directly and the head reads the last one's output, the network of the classic
    RNN papers (Greff et al., Chung et al., Delétang et al.: a stack of LSTMs and a linear readout,
    torch.nn.LSTM with a Linear on top); ``mlp_ratio`` must then be 0. Exactly one of ``vocab_size``
    (integer tokens [B, T]) and ``d_input`` (float features [B, T, d_input]) is given. ``pool`` is
    "none" (per-step logits), "last" (logits of the last step) or "mean" (mean over time, then the head).
    """

    def __init__(self, mixer: str | Recurrence = "lstm", *, vocab_size: int | None = None,
                 d_input: int | None = None, d_model: int = 64, n_layers: int = 2, d_output: int,
                 mixer_config: dict | None = None, mlp_ratio: float = 4, pool: str = "none",
                 block: str = "residual", rngs: nnx.Rngs):
        if (vocab_size is None) == (d_input is None):
            raise ValueError(f"SequenceModel: give exactly one of vocab_size (integer tokens) and d_input "
                             f"(float features); got vocab_size={vocab_size}, d_input={d_input}")
        if pool not in POOLS:
            raise ValueError(f"SequenceModel: pool={pool!r}; choose one of {POOLS}")
        if block not in BLOCKS:
            raise ValueError(f"SequenceModel: block={block!r}; choose one of {BLOCKS}")
        if block == "plain" and mlp_ratio != 0:
            raise ValueError(f"SequenceModel: block='plain' has no MLP; set mlp_ratio=0 (got {mlp_ratio})")
        if n_layers < 1:
            raise ValueError(f"SequenceModel: n_layers must be >= 1, got {n_layers}")
        if isinstance(mixer, Recurrence):
            if mixer_config:
                raise ValueError("SequenceModel: mixer_config applies to a mixer given by name, not to a "
                                 "zoo.Recurrence")
            cell = mixer
        else:
            cell = zoo.get(mixer, d_model=d_model, **(mixer_config or {}))
        layer = zoo.residual(cell, mlp_ratio=mlp_ratio) if block == "residual" else cell
        self.block = block
        self.vocab_size = vocab_size
        self.d_input = d_input
        self.pool = pool
        if vocab_size is not None:
            self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        else:
            self.embed = nnx.Linear(d_input, d_model, rngs=rngs)
        self.blocks = Recurrent(zoo.stack(*[layer] * n_layers), d_model, rngs=rngs)
        # A residual block returns its input's width; a bare cell may not (a bidirectional concat).
        d_out = d_model if block == "residual" else output_width(self.blocks.rec, self.blocks.param_values(),
                                                                 d_model)
        self.norm = nnx.RMSNorm(d_model, rngs=rngs) if block == "residual" else None
        self.head = nnx.Linear(d_out, d_output, rngs=rngs)

    def _embed(self, inputs, rank: int):
        """[B, T] tokens or [B, T, d_input] features (rank 3 / 2 for one time step fewer)."""
        shape = tuple(np.shape(inputs))
        dtype = getattr(inputs, "dtype", None)
        if self.vocab_size is not None:
            if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
                raise TypeError(f"SequenceModel: inputs must be integer tokens (vocab_size="
                                f"{self.vocab_size}), got dtype {dtype}")
            if len(shape) != rank - 1:
                raise ValueError(f"SequenceModel: token inputs must have rank {rank - 1}, got shape {shape}")
        else:
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(f"SequenceModel: inputs must be float features, got dtype {dtype}")
            if len(shape) != rank or shape[-1] != self.d_input:
                want = "[B, T, d_input]" if rank == 3 else "[B, d_input]"
                raise ValueError(f"SequenceModel: inputs must have shape {want} with d_input = "
                                 f"{self.d_input}, got shape {shape}")
        return self.embed(inputs)

    def __call__(self, inputs, reset=None, mode: str = AUTO, *, state=None, return_state: bool = False):
        """inputs [B, T] (tokens) or [B, T, d_input] -> logits [B, T, d_output] or [B, d_output]."""
        hs, final = self.blocks(self._embed(inputs, rank=3), state=state, reset=reset, mode=mode,
                                return_state=True)
        if self.pool == "last":
            hs = hs[:, -1]
        elif self.pool == "mean":
            hs = jnp.mean(hs, axis=1)
        logits = self.head(self._normed(hs))
        return (logits, final) if return_state else logits

    def _normed(self, hs):
        return hs if self.norm is None else self.norm(hs)

    def initial_state(self, batch_size: int):
        return self.blocks.initial_state(batch_size)

    def step(self, state, inputs_t):
        """One step for decoding: inputs_t [B] (tokens) or [B, d_input] -> (state, logits [B, d_output]).

        Matches ``__call__`` with pool="none" step by step.
        """
        state, h = self.blocks.step(state, self._embed(inputs_t, rank=2))
        return state, self.head(self._normed(h))


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars in an nnx module."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
