"""USEformer block (synergy-query update): reference maths, Triton kernels, op."""

from .ops import SynergyFunction, synergy_block
from .reference import PARAM_NAMES, synergy_reference

__all__ = ["synergy_block", "SynergyFunction", "synergy_reference", "PARAM_NAMES"]
