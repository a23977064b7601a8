"""Multi-query associative recall (MQAR): key-value pairs, then queries of keys; answer each value.

S. Arora, S. Eyuboglu, A. Timalsina, I. Johnson, M. Poli, J. Zou, A. Rudra, C. Ré, "Zoology:
Measuring and Improving Recall in Efficient Language Models" (2023), §3.2; also the recall tasks of
Arora et al., "Just read twice: closing the recall gap for recurrent language models" (2024). A model
with a fixed-size state must store every pair it has seen, and the accuracy against state size is
the curve those papers draw.

    inputs   k_1 v_1 k_2 v_2 … k_D v_D   ∅ k_3 ∅ ∅ k_1 ∅ …     (query region of query_length positions)
    targets  0   …                   0   0 v_3 0 0 v_1 0
    mask     F   …                   F   F T   F F T   F

Token ids: keys ``[0, n_keys)``, values ``[n_keys, n_keys + n_values)``, the blank ``n_keys + n_values``
(``vocab_size = n_keys + n_values + 1``). The target at a query is its value's index among the values
(the value token minus ``n_keys``), so ``n_classes = n_values``. As in Zoology, the ``n_pairs`` keys of
an example are distinct, and so are its values. ``n_queries`` of its keys (all of them by default),
each once, in random order, sit at uniformly random positions of the query region (Zoology draws the
gaps from a power law; uniform positions keep the closed form simple). Every example has length
``2 * n_pairs + query_length``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zoo.data.tfds_task import Example, SequenceBuilder, SequenceConfig, require, task_factory


@dataclasses.dataclass(eq=False, kw_only=True)
class MqarConfig(SequenceConfig):
    """``n_pairs`` pairs from ``n_keys`` keys and ``n_values`` values; ``n_queries`` queries (None: all)."""

    n_keys: int = 16
    n_values: int = 16
    n_pairs: int = 4
    n_queries: int | None = None
    query_length: int = 16

    @property
    def vocab_size(self) -> int:
        return self.n_keys + self.n_values + 1

    @property
    def n_classes(self) -> int:
        return self.n_values

    @property
    def queries(self) -> int:
        return self.n_pairs if self.n_queries is None else self.n_queries

    def max_length(self, split: str) -> int:
        return 2 * self.n_pairs + self.query_length

    def check(self) -> None:
        super().check()
        require(self, self.n_pairs >= 1, "n_pairs", "must be at least 1")
        require(self, self.n_keys >= self.n_pairs, "n_keys", f"must be at least n_pairs={self.n_pairs}")
        require(self, self.n_values >= self.n_pairs, "n_values", f"must be at least n_pairs={self.n_pairs}")
        require(self, 1 <= self.queries <= self.n_pairs, "n_queries",
                f"must be in [1, n_pairs={self.n_pairs}]")
        require(self, self.query_length >= self.queries, "query_length",
                f"must be at least the number of queries, {self.queries}")


def mqar_example(rng: np.random.Generator, config: MqarConfig, split: str) -> Example:
    keys = rng.choice(config.n_keys, size=config.n_pairs, replace=False)
    values = rng.choice(config.n_values, size=config.n_pairs, replace=False)   # value indices
    context = np.stack([keys, config.n_keys + values], axis=-1).reshape(-1)    # k_1 v_1 k_2 v_2 …
    asked = rng.permutation(config.n_pairs)[: config.queries]                   # which pairs, in order
    where = np.sort(rng.choice(config.query_length, size=config.queries, replace=False))
    region = np.full(config.query_length, config.n_keys + config.n_values)
    region[where] = keys[asked]
    answers = np.zeros(config.query_length, np.int32)
    answers[where] = values[asked]
    asks = np.zeros(config.query_length, bool)
    asks[where] = True
    n_context = len(context)
    return {
        "inputs": np.concatenate([context, region]).astype(np.int32),
        "targets": np.concatenate([np.zeros(n_context, np.int32), answers]),
        "mask": np.concatenate([np.zeros(n_context, bool), asks]),
    }


class Mqar(SequenceBuilder):
    """Multi-query associative recall (Arora et al. 2023, "Zoology"): recall each queried key's value."""

    CONFIG = MqarConfig
    generate = staticmethod(mqar_example)


make_task = task_factory(Mqar)
