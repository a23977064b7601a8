"""Pallas kernels (GPU via Triton, TPU via Mosaic) for the zoo engines.

One folder per engine kernel, each with ``reference.py``, ``gpu.py``, ``tpu.py`` and an ``__init__``
exposing one function with a ``custom_vjp`` (see DESIGN.md, "Kernels"). The engines in ``zoo.ops``
dispatch here with ``mode="pallas"``. This package imports nothing from ``zoo``.
"""
