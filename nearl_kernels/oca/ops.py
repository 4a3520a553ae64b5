"""OCA: input checks, launchers, autograd Function, custom ops, functional API.

Layering (STYLE.md): kernels.py (raw Triton) -> launchers here -> the
``nearl::oca_fwd`` / ``nearl::oca_bwd`` triton ops (CPU: reference maths;
CUDA, or CPU under TRITON_INTERPRET=1: Triton) -> ``OCAFunction`` -> ``oca()``.
"""

import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._checks import (check_fusable, check_heads, check_same_device, check_shape, check_tensor,
                       reference_dtype)
from .._dispatch import eager_cpu, is_low_precision, launch, new_output, next_pow2, no_autocast, sm_count, use_triton
from .kernels import oca_bwd_dwu_kernel, oca_bwd_kernel, oca_fwd_kernel
from .reference import down_project, oca_reference, oca_reference_bwd, oca_reference_fwd

# The CPU path computes in fp32 whatever the caller's autocast state: its
# saved tensors and its backward then agree on one dtype.
_cpu_fwd, _cpu_bwd = no_autocast(oca_reference_fwd), no_autocast(oca_reference_bwd)

# The kernels hold a (BLOCK_L, r) query tile and an (M, r) key/value tile in
# registers; the compile gate proves these bounds spill-free on sm_80 and sm_90
# under every Triton release setup.py declares. r = 64 was dropped: its exact
# fp32 backward (FMA dots contracting over 64) spills under triton 3.4-3.9 at
# any token tile, and the USEformer, which every NearlCLIP layer also runs,
# takes r <= 32 anyway.
MAX_WIDTH = 32
MAX_QUERIES = 64
# ... and their tiles together: next_pow2(r) * next_pow2(M) (each at least 16)
# at most this, i.e. M <= 32 at r = 32, M <= 64 at r <= 16.
MAX_TILE_PRODUCT = 1024


