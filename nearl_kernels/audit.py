"""Traffic audit: bytes moved and launches, for the fused kernels and the reference path.

Fused path: under TRITON_INTERPRET=1 every masked load and store of a kernel
goes through the interpreter's builder; the audit counts the bytes actually
touched (mask-true lanes x element size) and attributes them to the tensor
whose memory they hit, by name. Torch ops the launchers run (the tiny k/v
GEMMs, the partial-gradient sums) are counted like the reference path's.

Reference path: a TorchDispatchMode sums the sizes of every aten op's tensor
inputs and outputs (views, other aliasing ops and allocations move nothing
and are not counted), one launch per op.

The audit hooks every ``kernel[grid](...)`` from outside, the way a profiler
does (:func:`~nearl_kernels._launch_hook.intercept_launches`): launchers carry
no audit arguments. A kernel's tensors are named by its own parameters, less
a ``_ptr`` suffix (``x_ptr`` -> ``x``).

>>> with TrafficAudit(n_tokens=G * L) as audit:
...     oca_fwd_triton(...)
>>> audit.kernel_bytes["oca_fwd_kernel"]["x"]
"""

from collections import defaultdict
from typing import Dict, Optional

import numpy as np
import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

from ._launch_hook import Launch, intercept_launches

_ACTIVE: Optional["TrafficAudit"] = None
# Allocations, _unsafe_view (a view its schema does not mark as one),
# and profiler markers (the optimiser's record_function) launch nothing and move no bytes.
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
               "_record_function_enter_new", "_record_function_exit"}


def launches_kernel(func) -> bool:
    """Whether an aten op runs a kernel: views, other aliasing ops and allocations do not."""
    if func.overloadpacket.__name__ in _NO_TRAFFIC or func.is_view:
        return False
    return not any(r.alias_info is not None for r in func._schema.returns)


def tensor_name(param: str) -> str:
    """The name the audit reports a kernel parameter's bytes under: ``x_ptr`` -> ``x``."""
    return param[: -len("_ptr")] if param.endswith("_ptr") and len(param) > len("_ptr") else param


class TrafficAudit(TorchDispatchMode):
    """Count bytes and launches of everything run inside the ``with`` block.

    Attributes:
        kernel_bytes: {kernel name: {tensor name: bytes loaded + stored}},
            measured under TRITON_INTERPRET=1 (every load counted, re-reads too).
        kernel_footprint: {kernel name: {tensor name: bytes}}: the size of each
            tensor a launch touches, i.e. the DRAM traffic when re-reads hit
            the cache; known on any device, the benchmarks' GB/s use it.
        kernel_launches: {kernel name: launches}.
        aten_bytes / aten_token_bytes / aten_launches: the torch ops' totals;
            "token" bytes are those of tensors whose size is a multiple of
            ``n_tokens`` (activations, as opposed to weights and queries).
    """

    def __init__(self, n_tokens: int = 0):
        super().__init__()
        self.n_tokens = n_tokens
        self.kernel_bytes: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.kernel_footprint: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.kernel_launches: Dict[str, int] = defaultdict(int)
        self.aten_bytes = 0
        self.aten_token_bytes = 0
        self.aten_launches = 0
        self._kernel = None
        self._ranges = []
        self._saved = None
        self._in_kernel = False
        self._intercept = None

    @property
    def launches(self) -> int:
        return self.aten_launches + sum(self.kernel_launches.values())

    def kernel_total(self, kernel: Optional[str] = None, names=None, footprint: bool = False) -> int:
        """Bytes of one kernel (or all), optionally only for the given tensor names."""
        total = 0
        for k, per_tensor in (self.kernel_footprint if footprint else self.kernel_bytes).items():
            if kernel is None or k == kernel:
                total += sum(b for n, b in per_tensor.items() if names is None or n in names)
        return total

    @property
    def dram_bytes(self) -> int:
        """Traffic estimate for the whole block: kernel footprints plus the torch ops' bytes."""
        return self.kernel_total(footprint=True) + self.aten_bytes

    def __enter__(self):
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("TrafficAudit blocks cannot nest")
        _ACTIVE = self
        self._patch_interpreter()
        self._intercept = intercept_launches(self._on_launch)
        self._intercept.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        global _ACTIVE
        try:
            return super().__exit__(*exc)
        finally:
            _ACTIVE = None
            self._intercept.__exit__(*exc)
            self._intercept = None
            self._unpatch_interpreter()

    def _on_launch(self, launch: Launch):
        # Torch ops run while the kernel runs belong to Triton's interpreter
        # (argument copies), not to the op, and are not counted.
        tensors = {tensor_name(n): v for n, v in launch.arguments.items() if isinstance(v, torch.Tensor)}
        self._begin_kernel(launch.name, tensors)
        self._in_kernel = True
        try:
            return launch.proceed()
        finally:
            self._in_kernel = False

    def _begin_kernel(self, kernel, tensors):
        self.kernel_launches[kernel] += 1
        self._kernel = kernel
        self._ranges = []
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.numel():
                nbytes = t.numel() * t.element_size()
                self.kernel_footprint[kernel][name] += nbytes
                self._ranges.append((t.data_ptr(), t.data_ptr() + nbytes, name))

    def _count(self, ptrs: np.ndarray, mask: np.ndarray, itemsize: int) -> None:
        addrs = ptrs[mask.astype(bool)] if mask is not None else ptrs.ravel()
        if addrs.size == 0:
            return
        counted = np.zeros(addrs.shape, dtype=bool)
        for lo, hi, name in self._ranges:
            hit = (addrs >= lo) & (addrs < hi)
            n = int(hit.sum())
            if n:
                self.kernel_bytes[self._kernel][name] += n * itemsize
                counted |= hit
        rest = int((~counted).sum())
        if rest:
            self.kernel_bytes[self._kernel]["<unnamed>"] += rest * itemsize

    def _patch_interpreter(self):
        from ._dispatch import interpreting

        if not interpreting():
            return
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        load, store = builder.create_masked_load, builder.create_masked_store
        audit = self

        def masked_load(ptrs, mask, other, *args, **kwargs):
            ret = load(ptrs, mask, other, *args, **kwargs)
            audit._count(ptrs.data, mask.data, ret.data.dtype.itemsize)
            return ret

        def masked_store(ptrs, value, mask, *args, **kwargs):
            audit._count(ptrs.data, mask.data, value.data.dtype.itemsize)
            return store(ptrs, value, mask, *args, **kwargs)

        builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
        self._saved = (builder, load, store)

    def _unpatch_interpreter(self):
        if self._saved is not None:
            builder, load, store = self._saved
            builder.create_masked_load, builder.create_masked_store = load, store
            self._saved = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._in_kernel or not launches_kernel(func):
            return out
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        self.aten_launches += 1
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            self.aten_bytes += nbytes
            if self.n_tokens and t.numel() >= self.n_tokens and t.numel() % self.n_tokens == 0:
                self.aten_token_bytes += nbytes
        return out


