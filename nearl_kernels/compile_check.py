"""Compile gate: build every kernel specialisation the launchers can choose, for real GPUs, on a CPU.

No GPU is needed: Triton's real compiler runs for an explicit target behind a
stand-in driver, and the real launchers are called with tensors on the
``meta`` device inside :func:`~nearl_kernels._launch_hook.intercept_launches`,
so each ``kernel[grid](...)`` is compiled instead of launched, exactly as the
launcher specialised it. Every distinct specialisation (kernel, argument types
and divisibility, constexprs, launch options) is compiled once per target and
fails the gate on

- a compile error (the kernels may be mid-rewrite: a failure row, not a crash),
- shared memory per block over the target's launch limit,
- any register spill (``ptxas -v`` spill stores or loads > 0),
- a bf16/fp16 (or TF32) ``tt.dot`` not lowered to tensor cores, read from the
  TTGIR (fp32 dots with ``input_precision="ieee"`` may be FMA),
- a grid over CUDA's limits (axis 0 <= 2^31 - 1, axes 1 and 2 <= 65,535),
- a block that does not fit on an SM at all.

At the benchmark shapes (``nearl_kernels/roofline.py``, the same cases the
benchmarks time, always part of the envelope) it also reports every launch's
programs and waves, programs / (SMs x resident blocks per SM), from the grids
the real launchers chose; a launch under one full wave is flagged in the
report (it leaves SMs idle) without failing the gate.

Usage::

    python -m nearl_kernels.compile_check                  # sm_90 and sm_80, default envelope
    python -m nearl_kernels.compile_check --arch sm_90 --envelope full --jobs 8
    python -m nearl_kernels.compile_check --filter 'synergy_bwd:.*r64'   # only matching cases

writes ``sm90.md``/``sm90.json`` (and ``sm80.*``) under ``--out`` (default
``benchmarks/results/compile_gate/``) and exits 1 if anything failed.
TRITON_INTERPRET must be unset (under the interpreter no kernel is
compiled); if it is set, the gate runs itself again without it.

The envelope is data (below): ``default`` is every dtype mix once plus the
worst-case tiles and the shape sweeps, sized for a CI runner; ``full`` is the
whole product of widths, lengths, r, M, heads, F and dtype mixes, which also
reaches the integer specialisations (==1, %16) the default leaves out. Meta
tensors report address 0, i.e. 16-byte aligned, as the launchers' contiguous
allocations are on a GPU.
"""

import argparse
import contextlib
import dataclasses
import importlib
import io
import itertools
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

# The declared support envelope. Every launch the launchers make for these
# shapes and dtypes is compiled; a shape outside it is not promised to build.

# Tower widths d of open_clip's ViT-B, -L, -H, -g, -bigG towers, and one that
# is no multiple of 16 (Triton specialises integer arguments on divisibility).
IMAGE_WIDTHS = (768, 1024, 1280, 1408, 1664)
TEXT_WIDTHS = (512, 768, 1024, 1280)
ODD_WIDTHS = (1000,)
# Sequence lengths: ViT-B/32 (50), B/16 (197), L/14 and H/14 (257) images,
# CLIP text (77), and a short one (a truncated prompt).
IMAGE_LENGTHS = (50, 197, 257)
TEXT_LENGTHS = (77,)
SHORT_LENGTHS = (7,)
# Adapter width r (OCA bound r <= 32; 64 shows the refusal), synergy queries M (bound: M <= 64, plus an
# awkward 5), heads, and the USEformer FFN hidden width F.
ADAPTER_WIDTHS = (16, 32, 64)
QUERIES = (16, 64, 5)
HEADS = (1, 2, 4)
FFN_HIDDEN = (64, 448, 896)
# OCA dtype mixes (x, h, dot_dtype). Under torch.autocast the residual
# stream x stays fp32 while the down-projection produces bf16/fp16 h.
OCA_DTYPES = (
    (torch.float32, torch.float32, None),
    (torch.bfloat16, torch.bfloat16, None),
    (torch.float16, torch.float16, None),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.float32, torch.float16, torch.float16),
)
# USEformer (z, ctx) dtype mixes; the block's parameters have z's dtype.
SYNERGY_DTYPES = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
)
# Paired mode with thousands of classes: B images, each with its own copy of
# K prompts of 77 tokens. The text OCA sees G = B * K sequences in B groups of
# K; a synergy group is one image plus its K texts, Lc = 257 + 77 K. Meta
# tensors allocate nothing, so these sizes cost nothing to build.
PAIRED = (
    dict(B=64, K=2000),   # text OCA: G = 128,000 sequences
    dict(B=64, K=100),    # synergy: 64 groups of Lc = 7,957
    dict(B=2, K=2000),    # synergy: 2 groups of Lc = 154,257
)
# What the default envelope pins where it does not sweep (NearlConfig's defaults).
DEFAULT_R, DEFAULT_M, DEFAULT_HEADS, DEFAULT_F = 32, 16, 2, 448


class Arch(NamedTuple):
    """Per-target limits (CUDA programming guide, compute capabilities table)."""

    name: str            # "sm_90"
    capability: int      # 90
    gpu: str             # what the SM count is for
    sm_count: int
    smem_per_block: int  # opt-in maximum shared memory per block, bytes
    smem_per_sm: int
    regs_per_sm: int = 65_536
    threads_per_sm: int = 2_048
    blocks_per_sm: int = 32
    reg_alloc_unit: int = 256       # registers are allocated per warp in units of 256
    smem_reserved_per_block: int = 1_024  # the system's share of each block's shared memory


ARCHS = {
    "sm_90": Arch("sm_90", 90, "H100/H200 SXM", 132, 232_448, 233_472),
    "sm_80": Arch("sm_80", 80, "A100", 108, 166_912, 167_936),
}
GRID_LIMITS = (2**31 - 1, 65_535, 65_535)


class Case(NamedTuple):
    """One call of a launcher: ``op`` names it, ``params`` its sizes and dtypes."""

    op: str       # oca_fwd | oca_bwd | synergy_fwd | synergy_bwd
    label: str
    params: dict


