"""@triton.jit helpers shared by the ops' kernels."""

import triton
import triton.language as tl

from ._dispatch import interpreting

# Read once, when this module is first imported (the environment Triton
# itself reads at import): the kernels branch on it at compile time, so it never
# travels through a kernel signature.
INTERPRETING = tl.constexpr(interpreting())


@triton.jit
def lowp_dot(a, b, DT: tl.constexpr):
    """a @ b with both operands rounded to the low-precision dtype DT, fp32 accumulation.

    On a GPU this is a tensor-core (MMA) dot. Triton 3.8's interpreter
    multiplies the raw bit patterns of bf16 operands, so there the same
    DT-rounded values go through an fp32 dot: identical products, fp32
    accumulation, as on the GPU.
    """
    if INTERPRETING:
        return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(DT), b.to(DT))
