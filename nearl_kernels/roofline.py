"""Each kernel against the roofline at the benchmark shapes: minimal bytes, FLOPs, programs launched.

The benchmark shapes live here, and ``benchmarks/bench_oca.py`` and
``bench_synergy.py`` take their GPU rows from this module, so the figures in
the kernel files' headers, the compile gate's waves and the timed rows are
about the same shapes. Per op and mode:

- minimal bytes: every input read once and every output written once, in the
  dtypes the benchmark uses (activations bf16, the adapter's weights and the
  synergy queries fp32): what no implementation can avoid moving;
- FLOPs: the op's maths (the formula the benchmarks divide by); a backward
  counts twice its forward, the benchmarks' convention;
- launches: every Triton kernel the launcher launches and its grid, taken by
  calling the real launcher on ``meta`` tensors with its launches intercepted
  (as the compile gate does), with the SM count of an H100/H200.

``python -m nearl_kernels.roofline --write`` rewrites each kernel file's
header block from these functions; ``tests/test_roofline.py`` fails when a
header no longer matches them.
"""

import math
import os
import sys
from typing import List, NamedTuple, Tuple

# Measured on the H200 of issue 17 (torch 2.11, triton 3.6): a device-to-device
# copy and a large bf16 matmul. The floors below are these, not datasheet peaks.
COPY_BYTES_PER_S = 4.3e12
MATMUL_FLOPS_PER_S = 790e12
SMS = 132  # sm_90, H100/H200 SXM

# The adapter every benchmark runs (NearlConfig's defaults): width r, synergy
# queries M, heads, and the USEformer FFN ratio (hidden width F = ratio * r).
R, M, HEADS, FFN_RATIO = 32, 16, 2, 14
F = FFN_RATIO * R
# ViT-B/16 image tokens (197) and K = 4 prompts of 16 tokens: the text tower's
# truncated prompts, and the synergy context of one image with its prompts.
OCA_SHAPES = (
    dict(id="image-G64-L197-d768", G=64, L=197, d=768, T=1),
    dict(id="text-G256-L16-d512-T4", G=256, L=16, d=512, T=4),
)
SYNERGY_SHAPES = (dict(id="G64-Lc261-K4", G=64, Lc=197 + 4 * 16),)
SHAPES = {"oca": OCA_SHAPES, "synergy": SYNERGY_SHAPES}
MODES = ("forward", "backward")

_BF16, _FP32, _BOOL = 2, 4, 1