def _dt(t: Optional[torch.dtype]) -> str:
    return {None: "auto", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[t]


def _oca_case(G, L, d, r, M, heads, group_size, dtypes) -> Iterator[Case]:
    x_dt, h_dt, dot = dtypes
    p = dict(G=G, L=L, d=d, r=r, M=M, heads=heads, group_size=group_size, x=x_dt, h=h_dt, dot=dot)
    tag = f"G{G}-T{group_size}-L{L}-d{d}-r{r}-M{M}-h{heads}-x{_dt(x_dt)}-h{_dt(h_dt)}-dot{_dt(dot)}"
    for op in ("oca_fwd", "oca_bwd"):
        yield Case(op, f"{op}:{tag}", p)


def _synergy_case(G, Lc, r, M, heads, F, dtypes) -> Iterator[Case]:
    z_dt, c_dt = dtypes
    p = dict(G=G, Lc=Lc, r=r, M=M, heads=heads, F=F, z=z_dt, ctx=c_dt)
    tag = f"G{G}-Lc{Lc}-r{r}-M{M}-h{heads}-F{F}-z{_dt(z_dt)}-ctx{_dt(c_dt)}"
    for op in ("synergy_fwd", "synergy_bwd"):
        yield Case(op, f"{op}:{tag}", p)


BENCH_TAG = "bench-"


def benchmark_case(op: str, mode: str, shape: dict) -> Case:
    """The launcher call a benchmark row makes (``op`` "oca" or "synergy", ``mode`` "forward" or
    "backward", ``shape`` one of :mod:`~nearl_kernels.roofline`'s): its adapter and its dtypes,
    bf16 activations with fp32 queries and weights. Labelled ``<op>_<fwd|bwd>:bench-<shape id>``."""
    from . import roofline

    kernel_op = f"{op}_{'fwd' if mode == 'forward' else 'bwd'}"
    if op == "oca":
        p = dict(G=shape["G"], L=shape["L"], d=shape["d"], r=roofline.R, M=roofline.M, heads=roofline.HEADS,
                 group_size=shape["T"], x=torch.bfloat16, h=torch.bfloat16, dot=None)
    else:
        p = dict(G=shape["G"], Lc=shape["Lc"], r=roofline.R, M=roofline.M, heads=roofline.HEADS, F=roofline.F,
                 z=torch.float32, ctx=torch.bfloat16)
    return Case(kernel_op, f"{kernel_op}:{BENCH_TAG}{shape['id']}", p)


def benchmark_cases() -> List[Case]:
    """Every benchmark shape and mode of both ops: the launches whose waves the gate reports."""
    from . import roofline

    return [benchmark_case(op, mode, shape) for op, shapes in roofline.SHAPES.items()
            for shape in shapes for mode in roofline.MODES]


def _towers() -> List[Tuple[int, int]]:
    """(d, L) of every tower width with each of its sequence lengths, plus the odd width."""
    pairs = [(d, L) for d in IMAGE_WIDTHS for L in IMAGE_LENGTHS + SHORT_LENGTHS]
    pairs += [(d, L) for d in TEXT_WIDTHS for L in TEXT_LENGTHS + SHORT_LENGTHS]
    pairs += [(d, L) for d in ODD_WIDTHS for L in (197, 77) + SHORT_LENGTHS]
    return pairs


def _heads_for(r: int) -> List[int]:
    return [h for h in HEADS if r % h == 0]


def _contexts() -> List[int]:
    # An image alone, an image with one prompt (paired, K = 1), shared mode's
    # text-only group of 10 prompts, and the image plus 10 prompts.
    return [257, 197 + 77, 77 * 10, 257 + 77 * 10]


def _paired_cases(r, M, heads, oca_dtypes, synergy_dtypes) -> Iterator[Case]:
    big = PAIRED[0]
    for dt in oca_dtypes:
        yield from _oca_case(big["B"] * big["K"], 77, 768, r, M, heads, big["K"], dt)
    for spec in PAIRED[1:]:
        for dt in synergy_dtypes:
            yield from _synergy_case(spec["B"], 257 + 77 * spec["K"], r, M, heads, DEFAULT_F, dt)


# The default envelope: every dtype mix once, each tile class at its largest
# tiles, and the shape sweeps on top of specialisations already built.
# (dtype mix, (r, M, heads)) pairs; a mix's tile class is fp32 or low-precision.
# The OCA bounds next_pow2(r) * next_pow2(M) <= 1024 (its own input check), so
# its largest tiles are the widest adapter (r = 32, M = 32) and the most
# queries (r = 16, M = 64); the USEformer takes r = M = 64.
SMALLEST, DEFAULT = (16, 5, 4), (DEFAULT_R, DEFAULT_M, DEFAULT_HEADS)
WIDEST, MOST_QUERIES, LARGEST = (32, 32, 4), (16, 64, 2), (64, 64, 4)
# The USEformer's own bound is r <= 32, M <= 32 (nearl_kernels/synergy/ops.py):
# every dtype mix at its largest tile; LARGEST shows the refusal.
SYNERGY_LARGEST = (32, 32, 2)
DEFAULT_OCA = (
    (OCA_DTYPES[0], WIDEST),        # fp32 tiles at their largest
    (OCA_DTYPES[0], MOST_QUERIES),
    (OCA_DTYPES[0], DEFAULT),
    (OCA_DTYPES[1], DEFAULT),       # bf16; also the shape sweep and paired mode below
    (OCA_DTYPES[2], SMALLEST),      # fp16 tensor-core dots at the smallest tiles
    (OCA_DTYPES[3], WIDEST),        # low-precision tiles at their largest, fp32 x (autocast)
    (OCA_DTYPES[3], MOST_QUERIES),
    (OCA_DTYPES[4], DEFAULT),
    (OCA_DTYPES[5], DEFAULT),
)
DEFAULT_SYNERGY = tuple((dt, SYNERGY_LARGEST) for dt in SYNERGY_DTYPES) + (
    (SYNERGY_DTYPES[0], SMALLEST),
    (SYNERGY_DTYPES[0], LARGEST),   # outside the USEformer's bound: listed as refused
    (SYNERGY_DTYPES[1], DEFAULT),   # also the context and F sweep and paired mode below
)


def default_cases() -> List[Case]:
    """The envelope the tests gate on.

    Every OCA dtype mix once; the fp32 and the low-precision tiles at their
    largest (r = 32 with M = 32, and r = 16 with M = 64); fp16 at the smallest
    (r = 16, M = 5, 4 heads); at the default adapter in bf16 every tower width
    and length (with the odd width and the short sequence), a group of 4, and
    paired mode with 2,000 classes, and in fp32 every tower width and the odd one. The
    USEformer in fp32 at r = M = 64, and in bf16 and autocast (fp32 z, bf16
    ctx) at the default, with every context length and F in bf16, and paired
    mode. Widths, lengths and F are runtime values in the kernels, so the
    sweeps land on specialisations the dtype cases already build; what a sweep
    does specialise (a width not a multiple of 16, a group size of 1 or of a
    multiple of 16) is compiled too. ``full_cases`` adds the rest of the product.
    """
    cases: List[Case] = []
    for dt, (r, M, heads) in DEFAULT_OCA:
        cases += _oca_case(4, 197, 1664, r, M, heads, 1, dt)
    for dt, (r, M, heads) in DEFAULT_SYNERGY:
        cases += _synergy_case(4, 257 + 77 * 10, r, M, heads, FFN_HIDDEN[-1], dt)
    bf16, fp32 = OCA_DTYPES[1], OCA_DTYPES[0]
    for d, L in _towers():
        cases += _oca_case(4, L, d, DEFAULT_R, DEFAULT_M, DEFAULT_HEADS, 1, bf16)
    cases += _oca_case(8, 77, 768, DEFAULT_R, DEFAULT_M, DEFAULT_HEADS, 4, bf16)
    for d in IMAGE_WIDTHS + TEXT_WIDTHS + ODD_WIDTHS:
        cases += _oca_case(4, 77, d, DEFAULT_R, DEFAULT_M, DEFAULT_HEADS, 1, fp32)
    for Lc, F in itertools.product(_contexts() + [7], FFN_HIDDEN):
        cases += _synergy_case(4, Lc, DEFAULT_R, DEFAULT_M, DEFAULT_HEADS, F, SYNERGY_DTYPES[1])
    cases += _paired_cases(DEFAULT_R, DEFAULT_M, DEFAULT_HEADS, [bf16], [SYNERGY_DTYPES[1]])
    return cases + benchmark_cases()


def full_cases() -> List[Case]:
    """The whole product: every tower shape x r x M x heads x dtype mix (OCA),
    every context x r x M x heads x F x dtype mix (USEformer), and paired mode
    at every adapter; what the ops' input checks refuse is listed, not built.
    Thousands of launches; over the default it adds r, M and heads crossed
    with every dtype mix, and so the integer specialisations (H == 1, M and
    r / heads not multiples of 16) for each."""
    cases: List[Case] = []
    adapters = [(r, M, h) for r in ADAPTER_WIDTHS for M in QUERIES for h in _heads_for(r)]
    for (d, L), (r, M, heads), dt in itertools.product(_towers(), adapters, OCA_DTYPES):
        cases += _oca_case(4, L, d, r, M, heads, 1, dt)
    for (r, M, heads), dt in itertools.product(adapters, OCA_DTYPES):
        cases += _oca_case(8, 77, 768, r, M, heads, 4, dt)
    for Lc, F, (r, M, heads), dt in itertools.product(_contexts() + [7], FFN_HIDDEN, adapters, SYNERGY_DTYPES):
        cases += _synergy_case(4, Lc, r, M, heads, F, dt)
    for r, M, heads in adapters:
        cases += _paired_cases(r, M, heads, OCA_DTYPES, SYNERGY_DTYPES)
    return cases + benchmark_cases()


ENVELOPES = {"default": default_cases, "full": full_cases}


class StandInDriver:
    """Triton's active driver for a GPU that is not there: a target, a device id, a stream."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)
        self.capability = capability

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # Distinct per target, so Triton's per-device kernel caches do not mix targets.
        return self.capability

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


def _use_target(arch: Arch) -> None:
    from triton.runtime.driver import driver

    driver.set_active(StandInDriver(arch.capability))


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _call_oca(op: str, p: dict):
    from .oca import ops

    G, L, d, r, M = p["G"], p["L"], p["d"], p["r"], p["M"]
    x_dt, w_dt = p["x"], p["x"]
    x, h = _meta((G, L, d), x_dt), _meta((G, L, r), p["h"])
    z = _meta((G // p["group_size"], M, r), w_dt)
    weights = (_meta((r, r), w_dt), _meta((r, r), w_dt), _meta((r, d), w_dt), _meta((d,), w_dt))
    scales = (_meta((), torch.float32), _meta((), torch.float32))
    tail = (p["heads"], p["group_size"], 1e-6)
    extra = {} if p["dot"] is None else {"dot_dtype": p["dot"]}
    if op == "oca_fwd":
        ops.oca_fwd_triton(x, h, z, *weights, *scales, *tail, **extra)
    else:
        ops.oca_bwd_triton(_meta((G, L, d), x_dt), x, h, z, *weights, *scales, *tail, **extra)


def _call_synergy(op: str, p: dict):
    from .synergy import ops
    from .synergy.reference import PARAM_NAMES

    G, Lc, r, M = p["G"], p["Lc"], p["r"], p["M"]
    z, ctx = _meta((G, M, r), p["z"]), _meta((G, Lc, r), p["ctx"])
    mask = _meta((G, Lc), torch.bool)
    shapes = ops._param_shapes(r, p["F"])
    params = [_meta(shapes[n], p["z"]) for n in PARAM_NAMES]
    if op == "synergy_fwd":
        ops.synergy_fwd_triton(z, ctx, mask, params, p["heads"])
    else:
        o, lse = _meta((G, M, r), torch.float32), _meta((G, M, r), torch.float32)
        ops.synergy_bwd_triton(_meta((G, M, r), p["z"]), z, ctx, mask, params, o, lse, p["heads"])


def _call_launcher(case: Case) -> None:
    (_call_oca if case.op.startswith("oca") else _call_synergy)(case.op, case.params)


def _check_inputs(case: Case) -> None:
    """The public op's own input checks: what ``oca()`` / ``synergy_block()`` refuse
    (r, M and their tile product beyond the op's stated bounds) is outside any envelope.

    Raises ValueError/TypeError as the op would.
    """
    p = case.params
    if case.op.startswith("oca"):
        from .oca import ops

        G, L, d, r, M, dt = p["G"], p["L"], p["d"], p["r"], p["M"], p["x"]
        ops._check_oca_inputs(
            _meta((G, L, d), dt), _meta((G // p["group_size"], M, r), dt), _meta((d, r), dt), _meta((r,), dt),
            _meta((r, r), dt), _meta((r, r), dt), _meta((r, d), dt), _meta((d,), dt),
            _meta((), torch.float32), _meta((), torch.float32), p["heads"], p["group_size"], _meta((G, L, r), p["h"]))
    else:
        from .synergy import ops
        from .synergy.reference import PARAM_NAMES

        G, Lc, r, M = p["G"], p["Lc"], p["r"], p["M"]
        shapes = ops._param_shapes(r, p["F"])
        params = {n: _meta(shapes[n], p["z"]) for n in PARAM_NAMES}
        ops._check_synergy_inputs(_meta((G, M, r), p["z"]), _meta((G, Lc, r), p["ctx"]),
                                  _meta((G, Lc), torch.bool), params, p["heads"])


class TensorSpec(NamedTuple):
    """A meta tensor by value, so a launch can travel to a compile process."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype

    def build(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")


def _freeze(value):
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), tuple(value.stride()), value.dtype)
    return value


def _thaw(value):
    return value.build() if isinstance(value, TensorSpec) else value


@dataclasses.dataclass
class Task:
    """One distinct specialisation of one kernel for one target, and the cases that chose it."""

    arch: str
    kernel: str              # the kernel's Python name
    kernel_ref: Tuple[str, str]  # (module, qualified name), to find it in a compile process
    key: str
    config: str
    args: tuple
    kwargs: dict
    grids: Dict[str, Tuple[int, ...]] = dataclasses.field(default_factory=dict)  # case label -> grid
    cost: int = 0            # a guess at compile time, to start the long compiles first


def _kernel_ref(kernel) -> Tuple[str, str]:
    fn = getattr(kernel, "fn", kernel)
    return fn.__module__, fn.__qualname__


def _resolve(ref: Tuple[str, str]):
    """The JITFunction named by ``ref`` (unwrapping @triton.autotune / @triton.heuristics)."""
    from triton.runtime.jit import JITFunction

    module = sys.modules.get(ref[0]) or importlib.import_module(ref[0])
    obj = module
    for part in ref[1].split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


@contextlib.contextmanager
def _every_autotune_config():
    """An autotuned kernel may launch with any of its configs: launch each, instead of benchmarking."""
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.run

    def run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.configs
        if self.early_config_prune and len(configs) > 1:
            configs = self.early_config_prune(configs, self.nargs, **kwargs)
        for config in configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    Autotuner.run = run
    try:
        yield
    finally:
        Autotuner.run = original


def _specialisation(kernel, args, kwargs) -> Tuple[str, str]:
    """(cache key, readable config) of a launch: what Triton's binder specialises on."""
    from triton.runtime.driver import driver

    device = driver.active.get_current_device()
    # The binder is the last entry of a device cache in every release (3.4: 4 entries, 3.5+: 5).
    binder = kernel.device_caches[device][-1]
    _, specialization, options = binder(*args, **kwargs)
    key = repr((specialization, sorted(options.items())))
    parts, ptrs, ints = [], {}, []
    for param, (kind, attr) in zip(kernel.params, specialization):
        if kind == "constexpr":
            value = getattr(attr, "name", attr) if not isinstance(attr, (int, float, str, bool)) else attr
            parts.append(f"{param.name}={value}")
        elif kind.startswith("*"):
            if kind != "*fp32":
                ptrs.setdefault(kind[1:], []).append(param.name.removesuffix("_ptr"))
        elif attr == "D" and not param.do_not_specialize:
            ints.append(f"{param.name}%16")
        elif kind == "i64":
            ints.append(f"{param.name}:i64")
    parts += [f"{dt}:{','.join(names)}" for dt, names in ptrs.items()]
    parts += ints
    opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "maxnreg")}
    parts += [f"{k}={v}" for k, v in sorted(opts.items())]
    return key, " ".join(str(p) for p in parts)


