"""@triton.jit helpers shared by the ops' kernels."""

import os

import triton
import triton.language as tl

# Read once, when triton is imported for the first time in this process, as
# Triton itself does: the kernels branch on it at compile time, so it never
# travels through a kernel signature.
INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"))


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
