"""Orthogonal Cross-Attention adapter: reference maths, Triton kernels, op."""

from .ops import OCAFunction, oca
from .reference import down_project, oca_reference

__all__ = ["oca", "OCAFunction", "oca_reference", "down_project"]
