"""Study 1d: the paper's RNN on modular_arithmetic, the regular task that its one run in
``chomsky_regular`` left unsolved, over seeds and scored per test length as the paper scores it
("Neural Networks and the Chomsky Hierarchy", Delétang et al., ICLR 2023).

    .venv/bin/python -m experiments.studies.chomsky_rnn_modular           # 5 seeds, ~7 min a run on 2 cores
    .venv/bin/python -m experiments.studies.chomsky_rnn_modular --quick   # a smoke run of a few steps

The paper claims that RNNs generalise on the regular tasks. In ``chomsky_regular`` a tanh RNN solved
parity_check and cycle_navigation, but on modular_arithmetic no arm generalised: the paper's network
(the bare tanh RNN of width 256 under a linear readout, Adam at a constant 1e-3, gradient norm clipped
to 1, batch 128, 10k steps) reached training accuracy 0.72 and 0.20 on 41-500 (chance) in its one
seed. The paper counts a (model, task) as solved by its best seed of ten, so one seed says little. A
probe of the same network trained 30k steps on another data order reached training accuracy 1.0 by
step ~4500 and 1.000 at every test length from step 20k. This study trains the network over
``SEEDS`` (10k steps, as the paper's example script) and one seed for each of ``LONG_STEPS``, and scores each
run as ``chomsky_counter`` does (``run_per_length_study``): the accuracy at each test length,
interpolated to every length 41-500 and averaged (the paper's score), and over the whole held-out split.

Writes ``experiments/results/chomsky_rnn_modular.md``.
"""

from __future__ import annotations

import sys

from experiments.studies.chomsky_counter import PerLengthStudy, run_per_length_study

SEEDS = (0, 1, 2, 3, 4)
# The longer arm: the probe needed ~4500 steps to fit the training lengths and ~20k to reach 1.0 at
# every test length; twice the main runs' steps (~13 min on 2 cores).
LONG_STEPS = (20000,)
LONG_SEEDS = (0,)
STUDY = PerLengthStudy(
    name="chomsky_rnn_modular", model="elman", task="modular_arithmetic", seeds=SEEDS,
    long_steps=LONG_STEPS, long_seeds=LONG_SEEDS,
    title="Chomsky hierarchy, the regular task modular_arithmetic: the paper's RNN over seeds, per test "
          "length",
    task_text="an expression d op d op … d over the digits 0–4 and +, −, ×, × binding tighter; at its end "
              "the model outputs its value mod 5")


def main(argv=None) -> str:
    return run_per_length_study(STUDY, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