def _cost_guess(launch) -> int:
    """Kernel source length times the square root of its tile volume (the B* constexprs)."""
    tile = 1
    for name, value in launch.arguments.items():
        if name.startswith("B") and isinstance(value, int) and not isinstance(value, bool):
            tile *= max(value, 1)
    return int(len(getattr(launch.kernel, "src", "")) * math.sqrt(tile))


def _patched_sm_count(arch: Arch):
    """Point every module that holds ``_dispatch.sm_count`` at the target's SM count."""
    from . import _dispatch

    original = _dispatch.sm_count
    fake = lambda device: arch.sm_count  # noqa: E731
    holders = [m for name, m in list(sys.modules.items())
               if name.startswith("nearl_kernels") and getattr(m, "sm_count", None) is original]
    for m in holders:
        m.sm_count = fake
    return holders, original


class LaunchRecord(NamedTuple):
    """One launch of one case, in the order the launcher made it."""

    case: str
    kernel: str
    key: str                 # the specialisation it compiled as (Task.key)
    grid: Tuple[int, ...]


def collect(cases: List[Case], arch: Arch
            ) -> Tuple[List[Task], List[dict], Dict[str, List[str]], List[LaunchRecord]]:
    """Run each case's launcher on meta tensors for ``arch``; group launches by specialisation.

    Returns (tasks, case failures, refused, launches): a launcher that raises
    is a failure of its case (a signature the kernel no longer has, ...); a
    case the public op's input checks refuse is not run, and listed in
    ``refused`` by reason; ``launches`` is every launch in order.
    """
    from ._launch_hook import intercept_launches

    _use_target(arch)
    holders, original = _patched_sm_count(arch)
    tasks: Dict[Tuple[str, str], Task] = {}
    failures: Dict[Tuple[str, str], dict] = {}
    refused: Dict[str, List[str]] = {}
    current: List[Case] = []
    records: List[LaunchRecord] = []

    def on_launch(launch):
        case = current[0]
        ref = _kernel_ref(launch.kernel)
        try:
            key, config = _specialisation(launch.kernel, launch.args, launch.kwargs)
        except Exception as e:  # the binder rejects an argument: Triton would too
            key, config = f"bind-error:{e!r}", "-"
        task = tasks.get((launch.name, key))
        if task is None:
            task = tasks[launch.name, key] = Task(
                arch.name, launch.name, ref, key, config,
                tuple(_freeze(a) for a in launch.args), {k: _freeze(v) for k, v in launch.kwargs.items()},
                cost=_cost_guess(launch))
        task.grids[case.label] = tuple(int(g) for g in launch.grid)
        records.append(LaunchRecord(case.label, launch.name, key, task.grids[case.label]))
        return None

    try:
        with intercept_launches(on_launch), _every_autotune_config():
            for case in cases:
                current[:] = [case]
                try:
                    _check_inputs(case)
                except (ValueError, TypeError) as e:
                    refused.setdefault(str(e), []).append(case.label)
                    continue
                except Exception:
                    pass  # the checks moved or changed shape: the launcher still runs
                try:
                    _call_launcher(case)
                except Exception as e:
                    reason = f"launcher raised {_first_line(e)}"
                    f = failures.setdefault((case.op, reason), dict(
                        kernel=f"{case.op}_triton", config="-", target=arch.name, reason=reason, cases=[]))
                    f["cases"].append(case.label)
    finally:
        for m in holders:
            m.sm_count = original
    return list(tasks.values()), list(failures.values()), refused, records


