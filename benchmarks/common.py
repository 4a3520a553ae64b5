"""What every benchmark shares: device and sizes, providers, timing, derived figures.

Each op's file has one setup factory returning a ``Case`` (a forward function,
its inputs, the grads to ask for, and a FLOP count); forward, backward and full
modes are built from it here, so the three modes time the same thing.
"""

import os
import statistics
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nearl_kernels._dispatch import interpreting
from nearl_kernels.audit import TrafficAudit

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = ["reference", "compiled", "fused", "xformers"]
MODES = ["forward", "backward", "full"]

# Speed-ups are against the reference measured in this same run.
_REFERENCE_MEAN: Dict[tuple, float] = {}


def size_class(config) -> str:
    """gpu: ViT-B/16 batch 64; cpu: what 2 cores time in minutes; smoke: CI's --benchmark-disable pass.

    ``NEARL_BENCH_SIZE`` (gpu, cpu or smoke) overrides the choice: gpu_check.sh's
    CPU smoke run times the smoke shapes.
    """
    forced = os.environ.get("NEARL_BENCH_SIZE")
    if forced:
        if forced not in ("gpu", "cpu", "smoke"):
            raise pytest.UsageError(f"NEARL_BENCH_SIZE must be gpu, cpu or smoke; got {forced!r}")
        return forced
    if DEVICE.type == "cuda":
        return "gpu"
    return "smoke" if config.getoption("benchmark_disable", False) else "cpu"


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


_XFORMERS = []


