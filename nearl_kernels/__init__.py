"""Triton kernels for NEARL-CLIP's two hot parts, each beside its PyTorch reference.

>>> import nearl_kernels as nk
>>> y, h = nk.oca(x, z, w_down, b_down, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads=2)
>>> z = nk.synergy_block(z, ctx, ctx_mask, params, n_heads=2)
"""

from .oca import oca, oca_reference
from .synergy import synergy_block, synergy_reference

__all__ = ["oca", "oca_reference", "synergy_block", "synergy_reference"]