def _first_line(e: BaseException) -> str:
    """``Type: message`` on one line; for Triton's CompilationError, where and why.

    A CompilationError's text is a source excerpt; its reason may sit on an
    inner error (a helper's own CompilationError, or the Python error under it).
    """
    if hasattr(e, "error_message") and hasattr(e, "node"):
        chain, seen = [], set()
        cur = e
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            chain.append(cur)
            cur = cur.__cause__ or cur.__context__
        reason = ""
        for err in reversed(chain):
            if getattr(err, "error_message", None):
                reason = str(err.error_message).strip().splitlines()[0]
                break
            if not hasattr(err, "error_message") and str(err).strip():
                reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
                break
        lines = str(e).splitlines()
        caret = next((i for i, ln in enumerate(lines) if ln.strip() == "^"), None)
        where = f"at {e.node.lineno}:{e.node.col_offset}" if hasattr(e.node, "lineno") else ""
        if caret:
            where += f" `{lines[caret - 1].strip()}`"
        return f"{type(e).__name__}: {where}: {reason or 'no reason given'}"[:400]
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0]
    # ptxas: a generic first line, the reason on the first "error" line after it.
    cause = next((ln for ln in lines[1:] if re.search(r"\berror\b", ln, re.I)), None)
    if cause:
        text = f"{text} {cause}"
    return f"{type(e).__name__}: {text}"[:400]


