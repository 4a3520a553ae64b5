"""Where the custom ops run their Triton kernels, and the launch-time helpers they share."""

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA tensors, and on CPU tensors under the interpreter; else the reference maths."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def eager_cpu(t: torch.Tensor) -> bool:
    """True where the ops' autograd Functions call the CPU maths directly, skipping the custom op:
    its Python dispatch (about 0.1 ms a call on 2 cores) buys nothing outside torch.compile."""
    return not use_triton(t) and not torch.compiler.is_compiling()


def next_pow2(n: int, minimum: int = 16) -> int:
    """Block size for a dimension: a power of two, at least 16 so tl.dot works on tensor cores."""
    return max(minimum, 1 << (max(int(n), 1) - 1).bit_length())


def is_low_precision(t: torch.Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, for grids sized to fill it (1 off CUDA).

    The compile gate replaces this with its target's count, since it builds
    launches on the meta device with no GPU present.
    """
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# Tests set this so every output buffer starts as NaN: an element a kernel
# forgets to write then fails loudly instead of passing on leftover memory.
POISON_OUTPUTS = False


def new_output(*shape, like: torch.Tensor, dtype: torch.dtype = None) -> torch.Tensor:
    """An output buffer of ``shape`` on ``like``'s device (dtype: ``like``'s unless given)."""
    dtype = dtype or like.dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def no_autocast(launcher):
    """Launchers choose their own precision: the small torch ops around the
    kernels (k/v projections, partial sums) must not be recast by an autocast
    region the op was called from."""

    @functools.wraps(launcher)
    def wrapped(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return launcher(*args, **kwargs)

    return wrapped
