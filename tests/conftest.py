"""Shared test set-up: import zoo from this checkout, and float32 matmuls at full precision."""

import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The harness compares modes at 1e-5; keep XLA from choosing reduced-precision matmul passes.
jax.config.update("jax_default_matmul_precision", "highest")