def oca_flops(G: int, L: int, d: int, T: int, r: int = R, m: int = M) -> int:
    """Forward FLOPs of the OCA: per token the attention over M queries (4 M r), the
    up-projection (2 r d) and the orthogonal split (8 d); per group k = z W_k, v = z W_v."""
    return G * L * (4 * r * m + 2 * r * d + 8 * d) + 4 * (G // T) * m * r * r


def synergy_flops(G: int, Lc: int, r: int = R, m: int = M, hidden: int = F) -> int:
    """Forward FLOPs of one USEformer block: q, k/v over the context, scores and
    weighted sum, output projection, FFN."""
    return G * (2 * m * r * r + 4 * Lc * r * r + 4 * m * Lc * r + 2 * m * r * r + 4 * m * r * hidden)


def synergy_param_count(r: int = R, hidden: int = F) -> int:
    """The block's 17 tensors: 3 LayerNorms, q/k/v/o (r x r), biases of q, v, o, and the FFN."""
    return 3 * 2 * r + 4 * r * r + 3 * r + 2 * r * hidden + hidden + r


def oca_bytes(shape: dict, mode: str, r: int = R, m: int = M) -> int:
    """Every tensor of the op read or written once: x, h, y (dy, dx, dh) in bf16, the
    queries z and the weights in fp32."""
    G, L, d, T = shape["G"], shape["L"], shape["d"], shape["T"]
    tokens = G * L * (d + r) * _BF16                      # x and h
    weights = ((G // T) * m * r + 2 * r * r + r * d + d + 2) * _FP32  # z, w_k, w_v, w_up, b_up, scales
    if mode == "forward":
        return tokens + G * L * d * _BF16 + weights       # + y
    return 2 * tokens + G * L * d * _BF16 + 2 * weights    # + dy; dx, dh; the weights and their gradients


def synergy_bytes(shape: dict, mode: str, r: int = R, m: int = M, hidden: int = F) -> int:
    """Queries z (fp32), context (bf16) and its mask, the block's parameters (fp32), each once."""
    G, Lc = shape["G"], shape["Lc"]
    z = G * m * r * _FP32
    ctx = G * Lc * r * _BF16 + G * Lc * _BOOL
    params = synergy_param_count(r, hidden) * _FP32
    if mode == "forward":
        return 2 * z + ctx + params                       # z in, z out
    return 3 * z + 2 * ctx - G * Lc * _BOOL + 2 * params  # dz, z in, dz out; ctx in, dctx out; params, dparams


def launch_grids(op: str, mode: str, shape: dict, arch: str = "sm_90") -> List[Tuple[str, Tuple[int, ...]]]:
    """(kernel name, grid) of every Triton launch the op's launcher makes at ``shape``, in order,
    with ``arch``'s SM count where a launcher sizes a grid to the GPU. No GPU needed."""
    from . import compile_check
    from ._launch_hook import intercept_launches

    case = compile_check.benchmark_case(op, mode, shape)
    seen: List[Tuple[str, Tuple[int, ...]]] = []
    holders, original = compile_check._patched_sm_count(compile_check.ARCHS[arch])
    try:
        with intercept_launches(lambda launch: seen.append((launch.name, tuple(int(g) for g in launch.grid)))):
            compile_check._call_launcher(case)
    finally:
        for module in holders:
            module.sm_count = original
    return seen


class Figures(NamedTuple):
    op: str
    shape: str
    mode: str
    bytes: int
    flops: int
    launches: List[Tuple[str, int]]  # (kernel, programs)

    @property
    def floor_us(self) -> float:
        """The larger of the copy time and the matmul time, in microseconds."""
        return max(self.bytes / COPY_BYTES_PER_S, self.flops / MATMUL_FLOPS_PER_S) * 1e6


def figures(op: str) -> List[Figures]:
    """Every benchmark shape and mode of ``op`` ("oca" or "synergy")."""
    rows = []
    for shape in SHAPES[op]:
        for mode in MODES:
            if op == "oca":
                nbytes = oca_bytes(shape, mode)
                flops = oca_flops(shape["G"], shape["L"], shape["d"], shape["T"])
            else:
                nbytes = synergy_bytes(shape, mode)
                flops = synergy_flops(shape["G"], shape["Lc"])
            flops *= 1 if mode == "forward" else 2
            launches = [(name, math.prod(grid)) for name, grid in launch_grids(op, mode, shape)]
            rows.append(Figures(op, shape["id"], mode, nbytes, flops, launches))
    return rows


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _gflop(n: int) -> str:
    return f"{n / 1e9:.3f} GFLOP"


def header(op: str) -> str:
    """The block each ``nearl_kernels/<op>/kernels.py`` docstring carries, verbatim."""
    lines = [f"At the benchmark shapes (r = {R}, M = {M}, {HEADS} heads" + (f", F = {F}" if op == "synergy" else "") +
             "; bf16 activations,", "fp32 weights), derived by nearl_kernels.roofline:"]
    for row in figures(op):
        lines.append(f"- {row.shape} {row.mode}: minimal {_mb(row.bytes)}, {_gflop(row.flops)}; "
                     f"floor {row.floor_us:.2f} us at 4.3 TB/s and 790 TFLOP/s")
        for name, programs in row.launches:
            lines.append(f"    {name}: {programs:,} programs = {programs / SMS:.2f} x {SMS} SMs")
    return "\n".join(lines) + "\n"


def table() -> str:
    """The same figures as one Markdown table, for docs/kernel-design.md."""
    out = ["| op, shape | mode | minimal bytes | FLOPs | floor (us) | kernel: programs (x 132 SMs) |",
           "|---|---|---|---|---|---|"]
    for op in SHAPES:
        for row in figures(op):
            launches = "; ".join(f"`{n}`: {p:,} ({p / SMS:.2f})" for n, p in row.launches)
            out.append(f"| {op} {row.shape} | {row.mode} | {_mb(row.bytes)} | {_gflop(row.flops)} | "
                       f"{row.floor_us:.2f} | {launches} |")
    return "\n".join(out) + "\n"


START, END = ".. roofline: generated by python -m nearl_kernels.roofline --write\n", ".. /roofline\n"


def kernels_path(op: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), op, "kernels.py")


def render_header(text: str, op: str) -> str:
    """``text`` (a kernels.py source) with its roofline block replaced by :func:`header`."""
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"{kernels_path(op)} has no roofline block ({START.strip()!r} ... {END.strip()!r})")
    return text[: i + len(START)] + header(op) + text[j:]


def main(argv=None) -> int:
    """``python -m nearl_kernels.roofline [--write]``: check (or rewrite) each kernels.py header block."""
    args = list(sys.argv[1:] if argv is None else argv)
    write = "--write" in args
    if [a for a in args if a != "--write"]:
        print("usage: python -m nearl_kernels.roofline [--write]", file=sys.stderr)
        return 2
    stale = []
    for op in SHAPES:
        path = kernels_path(op)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = render_header(text, op)
        if new != text:
            stale.append(path)
            if write:
                tmp = path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(new)
                os.replace(tmp, path)
        print(f"{os.path.relpath(path)}:\n{header(op)}")
    if stale and not write:
        print("stale roofline blocks (run python -m nearl_kernels.roofline --write): " + ", ".join(stale),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
