"""Pallas kernels (GPU via Triton, TPU via Mosaic) for the zoo engines.

One folder per engine kernel, each with ``reference.py``, ``gpu.py``, ``tpu.py`` and an ``__init__``
exposing one function with a ``custom_vjp`` (see DESIGN.md, "Kernels", and README.md here). The
engines in ``zoo.ops`` dispatch here with ``implementation="pallas"`` (by default on GPU and TPU).
This package imports nothing from ``zoo``.
"""