_LOWP = ("bf16", "f16")
# "... tt.dot %a, %b, %c[, inputPrecision = tf32] : tensor<64x32xbf16, ...> * ... -> tensor<64x64xf32, #mma>"
_DOT = re.compile(r"=\s*tt\.dot\s.*?:\s*tensor<(?:\d+x)+(\w+)[,>].*?->\s*tensor<(?:\d+x)+\w+,\s*(#[\w.]+)")
_WGMMA = re.compile(r"=\s*ttng\.warp_group_dot\s.*?:\s*(?:!ttg\.memdesc|tensor)<(?:\d+x)+(\w+)[,>]")
_DOT_PRECISION = re.compile(r"inputPrecision\s*=\s*(\w+)")


def dot_report(ttgir: str) -> dict:
    """Every dot in a TTGIR module: operand type, precision, and whether it runs on tensor cores.

    Returns {"dots": [...], "mma": "yes" | "no" | "n.a.", "problems": [...]}:
    a bf16/fp16 ``tt.dot``, or an fp32 one asking for TF32, must have an
    ``#ttg.nvidia_mma`` result encoding, or be a ``ttng.warp_group_dot`` (sm_90
    wgmma); an fp32 dot with input_precision ieee may be FMA. "n.a.": no dot
    needs tensor cores.
    """
    aliases = dict(re.findall(r"^(#[\w.]+)\s*=\s*(#[\w.]+)", ttgir, re.M))
    dots, problems = [], []
    for line in ttgir.splitlines():
        m = _WGMMA.search(line)
        if m:
            dots.append(dict(op="ttng.warp_group_dot", operand=m.group(1), precision="-", encoding="wgmma",
                             mma=True, needs_mma=True))
            continue
        m = _DOT.search(line)
        if not m:
            continue
        dtype, encoding = m.group(1), m.group(2)
        precision = (_DOT_PRECISION.search(line) or [None, "ieee"])[1]
        resolved = aliases.get(encoding, encoding)
        mma = resolved.startswith("#ttg.nvidia_mma") or resolved.startswith("#mma")
        needs = dtype in _LOWP or precision != "ieee"
        dots.append(dict(op="tt.dot", operand=dtype, precision=precision, encoding=encoding, mma=mma,
                         needs_mma=needs))
        if needs and not mma:
            problems.append(f"{dtype} tt.dot (inputPrecision {precision}) lowered to {encoding}, not tensor cores")
    mma = "n.a." if not any(d["needs_mma"] for d in dots) else ("no" if problems else "yes")
    return dict(dots=dots, mma=mma, problems=problems)


def parse_ptxas_log(log: str) -> Optional[dict]:
    """Registers, spills and stack from a ``ptxas -v`` log (None if it has none)."""
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        return None
    return dict(
        registers=max(regs),
        stack=sum(int(s[0]) for s in spills),
        spill_stores=sum(int(s[1]) for s in spills),
        spill_loads=sum(int(s[2]) for s in spills),
    )


