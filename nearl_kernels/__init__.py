"""Triton kernels for NEARL-CLIP's two hot parts, each beside its PyTorch reference.

>>> import nearl_kernels as nk
>>> y, h = nk.oca(x, z, w_down, b_down, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads=2)
>>> z = nk.synergy_block(z, ctx, ctx_mask, params, n_heads=2)   # params: nk.SYNERGY_PARAM_NAMES

Each op with ``fused=False`` is its reference, same arguments and results; the
maths itself is in ``nearl_kernels/<op>/reference.py``.
"""

from ._dispatch import TRITON_RANGE, KernelBuildError
from .oca import oca
from .synergy import PARAM_NAMES as SYNERGY_PARAM_NAMES
from .synergy import synergy_block

__all__ = ["oca", "synergy_block", "SYNERGY_PARAM_NAMES", "KernelBuildError", "TRITON_RANGE"]
