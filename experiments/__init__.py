"""Experiments on zoo: ``python -m experiments.train`` (any model on any task) and the studies.

The benchmark scripts under ``experiments/bench`` are run as scripts (``python experiments/bench/x.py``),
not imported from this package.
"""