def ptxas_report(ptx: str, enable_fp_fusion: bool = True, ptx_options: Optional[str] = None) -> dict:
    """Registers, spills and stack of a PTX module, from the bundled ``ptxas -v``
    with the flags Triton's own make_cubin passes."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    capability = int(re.sub(r"\D", "", target))
    try:
        ptxas = get_ptxas(capability).path
    except Exception:
        import triton

        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.TemporaryDirectory(prefix="nearl-gate-") as tmp:
        src, obj = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.o")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={target}", src, "-o", obj]
        if not enable_fp_fusion:
            cmd.insert(1, "--fmad=false")
        if ptx_options:
            cmd[1:1] = ptx_options.split()
        out = subprocess.run(cmd, capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode:
        raise RuntimeError(f"ptxas failed ({out.returncode}): {log.strip().splitlines()[-1] if log.strip() else ''}")
    report = parse_ptxas_log(log)
    if report is None:
        raise RuntimeError(f"ptxas -v reported no register use for {target}")
    return report


def occupancy(arch: Arch, registers: int, num_warps: int, shared: int) -> Tuple[int, str]:
    """Resident blocks per SM and what limits it (CUDA's occupancy rules, sm_80/sm_90 units)."""
    threads = num_warps * 32
    regs_per_warp = math.ceil(max(registers, 1) * 32 / arch.reg_alloc_unit) * arch.reg_alloc_unit
    limits = {
        "blocks": arch.blocks_per_sm,
        "threads": arch.threads_per_sm // threads,
        "registers": (arch.regs_per_sm // regs_per_warp) // num_warps,
        "shared": arch.smem_per_sm // (shared + arch.smem_reserved_per_block),
    }
    limiter = min(limits, key=lambda k: limits[k])
    return limits[limiter], limiter


def _compile_capturing_ptxas_log(kernel, args, kwargs):
    """``kernel.run(..., warmup=True)`` with Triton's ``ptxas -v`` log, which it prints when asked."""
    from triton import knobs

    buf = io.StringIO()
    # Triton 3.4 has no such knob: the caller runs ptxas -v itself then.
    has_knob = hasattr(knobs.nvidia, "dump_ptxas_log")
    old = getattr(knobs.nvidia, "dump_ptxas_log", None)
    if has_knob:
        knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            ck = kernel.run(*args, grid=(1,), warmup=True, **kwargs)
    finally:
        if has_knob:
            knobs.nvidia.dump_ptxas_log = old
    return ck, buf.getvalue()


def compile_task(task: Task) -> dict:
    """Compile one specialisation for its target; return what the compiler reported (never raises)."""
    arch = ARCHS[task.arch]
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    try:
        _use_target(arch)
        kernel = _resolve(task.kernel_ref)
        args = tuple(_thaw(a) for a in task.args)
        kwargs = {k: _thaw(v) for k, v in task.kwargs.items()}
        ck, log = _compile_capturing_ptxas_log(kernel, args, kwargs)
        md = ck.metadata
        result = dict(shared=int(md.shared), num_warps=int(md.num_warps), num_stages=int(md.num_stages))
        # Triton's own ptxas -v log when it compiled just now; on a cache hit, run ptxas again.
        usage = parse_ptxas_log(log) or ptxas_report(
            ck.asm["ptx"], getattr(md, "enable_fp_fusion", True), getattr(md, "ptx_options", None))
        result.update(usage)
        result.update(dot_report(ck.asm["ttgir"]))
    except Exception as e:
        result = dict(error=_first_line(e))
    result["compile_s"] = round(time.perf_counter() - start, 2)
    result["cpu_s"] = round(_cpu_seconds() - cpu_start, 2)
    return result


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): wall time lies on a busy machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def check_launch(kernel, args: tuple, kwargs: dict, grid: Tuple[int, ...], arch: str = "sm_90",
                 label: str = "launch") -> dict:
    """Compile one ``kernel[grid](*args, **kwargs)`` for ``arch`` in this process and judge it.

    Arguments are meta tensors and Python values, as a launcher passes them.
    Returns the table row; ``row["failures"]`` lists every reason it fails the gate.

    Example:
        >>> row = check_launch(my_kernel, (x_meta, y_meta, 128), dict(BLOCK=64), (4,), "sm_80")
        >>> row["status"], row["registers"], row["failures"]
    """
    spec = ARCHS[arch]
    _use_target(spec)
    name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
    try:
        key, config = _specialisation(kernel, args, kwargs)
    except Exception as e:
        key, config = f"bind-error:{e!r}", "-"
    task = Task(arch, name, _kernel_ref(kernel), key, config, tuple(_freeze(a) for a in args),
                {k: _freeze(v) for k, v in kwargs.items()}, {label: tuple(int(g) for g in grid)})
    return judge(task, compile_task(task))


def _compile_all(tasks: List[Task], jobs: int, progress) -> List[dict]:
    """Compile every task, ``jobs`` processes at once; a crashed compiler fails its task only."""
    results: List[Optional[dict]] = [None] * len(tasks)
    if jobs <= 1:
        for i, t in enumerate(tasks):
            results[i] = compile_task(t)
            progress(t, results[i])
        return results
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    # Longest first (a guess), so a long compile does not end the run alone.
    pending = sorted(range(len(tasks)), key=lambda i: -tasks[i].cost)
    crashed: List[int] = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(compile_task, tasks[i]): i for i in pending}
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                results[i] = fut.result()
                progress(tasks[i], results[i])
            except BrokenProcessPool:
                crashed.append(i)
    # A compiler that crashed its process takes the pool down with it: run
    # what was left one process each, so only the culprit fails.
    for i in crashed:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            try:
                results[i] = pool.submit(compile_task, tasks[i]).result()
            except BrokenProcessPool:
                results[i] = dict(error="the compiler crashed its process", compile_s=0.0, cpu_s=0.0)
        progress(tasks[i], results[i])
    return results


def judge(task: Task, result: dict) -> dict:
    """One table row: the compiler's figures and every reason this specialisation fails the gate."""
    arch = ARCHS[task.arch]
    row = dict(kernel=task.kernel, config=task.config, target=task.arch, key=task.key,
               cases=sorted(task.grids), compile_s=result.get("compile_s"))
    failures = []
    for label, grid in sorted(task.grids.items()):
        over = [f"axis {a} = {g:,} > {lim:,}" for a, (g, lim) in enumerate(zip(grid, GRID_LIMITS)) if g > lim]
        if over:
            failures.append(f"grid {grid} over CUDA's limits ({'; '.join(over)}) in {label}")
    row["grid_max"] = [max(g[a] if a < len(g) else 1 for g in task.grids.values()) for a in range(3)]
    if "error" in result:
        row.update(registers=None, spills=None, shared=None, blocks_per_sm=None, mma="?")
        failures.insert(0, f"compile error: {result['error']}")
    else:
        row.update({k: result[k] for k in ("registers", "stack", "spill_stores", "spill_loads", "shared",
                                            "num_warps", "num_stages", "mma", "dots")})
        row["spills"] = result["spill_stores"] + result["spill_loads"]
        blocks, limiter = occupancy(arch, result["registers"], result["num_warps"], result["shared"])
        row.update(blocks_per_sm=blocks, occupancy_limiter=limiter)
        if result["shared"] > arch.smem_per_block:
            failures.append(f"shared memory {result['shared']:,} B > {arch.smem_per_block:,} B per block")
        if row["spills"]:
            failures.append(f"register spills: {result['spill_stores']} B stored, {result['spill_loads']} B loaded "
                            f"({result['registers']} registers)")
        failures += result["problems"]
        if blocks < 1 and result["shared"] <= arch.smem_per_block:
            failures.append(f"a block does not fit on an SM ({limiter})")
    row["failures"] = failures
    row["status"] = "FAIL" if failures else "ok"
    return row