class LaunchCounter(TorchDispatchMode):
    """Kernel launches of everything run inside the ``with`` block, by name; no bytes.

    One launch per aten op that runs a kernel (:func:`launches_kernel`, the
    traffic audit's rule) plus one per Triton launch. The count depends on
    the code path, not on the hardware, so a test may assert it.

    Args:
        run_kernels: False counts Triton launches without running them (on
            the meta device, to count a step at GPU shapes with no GPU).

    Attributes:
        aten: {aten op name: launches}. triton: {kernel name: launches}.
        in_launchers: {custom op name: aten launches run inside its launcher}
            (the k/v projections and partial sums around the kernels).

    >>> with LaunchCounter() as count:
    ...     train_step()
    >>> count.total
    """

    def __init__(self, run_kernels: bool = True):
        super().__init__()
        self.run_kernels = run_kernels
        self.aten: Dict[str, int] = defaultdict(int)
        self.triton: Dict[str, int] = defaultdict(int)
        self.in_launchers: Dict[str, int] = defaultdict(int)
        self._in_kernel = False
        self._intercept = None
        self._depth = 0
        self._launcher = []

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())

    def __enter__(self):
        # Entered again (nested) while running a custom op's body: the hook is already in place.
        self._depth += 1
        if self._depth == 1:
            self._intercept = intercept_launches(self._on_launch)
            self._intercept.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._intercept.__exit__(*exc)
                self._intercept = None

    def _on_launch(self, launch: Launch):
        # The interpreter's own argument copies are part of the launch, not ops of their own.
        self.triton[launch.name] += 1
        if not self.run_kernels:
            return None
        self._in_kernel = True
        try:
            return launch.proceed()
        finally:
            self._in_kernel = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = _maybe_get_opdef(func) if func.namespace not in ("aten", "prims") else None
        if opdef is not None:
            # A custom op (nearl::oca_fwd ...) is a Python launcher, not a kernel: run its body
            # under the counter so the torch ops and Triton kernels it launches are counted.
            self._launcher.append(func.overloadpacket.__name__)
            try:
                with self:
                    return opdef._init_fn(*args, **kwargs)
            finally:
                self._launcher.pop()
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # matmul, linear...: count the ops they are made of, as a GPU runs them.
            with self:
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        if not self._in_kernel and launches_kernel(func):
            self.aten[func.overloadpacket.__name__] += 1
            if self._launcher:
                self.in_launchers[self._launcher[-1]] += 1
        return out
