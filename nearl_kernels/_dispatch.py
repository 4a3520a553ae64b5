"""Where the ops (``torch.library.triton_op``s) run their Triton kernels, and the launch-time helpers they share."""

import functools
import os
import traceback

import torch

# The Triton releases every kernel specialisation of the default envelope is
# proven to build on (sm_90 and sm_80, no spills: the compile gate), inclusive.
# setup.py pins the same range; benchmarks/results/compile_gate/ holds each
# release's table.
TRITON_RANGE = ("3.4", "3.9")


class KernelBuildError(RuntimeError):
    """A Triton kernel failed to compile on this machine's stack; the message is one line
    naming the kernel, the Triton release and the supported range."""


def triton_version() -> str:
    import triton

    return triton.__version__


def triton_supported(version: str) -> bool:
    minor = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    low, high = (tuple(int(p) for p in v.split(".")) for v in TRITON_RANGE)
    return low <= minor <= high


def _is_build_error(err: BaseException) -> bool:
    """Raised while compiling, not while running: Triton's compile errors, a resource
    limit met at load, or anything raised from inside its compiler (ptxas included)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    if isinstance(err, (CompilationError, OutOfResources)):
        return True
    files = [frame.filename.replace(os.sep, "/") for frame in traceback.extract_tb(err.__traceback__)]
    return any("/triton/compiler/" in f or ("/triton/backends/" in f and f.endswith("compiler.py")) for f in files)


def _traced(args) -> bool:
    """True while torch.compile or AOTInductor traces an op's body: its tensors are then functional or
    fake wrappers, not plain tensors (parameters included), and a launch must become a graph node."""
    return any(isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, torch.nn.Parameter) for a in args)


def traceable(kernel, args):
    """``kernel`` as the ops launch it: under tracing, ``torch.library.wrap_triton(kernel)``, so the
    ``triton_op``s show Inductor (and an AOTInductor package) the Triton kernel itself, not opaque
    Python; in eager, the kernel as it is. Interpreted kernels (TRITON_INTERPRET=1) are not
    JITFunctions and are never wrapped."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, (JITFunction, Autotuner)) and _traced(args):
        return torch.library.wrap_triton(kernel)
    return kernel


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, with a failed build turned into one KernelBuildError."""
    try:
        return traceable(kernel, args)[grid](*args, **kwargs)
    except Exception as err:
        if not _is_build_error(err):
            raise
        version = triton_version()
        where = "" if triton_supported(version) else ", which is outside that range"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1].strip()[:200]
        name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
        raise KernelBuildError(
            f"the Triton kernel {name} did not build with triton {version} (nearl supports triton "
            f"{TRITON_RANGE[0]} to {TRITON_RANGE[1]}{where}): {type(err).__name__}: {reason}. --no-fused "
            "(fused=False in Python) runs the reference maths instead") from None


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


TRACE_SM_COUNT = 132


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, for grids sized to fill it (1 off CUDA).

    The compile gate replaces this with its target's count, since it builds
    launches on the meta device with no GPU present. Fake CUDA tensors traced
    where no GPU is visible (exporting a CUDA package on a CPU machine) get
    ``TRACE_SM_COUNT``, an H100's or H200's count: the grid it sizes is baked
    into the package, and is still correct, if less full, on other GPUs.
    """
    if device.type != "cuda":
        return 1
    if not torch.cuda.is_available():
        return TRACE_SM_COUNT
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