def xformers_ops():
    """(xformers.ops, attention op) or (None, the reason it cannot run here).

    Probed once with a real call at the benchmarks' head width (16) in bf16: a
    wheel built for another torch imports without its CUDA kernels, and
    FlashAttention-3 takes no head width of 16, so a row runs only on the
    CUTLASS kernels that do, and is skipped with the reason otherwise.
    """
    if _XFORMERS:
        return _XFORMERS[0]
    if DEVICE.type != "cuda":
        result = None, "xformers has no CPU kernels; it runs where a CUDA device is present"
    else:
        try:
            import xformers.ops as xops

            op = (xops.fmha.cutlass.FwOp, xops.fmha.cutlass.BwOp)
            q = torch.randn(1, 8, 2, 16, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
            xops.memory_efficient_attention(q, q, q, op=op).sum().backward()
            result = (xops, op), None
        except ImportError as err:
            result = None, f"xformers is not installed (pip install -e '.[xformers]'): {err}"
        except Exception as err:  # a wheel without kernels for this torch raises NotImplementedError and others
            version = getattr(sys.modules.get("xformers"), "__version__", "?")
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            result = None, (f"xformers {version} cannot run bf16 attention at head width 16 with torch "
                            f"{torch.__version__} here: {type(err).__name__}: {first}")
    _XFORMERS.append(result)
    return result


def xformers_attention(q, k, v, attn_bias=None):
    """xformers' CUTLASS memory-efficient attention on (B, L, H, r_h) tensors: computed in
    bf16 (its kernels take no fp32), returned in q's dtype."""
    (xops, op), _ = xformers_ops()
    low = [t.to(torch.bfloat16) for t in (q, k, v)]
    bias = None if attn_bias is None else attn_bias.to(torch.bfloat16)
    return xops.memory_efficient_attention(*low, attn_bias=bias, op=op).to(q.dtype)


@dataclass
class Case:
    """One op at one shape: ``fn(*inputs)`` is the forward, ``leaves`` get gradients."""

    fn: Callable
    inputs: List
    leaves: List[torch.Tensor]
    flops_forward: float
    shape_id: str
    audit_tokens: int = 0
    notes: Dict = field(default_factory=dict)


def mode_fn(case: Case, mode: str) -> Callable:
    """The timed callable for a mode; each ends with a device synchronisation."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                case.fn(*case.inputs)
            sync()
        return run
    if mode == "backward":
        out = case.fn(*case.inputs)
        grad = torch.randn_like(out)

        def run():
            torch.autograd.grad(out, case.leaves, grad, retain_graph=True)
            sync()
        return run

    def run():
        out = case.fn(*case.inputs)
        torch.autograd.grad(out, case.leaves, torch.ones_like(out))
        sync()
    return run


def mode_flops(case: Case, mode: str) -> float:
    # The usual convention: backward is twice the forward's work.
    return case.flops_forward * {"forward": 1, "backward": 2, "full": 3}[mode]


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors allocated by aten ops and still alive (CPU peak-memory stand-in)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not any(r.alias_info is not None for r in func._schema.returns):
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel():
                    nbytes = t.numel() * t.element_size()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, nbytes)
        return out


# On CPU without the interpreter the fused ops' backward is torch.func.vjp of
# the reference, and functorch refuses to run under a TorchDispatchMode
# ("Cannot access storage of TensorWrapper"): those rows report None.
UNAUDITABLE = (NotImplementedError, RuntimeError)


def reraise_unless_functorch_clash(err: Exception) -> None:
    if "storage" not in str(err):
        raise err


def peak_memory(run: Callable, provider: str) -> Optional[int]:
    """Peak bytes allocated during one call; on CPU the live-tensor stand-in, None where opaque."""
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return torch.cuda.max_memory_allocated() - base
    if opaque(provider):
        return None
    try:
        with LiveBytes() as tracker:
            run()
    except UNAUDITABLE as err:
        reraise_unless_functorch_clash(err)
        return None
    return tracker.peak


def opaque(provider: str) -> bool:
    """Rows left unaudited: inductor's generated kernels, which the audit cannot see, and the
    fused rows on CPU without the interpreter, which run the CPU path (reference maths), not the
    kernels whose traffic the table reports."""
    return provider == "compiled" or (provider == "fused" and DEVICE.type == "cpu" and not interpreting())


def traffic(run: Callable, provider: str, n_tokens: int) -> Dict:
    """Bytes moved and launches of one call (None where they cannot be seen, see ``opaque``)."""
    if opaque(provider):
        return {"bytes_moved": None, "launches": None}
    try:
        with TrafficAudit(n_tokens=n_tokens) as audit:
            run()
    except UNAUDITABLE as err:
        reraise_unless_functorch_clash(err)
        return {"bytes_moved": None, "launches": None}
    figures = {"bytes_moved": audit.dram_bytes, "launches": audit.launches,
               "triton_launches": sum(audit.kernel_launches.values())}
    if audit.kernel_bytes:
        figures["bytes_loaded_stored_interpreted"] = audit.kernel_total() + audit.aten_bytes
    return figures


def measure(benchmark, case: Case, *, op: str, mode: str, provider: str, pedantic_rounds: Optional[int] = None):
    """Time ``case`` in ``mode`` and record the derived figures in ``benchmark.extra_info``."""
    run = mode_fn(case, mode)
    run()  # warm-up: compiles, autotunes, fills caches
    info = {"op": op, "shape": case.shape_id, "mode": mode, "provider": provider, "device": str(DEVICE),
            "flops": mode_flops(case, mode), **case.notes}
    info.update(traffic(run, provider, case.audit_tokens))
    info["peak_memory_bytes"] = peak_memory(run, provider)
    if pedantic_rounds:
        benchmark.pedantic(run, rounds=pedantic_rounds, warmup_rounds=1)
    else:
        benchmark(run)
    stats = getattr(benchmark, "stats", None)
    mean = stats.stats.mean if stats is not None else None
    if mean:
        info["mean_seconds"] = mean
        info["tflops"] = info["flops"] / mean / 1e12
        if info.get("bytes_moved"):
            info["gb_per_s"] = info["bytes_moved"] / mean / 1e9
        key = (op, case.shape_id, mode)
        if provider == "reference":
            _REFERENCE_MEAN[key] = mean
        if key in _REFERENCE_MEAN:
            info["speedup_vs_reference"] = _REFERENCE_MEAN[key] / mean
    benchmark.extra_info.update(info)
    return info


def provider_or_skip(provider: str, fn_reference: Callable, fn_fused: Callable, fn_xformers: Optional[Callable]):
    """The forward function for a provider, or pytest.skip with the reason."""
    if provider == "reference":
        return fn_reference
    if provider == "fused":
        return fn_fused
    if provider == "compiled":
        return torch.compile(fn_reference, dynamic=False)
    xops, reason = xformers_ops()
    if xops is None or fn_xformers is None:
        pytest.skip(reason or "xformers does not apply to this op")
    return fn_xformers


def env_description() -> Dict:
    import platform

    import triton

    desc = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if DEVICE.type == "cuda":
        desc["gpu"] = torch.cuda.get_device_name()
    return desc


def interleaved_overhead(step, baseline, rounds: int):
    """(median, lowest, highest) over rounds of (step time / baseline time) - 1.

    Each round runs the two back to back, alternating which goes first, so
    load from elsewhere on the machine falls on both alike: separate
    benchmark rows on this shared 2-core CPU wandered by 10-20%.
    """
    ratios = []
    for i in range(rounds):
        pair = [baseline, step] if i % 2 == 0 else [step, baseline]
        times = {}
        for fn in pair:
            start = time.perf_counter()
            fn()
            times[fn] = time.perf_counter() - start
        ratios.append(times[step] / times[baseline] - 1)
    return statistics.median(ratios), min(ratios), max(ratios)