def waves(programs: int, arch: Arch, blocks_per_sm: Optional[int]) -> Optional[float]:
    """Programs over what the GPU runs at once (SMs x resident blocks per SM); None if unknown."""
    if not blocks_per_sm:
        return None
    return programs / (arch.sm_count * blocks_per_sm)


def wave_rows(records: List["LaunchRecord"], rows: List[dict], arch: Arch) -> List[dict]:
    """Programs and waves of every launch of the benchmark cases, in launch order; a launch
    under one full wave leaves SMs idle for its whole run and is flagged."""
    by_key = {(r["kernel"], r["key"]): r for r in rows if r.get("key") is not None}
    out = []
    for rec in records:
        if BENCH_TAG not in rec.case:
            continue
        row = by_key.get((rec.kernel, rec.key))
        blocks = row["blocks_per_sm"] if row else None
        programs = math.prod(rec.grid)
        w = waves(programs, arch, blocks)
        out.append(dict(case=rec.case, kernel=rec.kernel, grid=list(rec.grid), programs=programs,
                        blocks_per_sm=blocks, sm_count=arch.sm_count, waves=None if w is None else round(w, 3),
                        under_one_wave=w is not None and w < 1))
    return out


WAVE_COLUMNS = ("case", "kernel", "programs", "blocks/SM", "waves", "flag")


