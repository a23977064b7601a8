"""The studies of issue 8, each a script ``python -m experiments.studies.<name> [--quick]`` that writes
``experiments/results/<name>.md``: ``chomsky``, ``selective_copy``, ``mqar``, ``char_lm``,
``bach_chorales``. ``_runner`` trains one (model, task, config, seed) through ``experiments.train`` and
writes the tables."""
