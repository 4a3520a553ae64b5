"""@triton.jit helpers shared by the ops' kernels."""

import triton
import triton.language as tl


@triton.jit
def lowp_dot(a, b, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """a @ b with both operands rounded to the activations' dtype DT, fp32 accumulation.

    On a GPU this is a tensor-core dot. Triton 3.8's interpreter multiplies the
    raw bit patterns of bf16 operands, so there the same DT-rounded values go
    through an fp32 dot: identical products, fp32 accumulation, as on the GPU.
    """
    if INTERPRET:
        return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(DT), b.to(DT))