def render_waves(wave_list: List[dict]) -> str:
    lines = ["| " + " | ".join(WAVE_COLUMNS) + " |", "|" + "---|" * len(WAVE_COLUMNS)]
    for w in wave_list:
        cells = [w["case"], w["kernel"], f"{w['programs']:,}", "-" if w["blocks_per_sm"] is None else
                 str(w["blocks_per_sm"]), "-" if w["waves"] is None else f"{w['waves']:.2f}",
                 "**< 1 wave**" if w["under_one_wave"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _launcher_row(f: dict) -> dict:
    return dict(kernel=f["kernel"], config="-", target=f["target"], key=None, cases=f["cases"],
                registers=None, spills=None, shared=None, blocks_per_sm=None, mma="?", grid_max=None,
                compile_s=None, failures=[f["reason"]], status="FAIL")


COLUMNS = ("kernel", "config", "target", "registers", "spills", "shared (B)", "blocks/SM", "MMA", "cases", "status")


def _cells(row: dict) -> List[str]:
    def num(v):
        return "-" if v is None else f"{v:,}"

    blocks = "-" if row["blocks_per_sm"] is None else f"{row['blocks_per_sm']} ({row['occupancy_limiter']})"
    return [row["kernel"], row["config"], row["target"], num(row["registers"]), num(row["spills"]),
            num(row["shared"]), blocks, row["mma"], str(len(row["cases"])), row["status"]]


def render_table(rows: List[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def render_console(rows: List[dict]) -> str:
    table = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def _versions() -> dict:
    import triton

    return dict(triton=triton.__version__, torch=torch.__version__)


def write_report(out_dir: str, arch: Arch, rows: List[dict], header: dict,
                 wave_list: Optional[List[dict]] = None) -> Tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, arch.name.replace("_", ""))
    failed = [r for r in rows if r["status"] == "FAIL"]
    doc = dict(header, arch=arch.name, gpu=arch.gpu, sm_count=arch.sm_count,
               limits=dict(smem_per_block=arch.smem_per_block, smem_per_sm=arch.smem_per_sm,
                           regs_per_sm=arch.regs_per_sm, threads_per_sm=arch.threads_per_sm,
                           blocks_per_sm=arch.blocks_per_sm, grid=list(GRID_LIMITS)),
               passed=not failed, rows=rows, waves=wave_list or [])
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1, default=str)
    md = [
        f"# Compile gate: {arch.name} ({arch.gpu}, {arch.sm_count} SMs)",
        "",
        f"triton {header['triton']}, torch {header['torch']}; envelope `{header['envelope']}`: "
        f"{header['cases'][arch.name]} launcher calls -> {len(rows)} rows; "
        f"wall time {header['wall_s']:.1f} s for the whole run ({', '.join(header['archs'])}, "
        f"{header['jobs']} compile processes); compiling for {arch.name} took "
        f"{header['compile_cpu_s'][arch.name]:.1f} CPU s.",
        "",
        f"Limits: shared memory {arch.smem_per_block:,} B per block, {arch.smem_per_sm:,} B per SM; "
        f"{arch.regs_per_sm:,} registers, {arch.threads_per_sm:,} threads, {arch.blocks_per_sm} blocks per SM; "
        "grid axis 0 <= 2^31 - 1, axes 1, 2 <= 65,535.",
        "",
        f"**{'PASS' if not failed else f'FAIL: {len(failed)} of {len(rows)} rows'}**",
        "",
        render_table(rows),
    ]
    if failed:
        md += ["", "## Failures", ""]
        for r in failed:
            for reason in r["failures"]:
                md.append(f"- `{r['kernel']}` [{r['config']}] on {r['target']}: {reason} "
                          f"(e.g. {r['cases'][0]})")
    if wave_list:
        under = sum(w["under_one_wave"] for w in wave_list)
        md += ["", "## Programs and waves at the benchmark shapes", "",
               f"The benchmarks' launches (shapes in `nearl_kernels/roofline.py`): waves = programs / "
               f"({arch.sm_count} SMs x blocks per SM). A launch under one full wave leaves SMs idle for "
               f"its whole run: flagged ({under} of {len(wave_list)}), not failed.", "",
               render_waves(wave_list)]
    refused = header["refused"].get(arch.name, {})
    if refused:
        md += ["", "## Outside the ops' own bounds (not compiled)", ""]
        md += [f"- {len(labels)} cases: {reason} (e.g. {labels[0]})" for reason, labels in refused.items()]
    md += ["", "Cases per row are listed in the JSON beside this file."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    return stem + ".md", stem + ".json"


def run_gate(arch_names: List[str], envelope: str = "default", jobs: Optional[int] = None,
             out_dir: Optional[str] = None, case_filter: Optional[str] = None, quiet: bool = False) -> dict:
    """Collect, compile, judge and (if ``out_dir``) write the gate for each target.

    Returns {"rows": {arch: [row, ...]}, "passed": bool, "wall_s": float}.
    """
    start = time.perf_counter()
    jobs = jobs or _cores()
    cases = ENVELOPES[envelope]()
    if case_filter:
        cases = [c for c in cases if re.search(case_filter, c.label)]
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    tasks, launcher_failures, n_cases, refused, records = [], {}, {}, {}, {}
    for name in arch_names:
        arch = ARCHS[name]
        t0 = time.perf_counter()
        arch_tasks, failures, refused[name], records[name] = collect(cases, arch)
        tasks += arch_tasks
        launcher_failures[name] = failures
        n_refused = sum(len(v) for v in refused[name].values())
        n_cases[name] = len(cases) - n_refused
        log(f"{name}: {len(cases)} launcher calls, {n_refused} refused by the ops' input checks -> "
            f"{len(arch_tasks)} specialisations ({time.perf_counter() - t0:.1f} s to build), "
            f"{len(failures)} launcher failures")
    done = [0]

    def progress(task, result):
        done[0] += 1
        status = "error" if "error" in result else "ok"
        log(f"[{done[0]}/{len(tasks)}] {task.arch} {task.kernel} {task.config}: {status} "
            f"({result['compile_s']} s, {result['cpu_s']} CPU s)")

    results = _compile_all(tasks, jobs, progress)
    wall = time.perf_counter() - start
    rows: Dict[str, List[dict]] = {}
    wave_lists: Dict[str, List[dict]] = {}
    for name in arch_names:
        judged = [judge(t, r) for t, r in zip(tasks, results) if t.arch == name]
        judged.sort(key=lambda r: (r["kernel"], r["config"]))
        rows[name] = [_launcher_row(f) for f in launcher_failures[name]] + judged
        wave_lists[name] = wave_rows(records[name], judged, ARCHS[name])
    cpu = {name: round(sum(r.get("cpu_s", 0.0) for t, r in zip(tasks, results) if t.arch == name), 1)
           for name in arch_names}
    header = dict(_versions(), envelope=envelope, wall_s=wall, jobs=jobs, archs=arch_names, cases=n_cases,
                  compile_cpu_s=cpu, case_filter=case_filter, refused=refused)
    if out_dir:
        for name in arch_names:
            write_report(out_dir, ARCHS[name], rows[name], header, wave_lists[name])
    passed = all(r["status"] == "ok" for rs in rows.values() for r in rs)
    return dict(rows=rows, passed=passed, wall_s=wall, header=header, waves=wave_lists)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def main(argv: Optional[List[str]] = None) -> int:
    """The CLI: ``[--arch sm_90,sm_80] [--envelope default|full] [--jobs N] [--out DIR] [--filter RE]``.

    Returns 0 when every row passes, 1 when any fails (2 on a usage error).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m nearl_kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sm_90,sm_80", help="comma-separated targets: " + ", ".join(ARCHS))
    parser.add_argument("--envelope", default="default", choices=sorted(ENVELOPES))
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: all cores)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "compile_gate"),
                        help="directory for sm90.md/json, sm80.md/json")
    parser.add_argument("--filter", default=None, help="only the cases whose label matches this regex")
    parser.add_argument("--triton", default=None,
                        help="comma-separated Triton releases (e.g. 3.4.0,3.6.0,3.9.0): install each into a cache "
                             "and run the gate under it, one report per release under OUT/triton-X.Y.Z")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        parser.error(f"--arch must be a comma-separated subset of {', '.join(ARCHS)}; got {args.arch!r}")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1; got {args.jobs}")
    if args.triton:
        from .triton_releases import run_matrix

        versions = [v.strip() for v in args.triton.split(",") if v.strip()]
        if not versions or not all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in versions):
            parser.error(f"--triton must be comma-separated releases like 3.4.0,3.9.0; got {args.triton!r}")
        rest = ["--arch", args.arch, "--envelope", args.envelope]
        rest += (["--jobs", str(args.jobs)] if args.jobs else []) + (["--filter", args.filter] if args.filter else [])
        return run_matrix(versions, rest, args.out)
    expected = os.environ.get("NEARL_EXPECT_TRITON")
    if expected and _versions()["triton"] != expected:
        print(f"compile_check: asked for triton {expected} but imported {_versions()['triton']}", file=sys.stderr)
        return 2
    if _interpreting():
        # Under the interpreter @triton.jit builds no compiler path: run again without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        print("compile_check: TRITON_INTERPRET is set; running again without it", file=sys.stderr)
        return subprocess.call([sys.executable, "-m", "nearl_kernels.compile_check", *argv], env=env)

    gate = run_gate(archs, args.envelope, args.jobs, args.out, args.filter)
    for name in archs:
        print(f"\n{name} ({ARCHS[name].gpu}, {ARCHS[name].sm_count} SMs):")
        print(render_console(gate["rows"][name]))
        under = [w for w in gate["waves"][name] if w["under_one_wave"]]
        for w in under:
            print(f"under one wave: {w['kernel']} in {w['case']}: {w['programs']:,} programs, "
                  f"{w['blocks_per_sm']} blocks/SM -> {w['waves']:.2f} waves")
    failures = [(r, reason) for rs in gate["rows"].values() for r in rs for reason in r["failures"]]
    for r, reason in failures:
        print(f"FAIL {r['kernel']} [{r['config']}] {r['target']}: {reason}", file=sys.stderr)
    n_rows = sum(len(rs) for rs in gate["rows"].values())
    verdict = "PASS" if gate["passed"] else f"FAIL ({len(failures)} failures)"
    cpu = sum(gate["header"]["compile_cpu_s"].values())
    print(f"\ncompile gate {verdict}: {n_rows} rows over {', '.join(archs)}, envelope {args.envelope}, "
          f"{gate['wall_s']:.1f} s wall, {cpu:.1f} CPU s compiling; reports in {args.out}")
    return 0 if gate["passed"] else 1


if __name__ == "__main__":
    # Run from the module's importable name, so what the compile processes
    # unpickle (tasks, compile_task) is the same class as here, not __main__'s.
    from nearl_kernels.compile_check import main as _main

    sys.exit(_main())
