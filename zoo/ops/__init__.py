"""Recurrence engines: pure jnp, each with a naive ``reference``. Nothing here imports the layers above.

``zoo.ops.ssd`` (Mamba-2's state-space duality) and ``zoo.ops.selective_scan`` (Mamba's selective
scan) are functions, with the argument names of mamba_ssm; their modules are ``ssd_scan`` and
``selective``. The matrix-memory ops (``linear_attention``, ``simple_gla``, ``retention``,
``lightning_attention``, ``gla``, ``hgrn2``, ``gateloop``, ``rwkv6``, ``mlstm``) are functions with
FLA's argument names, thin front ends to the ``matrix`` engine (module ``matrix_ops``); likewise
``delta_rule`` and ``gated_delta_rule`` for the ``delta`` engine (module ``delta_ops``).
"""

from zoo.ops import (
    conv1d,
    delta,
    delta_ops,
    diagonal,
    fast_weights,
    hgrn,
    hippo,
    lti,
    matrix,
    matrix_ops,
    nonlinear,
    selective,
    softmax,
    softmax_scan,
    ssd_scan,
)
from zoo.ops.delta_ops import delta_rule, gated_delta_rule
from zoo.ops.matrix_ops import (
    gateloop,
    gla,
    hgrn2,
    lightning_attention,
    linear_attention,
    mlstm,
    retention,
    rwkv6,
    simple_gla,
)
from zoo.ops.selective import selective_scan, selective_state_update
from zoo.ops.ssd_scan import ssd

__all__ = [
    "conv1d", "delta", "delta_ops", "delta_rule", "diagonal", "fast_weights", "gated_delta_rule",
    "gateloop", "gla", "hgrn", "hgrn2", "hippo", "lightning_attention", "linear_attention", "lti", "matrix",
    "matrix_ops", "mlstm", "nonlinear", "retention", "rwkv6", "selective", "selective_scan",
    "selective_state_update", "simple_gla", "softmax", "softmax_scan", "ssd", "ssd_scan",
]
