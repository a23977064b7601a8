"""Recurrence engines: pure jnp, each with a naive ``reference``. Nothing here imports the layers above.

``zoo.ops.ssd`` (Mamba-2's state-space duality) and ``zoo.ops.selective_scan`` (Mamba's selective
scan) are functions, with the argument names of mamba_ssm; their modules are ``ssd_scan`` and
``selective``.
"""

from zoo.ops import conv1d, diagonal, hippo, lti, nonlinear, selective, softmax, ssd_scan
from zoo.ops.selective import selective_scan, selective_state_update
from zoo.ops.ssd_scan import ssd

__all__ = ["conv1d", "diagonal", "hippo", "lti", "nonlinear", "selective", "selective_scan",
           "selective_state_update", "softmax", "ssd", "ssd_scan"]
