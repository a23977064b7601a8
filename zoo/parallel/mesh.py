"""``make_mesh``: the device mesh every sharded computation in zoo runs on.

Four named axes, always in this order and always present (size 1 when unused), so partition rules
and batch specs can name any of them on any mesh:

- ``data``: pure data parallelism. The batch is split over it; params are replicated along it.
- ``fsdp``: fully sharded data parallelism (ZeRO-3, Rajbhandari et al. 2020, arXiv:1910.02054). The
  batch is split over it too, and every large param and its optimizer state is split along it, then
  all-gathered where used.
- ``tensor``: tensor (model) parallelism over heads or channels (Megatron-LM, Shoeybi et al. 2019,
  arXiv:1909.08053).
- ``sequence``: sequence parallelism along time, used by ``zoo.parallel.sequence``.

The axis types are ``AxisType.Auto``: the classic GSPMD behaviour (Xu et al. 2021, arXiv:2105.04663),
in which shardings given to ``jax.jit`` (``in_shardings`` / ``out_shardings``, ``NamedSharding``) are
hints that the compiler propagates through the program and completes with collectives. A jitted step
then computes the same function whatever the shardings are, and accepts unsharded inputs as well.
``jax.make_mesh`` now defaults to ``Explicit`` axes, where sharding is part of every array's type
and a step traced on mesh-sharded inputs refuses single-device ones (ENV-NOTES §4), so it is not used
here with its defaults.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")   # the mesh axes a batch's leading dimension is split over


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, sequence: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ("data", "fsdp", "tensor", "sequence") of the given sizes, all ``Auto``.

    ``devices`` defaults to ``jax.devices()`` (every device of every process). The sizes must
    multiply to the number of devices. ``jax.experimental.mesh_utils.create_device_mesh`` orders the
    devices so that the last axes (tensor, sequence: the most communication per step) are
    neighbours on the physical interconnect on TPU; elsewhere the devices keep their order.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "sequence": sequence}
    for axis, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
            raise TypeError(f"make_mesh: {axis} must be an int, got {type(size).__name__} {size!r}")
        if size < 1:
            raise ValueError(f"make_mesh: {axis} must be >= 1, got {size}")
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(int(s) for s in sizes.values())
    if math.prod(shape) != len(devices):
        described = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
        raise ValueError(f"make_mesh: the axis sizes {described} = {math.prod(shape)} do not match the "
                         f"{len(devices)} devices")
    grid = _device_grid(shape, devices)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _device_grid(shape: tuple[int, ...], devices: list[jax.Device]) -> np.ndarray:
    """Devices arranged as ``shape``, in the interconnect-aware order where JAX knows one."""
    if devices and devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        try:
            return mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            pass        # a shape the TPU topology helper does not handle: plain order still works
    return np.array(devices, dtype=object).reshape(shape)
