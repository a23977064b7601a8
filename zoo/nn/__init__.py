"""Flax NNX shells around the functional recurrences (the only part of zoo that imports Flax).

    layer = zoo.nn.Recurrent(zoo.get("lstm", d_model=64), d_in=32, rngs=nnx.Rngs(0))
    ys = layer(xs)                                   # xs [B, T, 32] -> ys [B, T, 64]

    model = zoo.nn.SequenceModel("lstm", vocab_size=256, d_model=64, n_layers=2, d_output=256,
                                 rngs=nnx.Rngs(0))
    logits = model(tokens)                           # tokens int [B, T] -> logits [B, T, 256]
"""

from zoo.nn.recurrent import Recurrent
from zoo.nn.sequence_model import POOLS, SequenceModel, count_params

__all__ = ["POOLS", "Recurrent", "SequenceModel", "count_params"]