def _check_oca_inputs(x, z, w_down, b_down, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, h):
    check_tensor("x", x, 3, "(G, L, d)")
    check_tensor("z", z, 3, "(G // group_size, M, r)")
    check_tensor("w_down", w_down, 2, "(d, r)")
    G, L, d = x.shape
    if w_down.shape[0] != d:
        raise ValueError(
            f"x must be (G, L, d) with d == w_down.shape[0]; got x {tuple(x.shape)} and w_down {tuple(w_down.shape)}"
        )
    r = w_down.shape[1]
    if not 1 <= r <= MAX_WIDTH:
        raise ValueError(f"adapter width r = w_down.shape[1] must be in [1, {MAX_WIDTH}]; got {r}")
    check_heads(r, n_heads)
    if not isinstance(group_size, int) or group_size < 1 or G % group_size:
        raise ValueError(f"group_size must be a positive int dividing G={G}; got {group_size!r}")
    M = z.shape[1]
    if not 1 <= M <= MAX_QUERIES:
        raise ValueError(f"the number of synergy queries M = z.shape[1] must be in [1, {MAX_QUERIES}]; got {M}")
    if next_pow2(r) * next_pow2(M) > MAX_TILE_PRODUCT:
        raise ValueError(
            f"r={r} with M={M} synergy queries is outside the compiled envelope: next_pow2(r) * next_pow2(M) "
            f"(each at least 16) must be at most {MAX_TILE_PRODUCT} (M <= 32 at r = 32, M <= 64 at r <= 16)"
        )
    check_shape("z", z, (G // group_size, M, r), "(G // group_size, M, r)")
    for name, t, shape, doc in (
        ("b_down", b_down, (r,), "(r,)"),
        ("w_k", w_k, (r, r), "(r, r)"),
        ("w_v", w_v, (r, r), "(r, r)"),
        ("w_up", w_up, (r, d), "(r, d)"),
        ("b_up", b_up, (d,), "(d,)"),
        ("s_novel", s_novel, (), "a 0-dim tensor"),
        ("s_incr", s_incr, (), "a 0-dim tensor"),
    ):
        check_tensor(name, t, len(shape), doc)
        check_shape(name, t, shape, doc)
    if h is not None:
        check_tensor("h", h, 3, "(G, L, r)")
        check_shape("h", h, (G, L, r), "(G, L, r)")
    check_same_device(x=x, z=z, w_down=w_down, w_up=w_up)


# Tiles per op and dot precision at the default r = 32, M = 16: (BLOCK_L,
# BLOCK_D, num_warps, maxnreg). Widths are runtime values in the kernels, so these
# rows, with the token tile shrunk for wider query/key tiles (see _tiles), are
# every specialisation the launchers can choose; `python -m
# nearl_kernels.compile_check` compiles each for sm_90 and sm_80 under every
# Triton release setup.py declares and fails on a spill or a launch limit.
# maxnreg = 255 where some release's ptxas would otherwise cap a thread at 80 or
# 128 registers and spill; None where asking for it made the code spill instead
# (the fp32 forward). Chosen by sweeping the gate over triton 3.4-3.9.
_TILES = {
    ("fwd", "fp32"): (32, 32, 8, None),
    ("fwd", "lowp"): (64, 64, 8, 255),
    ("bwd", "fp32"): (32, 32, 8, 255),
    ("bwd", "lowp"): (32, 64, 8, 255),
}
# dW_u kernel: (BLOCK_T tokens per step, BLOCK_D columns, num_warps, maxnreg).
_DWU_TILES = {"fp32": (32, 64, 8, 255), "lowp": (64, 64, 8, 255)}  # maxnreg always set here


def _tiles(which: str, precision: str, block_r: int, block_m: int, d: int) -> Tuple[int, int, int, Optional[int]]:
    # The attention holds [BLOCK_L, BLOCK_M] scores and several [BLOCK_L,
    # BLOCK_R] tiles per program: keep their product at the default's.
    block_l, block_d, warps, maxnreg = _TILES[which, precision]
    shrink = max(1, (block_r * block_m) // (32 * 16))
    return max(16, block_l // shrink), block_d, warps, maxnreg


def _precision(dot_dtype: torch.dtype) -> str:
    return "fp32" if dot_dtype == torch.float32 else "lowp"


def resolve_dot_dtype(x: torch.Tensor, dot_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype of the OCA's up-projection dots: x's if bf16/fp16, else ``dot_dtype`` or fp32.

    Under ``torch.autocast`` the residual stream stays fp32 while autocast
    asks for bf16/fp16 matmuls; ``oca()`` passes the autocast dtype here so the
    dots run on tensor cores, as the reference's matmuls do under the same autocast.
    """
    if is_low_precision(x):
        return x.dtype
    if dot_dtype in (None, torch.float32):
        return torch.float32
    if dot_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dot_dtype must be float32, bfloat16 or float16; got {dot_dtype}")
    return dot_dtype


def _kv(z, w_k, w_v):
    # Once per group, not per token: (Gz, M, r) keys and values in fp32.
    zf = z.float()
    return (zf @ w_k.float()).contiguous(), (zf @ w_v.float()).contiguous()


def _scales(s_novel, s_incr):
    return torch.stack([s_novel.detach().float(), s_incr.detach().float()])


def _token_launch(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, dot_dtype, which):
    """What both token kernels share: contiguous inputs, k/v, scales, tiles, grid, runtime sizes."""
    G, L, d = x.shape
    M, r = z.shape[1], h.shape[2]
    BR, BM = next_pow2(r), next_pow2(M)
    BL, BD, warps, maxnreg = _tiles(which, _precision(dot_dtype), BR, BM, d)
    # At least two programs per SM where fewer tokens per tile add programs (the compile
    # gate's waves): 64 images of 197 tokens launch 448 tiles of 32, not 256 of 64. Not
    # below 32 tokens: the fp32 forward's tile of 16 spills on sm_80 and sm_90.
    target = 2 * sm_count(x.device)
    while BL > 32 and G * triton.cdiv(L, BL) < target and triton.cdiv(L, BL // 2) > triton.cdiv(L, BL):
        BL //= 2
    NL = triton.cdiv(L, BL)
    tensors = (
        x.contiguous(), h.contiguous(), *_kv(z, w_k, w_v),
        w_up.to(dot_dtype).contiguous(), b_up.float().contiguous(), _scales(s_novel, s_incr),
    )
    # Sequences x token tiles on grid axis 0 (up to 2^31 - 1 programs): axis 1
    # would cap paired mode at 65,535 text sequences.
    sizes = (L, NL, d, r, M, r // n_heads, n_heads, group_size)
    if d % 16:
        # Rows of a width no multiple of 16 cannot be loaded as vectors: one
        # 64-bit address per element. Measured: half-width column blocks keep
        # the backward spill-free.
        BD //= 2
    meta = dict(BL=BL, BD=BD, BR=BR, BM=BM, DOT=_TL_DTYPES[dot_dtype], num_warps=warps)
    if maxnreg:
        meta["maxnreg"] = maxnreg
    return tensors, (G * NL,), sizes, meta


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@no_autocast
def oca_fwd_triton(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps, dot_dtype=None):
    """Launch oca_fwd_kernel: y (G, L, d) in x.dtype."""
    dot_dtype = resolve_dot_dtype(x, dot_dtype)
    tensors, grid, sizes, meta = _token_launch(
        x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, dot_dtype, "fwd")
    y = new_output(*x.shape, like=x)
    launch(oca_fwd_kernel, grid, *tensors, y, *sizes, eps, 1.0 / math.sqrt(h.shape[2] // n_heads), **meta)
    return y


def _dwu_splits(n_tokens: int, n_col_blocks: int, device: torch.device) -> int:
    # Enough (column block, token split) programs to fill the GPU; at least
    # 128 tokens per split so each program amortises its (r, BLOCK_D) store
    # (256 left the text tower's 4,096 tokens at under one wave).
    target = 4 * sm_count(device)
    return max(1, min(triton.cdiv(n_tokens, 128), target // n_col_blocks, 65_535))


def oca_bwd_triton(dy, x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps, dot_dtype=None):
    """Gradients for (x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr): :func:`oca_bwd_packed`, the scales' split."""
    *grads, ds = oca_bwd_packed(dy, x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps,
                                dot_dtype)
    return (*grads, *_split_scales(ds, s_novel, s_incr))


def _split_scales(ds: torch.Tensor, s_novel: torch.Tensor, s_incr: torch.Tensor):
    """The two scalar gradients out of ``oca_bwd_packed``'s (2,) fp32 ``ds``, as views where the dtypes allow."""
    d_novel, d_incr = ds.unbind()
    return d_novel.to(s_novel.dtype), d_incr.to(s_incr.dtype)


@no_autocast
def oca_bwd_packed(dy, x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps, dot_dtype=None):
    """Launch the two backward kernels, then reduce the per-tile partials in a fixed order. The two scales'
    gradients come as one (2,) fp32 tensor: a custom op's outputs may not alias each other, and two
    scalars would cost two copies per call."""
    dot_dtype = resolve_dot_dtype(x, dot_dtype)
    tensors, grid, sizes, meta = _token_launch(
        x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, dot_dtype, "bwd")
    x_c, h_c, k, v, w_up_c, b_up_c, scales = tensors
    dy = dy.contiguous()
    G, L, d = x.shape
    M, r = z.shape[1], h.shape[2]
    n_tiles = grid[0]
    f32 = dict(like=x, dtype=torch.float32)
    dx, dh = new_output(*x.shape, like=x), new_output(*h.shape, like=h)
    o, dp = new_output(G, L, r, **f32), new_output(G, L, **f32)
    dk_part, dv_part = new_output(n_tiles, M, r, **f32), new_output(n_tiles, M, r, **f32)
    ds_part = new_output(n_tiles, 2, **f32)
    launch(
        oca_bwd_kernel, grid, dy, *tensors, dx, dh, o, dp, dk_part, dv_part, ds_part, *sizes, eps,
        1.0 / math.sqrt(r // n_heads), **meta,
    )

    N = G * L
    BT, BD2, warps2, maxnreg2 = _DWU_TILES[_precision(dot_dtype)]
    # An (r, BLOCK_D) fp32 accumulator per program: narrower column blocks for
    # wider r, and for widths no multiple of 16 (no vector loads; measured).
    BD2 = BD2 * 32 // max(32, meta["BR"])
    if d % 16:
        BD2 //= 2
    n_col = triton.cdiv(d, BD2)
    splits = _dwu_splits(N, n_col, x.device)
    rows = triton.cdiv(N, splits)
    dwu_part, dbu_part = new_output(splits, r, d, **f32), new_output(splits, d, **f32)
    launch(
        oca_bwd_dwu_kernel, (n_col, splits), dy, x_c, o, dp, scales, dwu_part, dbu_part, N, rows, d, r,
        BT=BT, BD=BD2, BR=next_pow2(r), DOT=meta["DOT"], num_warps=warps2, maxnreg=maxnreg2,
    )

    # Fixed-order sums over tiles and group members: deterministic by construction.
    NL = sizes[1]
    dk = dk_part.view(-1, group_size * NL, M, r).sum(1)  # [Gz, M, r]
    dv = dv_part.view(-1, group_size * NL, M, r).sum(1)
    zf = z.float().reshape(-1, r)
    dz = dk @ w_k.float().t() + dv @ w_v.float().t()
    dw_k = zf.t() @ dk.reshape(-1, r)
    dw_v = zf.t() @ dv.reshape(-1, r)
    return (
        dx, dh, dz.to(z.dtype), dw_k.to(w_k.dtype), dw_v.to(w_v.dtype),
        dwu_part.sum(0).to(w_up.dtype), dbu_part.sum(0).to(b_up.dtype), ds_part.sum(0),
    )


@torch.library.triton_op("nearl::oca_fwd", mutates_args=())
def oca_fwd(
    x: torch.Tensor, h: torch.Tensor, z: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor,
    w_up: torch.Tensor, b_up: torch.Tensor, s_novel: torch.Tensor, s_incr: torch.Tensor,
    n_heads: int, group_size: int, eps: float, dot_dtype: torch.dtype,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(y, saved): the Triton backward recomputes from the inputs and saves nothing; the
    CPU backward is the analytic one of reference.py, from the tensors its forward saves."""
    if use_triton(x):
        return oca_fwd_triton(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps, dot_dtype), []
    y, saved = _cpu_fwd(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps)
    return y, list(saved)


@oca_fwd.register_fake
def _oca_fwd_fake(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps, dot_dtype):
    if use_triton(x):
        return torch.empty_like(x), []
    # The reference forward on fake tensors: the saved tensors' shapes come from the one place that makes them.
    y, saved = _cpu_fwd(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps)
    return y, list(saved)


@torch.library.triton_op("nearl::oca_bwd", mutates_args=())
def oca_bwd(
    dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, z: torch.Tensor, w_k: torch.Tensor,
    w_v: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, s_novel: torch.Tensor,
    s_incr: torch.Tensor, saved: List[torch.Tensor], n_heads: int, group_size: int, eps: float,
    dot_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for (x, h, z, w_k, w_v, w_up, b_up) and, as one (2,) fp32 tensor, for (s_novel, s_incr);
    ``saved`` is oca_fwd's second output."""
    if use_triton(x):
        return oca_bwd_packed(dy, x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps, dot_dtype)
    *grads, d_novel, d_incr = _cpu_bwd(dy, x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, saved, n_heads,
                                       group_size, eps)
    return (*grads, torch.stack([d_novel.float(), d_incr.float()]))


@oca_bwd.register_fake
def _oca_bwd_fake(dy, x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, saved, n_heads, group_size, eps, dot_dtype):
    return (*(torch.empty_like(t) for t in (x, h, z, w_k, w_v, w_up, b_up)), x.new_empty(2, dtype=torch.float32))



class OCAFunction(torch.autograd.Function):
    """Autograd glue: saves the inputs and whatever the forward op hands over for the backward
    (nothing for the Triton kernels, which recompute the attention)."""

    @staticmethod
    def forward(ctx, x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps, dot_dtype):
        if eager_cpu(x):
            y, saved = _cpu_fwd(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps)
        else:
            y, saved = torch.ops.nearl.oca_fwd(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size,
                                               eps, dot_dtype)
        ctx.save_for_backward(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, *saved)
        ctx.config = (n_heads, group_size, eps, dot_dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        if eager_cpu(dy):
            grads = _cpu_bwd(dy, *saved[:9], saved[9:], *ctx.config[:3])
        else:
            *grads, ds = torch.ops.nearl.oca_bwd(dy.contiguous(), *saved[:9], list(saved[9:]), *ctx.config)
            grads = (*grads, *_split_scales(ds, saved[7], saved[8]))
        return (*grads, None, None, None, None)


def oca(
    x: torch.Tensor,
    z: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    s_novel: torch.Tensor,
    s_incr: torch.Tensor,
    n_heads: int = 2,
    group_size: int = 1,
    eps: float = 1e-6,
    h: Optional[torch.Tensor] = None,
    fused: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal Cross-Attention adapter: ``y = x + s_novel (delta - c x) + s_incr c x``.

    Args:
        x: tokens (G, L, d); group ``g`` is sequences ``g*group_size .. (g+1)*group_size - 1``.
        z: synergy queries (G // group_size, M, r), one set per group.
        w_down, b_down: down-projection (d, r), (r,). w_k, w_v: (r, r).
        w_up, b_up: up-projection (r, d), (d,). s_novel, s_incr: 0-dim scales.
        h: the down-projected queries if the caller already has them (the
            model computes them once for the USEformer context too).
        fused: route through the ``nearl::oca_*`` custom ops (Triton on CUDA);
            False calls the reference maths directly.

    Returns:
        ``(y, h)``: y with x's shape and dtype, h (G, L, r).

    Example:
        >>> y, h = oca(x, z, w_d, b_d, w_k, w_v, w_u, b_u, s_n, s_i, n_heads=2)
    """
    _check_oca_inputs(x, z, w_down, b_down, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, h)
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite float; got {eps}")
    # The down-projection stays a library GEMM: h must be materialised anyway
    # as the USEformer's context, so fusing it here would save no traffic.
    if h is None:
        h = down_project(x, w_down, b_down)
    if fused:
        check_fusable("oca", x, z, w_up)
        # Under autocast the up-projection dots run in the autocast dtype (on
        # tensor cores), as the reference's matmuls do; statistics stay fp32.
        device = x.device.type
        autocast = device in ("cuda", "cpu") and torch.is_autocast_enabled(device)
        dot_dtype = resolve_dot_dtype(x, torch.get_autocast_dtype(device) if autocast else None)
        y = OCAFunction.apply(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps, dot_dtype)
    else:
        y = oca_reference(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps,
                          compute_dtype=reference_dtype(x))
    return y, h
