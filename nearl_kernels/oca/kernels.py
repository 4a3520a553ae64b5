"""Triton kernels of the OCA op. Launchers and autograd live in ops.py.

One program owns a tile of BL tokens of one sequence. It attends over its
group's M queries once (a [BL, r] output, kept in registers), then walks the
row width d in column blocks of BD twice: the first walk gathers the per-token
statistics the orthogonal split needs (<delta, x>, <x, x>), the second writes
y = x + s_novel (delta - c x) + s_incr c x. delta is recomputed in the second
walk (a [BL, r] x [r, BD] tensor-core dot) rather than kept, so registers and
shared memory are bounded by the tile, not by d: any tower width compiles.
The second read of x hits L2 on a GPU; DRAM sees x and h read once, y
written once.

Widths (d, r, M, heads) are runtime values: a kernel is specialised only on its
tiles and dtypes, so the compile gate can prove every variant the launchers
choose. Heads are handled without slicing registers: head e's scores are a dot
with the query tile masked to e's columns, and its output lands in e's columns.

The up-projection and its transposes run in DOT, the activations' (or the
autocast) dtype, on tensor cores when that is bf16/fp16; fp32 DOT means exact
IEEE fp32. Attention over the M queries and every statistic stay fp32.
"""

import triton
import triton.language as tl

from .._kernel_utils import lowp_dot


@triton.jit
def _up(b_o, b_wu, DOT: tl.constexpr):
    """[BL, BR] @ [BR, BD] in DOT precision, fp32 result."""
    if DOT == tl.float32:
        return tl.dot(b_o, b_wu.to(tl.float32), input_precision="ieee")
    return lowp_dot(b_o, b_wu, DOT)


@triton.jit
def _up_t(b_g, b_wu, DOT: tl.constexpr):
    """[BL, BD] @ [BR, BD]^T in DOT precision, fp32 result."""
    if DOT == tl.float32:
        return tl.dot(b_g, tl.trans(b_wu.to(tl.float32)), input_precision="ieee")
    return lowp_dot(b_g, tl.trans(b_wu), DOT)


@triton.jit
def _head_probs(b_h, b_k, m_e, m_m, scale):
    """Softmax over the M queries of head e's scores: [BL, BM] probabilities."""
    s = tl.dot(tl.where(m_e[None, :], b_h, 0.0), tl.trans(b_k), input_precision="ieee") * scale  # [BL, BM]
    s = tl.where(m_m[None, :], s, float("-inf"))
    p = tl.exp(s - tl.max(s, 1)[:, None])
    return p / tl.sum(p, 1)[:, None]


@triton.jit
def _attend(b_h, b_k, b_v, o_r, m_r, m_m, RH, H, scale, BL: tl.constexpr, BR: tl.constexpr):
    """Attention of the tile's queries over the group's M keys/values, all heads: [BL, BR] fp32."""
    b_o = tl.zeros((BL, BR), dtype=tl.float32)
    for e in range(H):
        m_e = ((o_r // RH) == e) & m_r
        p = _head_probs(b_h, b_k, m_e, m_m, scale)
        b_o += tl.dot(p, tl.where(m_e[None, :], b_v, 0.0), input_precision="ieee")
    return b_o


@triton.jit
def _tile_start(L, NL, BL: tl.constexpr):
    """(sequence, token offsets, token mask) of this program: tiles of BL tokens, sequences on axis 0."""
    i_t = tl.program_id(0).to(tl.int64)
    i_g, i_l = i_t // NL, i_t % NL
    o_l = i_l * BL + tl.arange(0, BL)
    return i_t, i_g, o_l, o_l < L


@triton.jit
def _load_qkv(h_ptr, k_ptr, v_ptr, i_g, i_z, o_l, m_l, o_r, m_r, o_m, m_m, L, R, M):
    """The tile's queries h [BL, BR] and its group's keys, values [BM, BR], all fp32."""
    p_h = h_ptr + (i_g * L + o_l[:, None]) * R + o_r[None, :]
    b_h = tl.load(p_h, mask=m_l[:, None] & m_r[None, :], other=0.0).to(tl.float32)
    p_kv = (i_z * M + o_m[:, None]) * R + o_r[None, :]
    m_kv = m_m[:, None] & m_r[None, :]
    return b_h, tl.load(k_ptr + p_kv, mask=m_kv, other=0.0), tl.load(v_ptr + p_kv, mask=m_kv, other=0.0)


@triton.jit(do_not_specialize=["L", "NL"])
def oca_fwd_kernel(
    x_ptr,   # [G, L, D]   tokens
    h_ptr,   # [G, L, R]   down-projected queries
    k_ptr,   # [Gz, M, R]  z W_k, fp32
    v_ptr,   # [Gz, M, R]  z W_v, fp32
    wu_ptr,  # [R, D]      up-projection, in DOT
    bu_ptr,  # [D]         fp32
    s_ptr,   # [2]         s_novel, s_incr, fp32
    y_ptr,   # [G, L, D]   output, x's dtype
    L, NL, D, R, M, RH, H, T, eps, scale,
    BL: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, DOT: tl.constexpr,
):
    i_t, i_g, o_l, m_l = _tile_start(L, NL, BL)
    o_r, o_m = tl.arange(0, BR), tl.arange(0, BM)
    m_r, m_m = o_r < R, o_m < M
    b_h, b_k, b_v = _load_qkv(h_ptr, k_ptr, v_ptr, i_g, i_g // T, o_l, m_l, o_r, m_r, o_m, m_m, L, R, M)
    b_o = _attend(b_h, b_k, b_v, o_r, m_r, m_m, RH, H, scale, BL, BR)  # [BL, BR]
    p_row = (i_g * L + o_l) * D  # [BL]

    # Walk 1: the row statistics of the orthogonal split.
    b_dx = tl.zeros((BL,), dtype=tl.float32)
    b_xx = tl.zeros((BL,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(x_ptr + p_row[:, None] + o_d[None, :], mask=m_l[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BL, BD]
        b_wu = tl.load(wu_ptr + o_r[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)  # [BR, BD]
        b_bu = tl.load(bu_ptr + o_d, mask=m_d, other=0.0)  # [BD]
        b_delta = _up(b_o, b_wu, DOT) + b_bu[None, :]
        b_dx += tl.sum(b_delta * b_x, 1)
        b_xx += tl.sum(b_x * b_x, 1)
    c = b_dx / (b_xx + eps)  # [BL]

    # Walk 2: the update. y = x + s_novel delta + (s_incr - s_novel) c x.
    s_novel = tl.load(s_ptr)
    s_incr = tl.load(s_ptr + 1)
    b_cx = (s_incr - s_novel) * c
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        m_ld = m_l[:, None] & m_d[None, :]
        b_x = tl.load(x_ptr + p_row[:, None] + o_d[None, :], mask=m_ld, other=0.0).to(tl.float32)  # [BL, BD]
        b_wu = tl.load(wu_ptr + o_r[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)
        b_bu = tl.load(bu_ptr + o_d, mask=m_d, other=0.0)
        b_delta = _up(b_o, b_wu, DOT) + b_bu[None, :]
        b_y = b_x + s_novel * b_delta + b_cx[:, None] * b_x
        tl.store(y_ptr + p_row[:, None] + o_d[None, :], b_y.to(y_ptr.dtype.element_ty), mask=m_ld)


@triton.jit(do_not_specialize=["L", "NL"])
def oca_bwd_kernel(
    dy_ptr,   # [G, L, D]   upstream gradient
    x_ptr,    # [G, L, D]
    h_ptr,    # [G, L, R]
    k_ptr,    # [Gz, M, R]  fp32
    v_ptr,    # [Gz, M, R]  fp32
    wu_ptr,   # [R, D]      in DOT
    bu_ptr,   # [D]         fp32
    s_ptr,    # [2]         fp32
    dx_ptr,   # [G, L, D]   out
    dh_ptr,   # [G, L, R]   out
    o_ptr,    # [G, L, R]   out, fp32 attention output, for the dW_u kernel
    dp_ptr,   # [G, L]      out, fp32 d<delta, x> / (<x, x> + eps), ditto
    dk_ptr,   # [G * NL, M, R]  out, fp32 per-tile partial of dL/d(z W_k)
    dv_ptr,   # [G * NL, M, R]  out, fp32 per-tile partial of dL/d(z W_v)
    ds_ptr,   # [G * NL, 2]     out, fp32 per-tile partial of ds_novel, ds_incr
    L, NL, D, R, M, RH, H, T, eps, scale,
    BL: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, DOT: tl.constexpr,
):
    i_t, i_g, o_l, m_l = _tile_start(L, NL, BL)
    o_r, o_m = tl.arange(0, BR), tl.arange(0, BM)
    m_r, m_m = o_r < R, o_m < M
    m_lr = m_l[:, None] & m_r[None, :]
    b_h, b_k, b_v = _load_qkv(h_ptr, k_ptr, v_ptr, i_g, i_g // T, o_l, m_l, o_r, m_r, o_m, m_m, L, R, M)
    # Recompute the forward's attention output (cheaper than storing it from the forward).
    b_o = _attend(b_h, b_k, b_v, o_r, m_r, m_m, RH, H, scale, BL, BR)
    p_row = (i_g * L + o_l) * D

    # Walk 1: <x, x>, <delta, x>, <dy, x>, <dy, delta> per token.
    b_xx = tl.zeros((BL,), dtype=tl.float32)
    b_dx = tl.zeros((BL,), dtype=tl.float32)
    b_yx = tl.zeros((BL,), dtype=tl.float32)
    b_yd = tl.zeros((BL,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        m_ld = m_l[:, None] & m_d[None, :]
        b_x = tl.load(x_ptr + p_row[:, None] + o_d[None, :], mask=m_ld, other=0.0).to(tl.float32)    # [BL, BD]
        b_dy = tl.load(dy_ptr + p_row[:, None] + o_d[None, :], mask=m_ld, other=0.0).to(tl.float32)  # [BL, BD]
        b_wu = tl.load(wu_ptr + o_r[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)
        b_bu = tl.load(bu_ptr + o_d, mask=m_d, other=0.0)
        b_delta = _up(b_o, b_wu, DOT) + b_bu[None, :]
        b_xx += tl.sum(b_x * b_x, 1)
        b_dx += tl.sum(b_delta * b_x, 1)
        b_yx += tl.sum(b_dy * b_x, 1)
        b_yd += tl.sum(b_dy * b_delta, 1)

    s_novel = tl.load(s_ptr)
    s_incr = tl.load(s_ptr + 1)
    xx = b_xx + eps
    c = b_dx / xx
    # y = x + s_n delta + (s_i - s_n) c x, with c = <delta, x> / xx:
    # dL/d<delta, x> = (s_i - s_n) <dy, x> / xx, and dL/dxx = -that * c.
    d_dot = (s_incr - s_novel) * b_yx / xx
    d_sq = -2.0 * d_dot * c  # dL/dxx, times 2 for d<x, x>/dx = 2x
    g_y = 1.0 + (s_incr - s_novel) * c
    p_ds = ds_ptr + i_t * 2
    tl.store(p_ds, tl.sum(b_yd - c * b_yx, 0))
    tl.store(p_ds + 1, tl.sum(c * b_yx, 0))
    tl.store(o_ptr + (i_g * L + o_l[:, None]) * R + o_r[None, :], b_o, mask=m_lr)
    tl.store(dp_ptr + i_g * L + o_l, d_dot, mask=m_l)

    # Walk 2: dx, and d_delta (s_novel dy + d_dot x) projected back to r columns.
    b_do = tl.zeros((BL, BR), dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        m_ld = m_l[:, None] & m_d[None, :]
        b_x = tl.load(x_ptr + p_row[:, None] + o_d[None, :], mask=m_ld, other=0.0).to(tl.float32)
        b_dy = tl.load(dy_ptr + p_row[:, None] + o_d[None, :], mask=m_ld, other=0.0).to(tl.float32)
        b_wu = tl.load(wu_ptr + o_r[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)
        b_bu = tl.load(bu_ptr + o_d, mask=m_d, other=0.0)
        b_delta = _up(b_o, b_wu, DOT) + b_bu[None, :]
        b_ddelta = s_novel * b_dy + d_dot[:, None] * b_x
        b_dx_blk = g_y[:, None] * b_dy + d_dot[:, None] * b_delta + d_sq[:, None] * b_x
        tl.store(dx_ptr + p_row[:, None] + o_d[None, :], b_dx_blk.to(dx_ptr.dtype.element_ty), mask=m_ld)
        b_do += _up_t(b_ddelta, b_wu, DOT)  # [BL, BR]

    # Attention backward, per head, through the softmax over the M queries.
    b_dh = tl.zeros((BL, BR), dtype=tl.float32)
    b_dk = tl.zeros((BM, BR), dtype=tl.float32)
    b_dv = tl.zeros((BM, BR), dtype=tl.float32)
    for e in range(H):
        m_e = ((o_r // RH) == e) & m_r
        p = _head_probs(b_h, b_k, m_e, m_m, scale)  # [BL, BM]
        p = tl.where(m_l[:, None], p, 0.0)
        b_do_e = tl.where(m_e[None, :], b_do, 0.0)
        b_dv += tl.dot(tl.trans(p), b_do_e, input_precision="ieee")
        d_p = tl.dot(b_do_e, tl.trans(b_v), input_precision="ieee")  # [BL, BM]
        d_s = p * (d_p - tl.sum(p * d_p, 1)[:, None]) * scale
        b_dh += tl.dot(d_s, tl.where(m_e[None, :], b_k, 0.0), input_precision="ieee")
        b_dk += tl.dot(tl.trans(d_s), tl.where(m_e[None, :], b_h, 0.0), input_precision="ieee")
    tl.store(dh_ptr + (i_g * L + o_l[:, None]) * R + o_r[None, :], b_dh.to(dh_ptr.dtype.element_ty), mask=m_lr)
    p_part = (i_t * M + o_m[:, None]) * R + o_r[None, :]
    m_part = m_m[:, None] & m_r[None, :]
    tl.store(dk_ptr + p_part, b_dk, mask=m_part)
    tl.store(dv_ptr + p_part, b_dv, mask=m_part)


@triton.jit(do_not_specialize=["N", "ROWS"])
def oca_bwd_dwu_kernel(
    dy_ptr,   # [N, D]  upstream gradient, N = G * L tokens
    x_ptr,    # [N, D]
    o_ptr,    # [N, R]  fp32 attention output (from oca_bwd_kernel)
    dp_ptr,   # [N]     fp32 d<delta, x> / (<x, x> + eps)
    s_ptr,    # [2]     fp32
    dwu_ptr,  # [S, R, D]  out, fp32 partial per split
    dbu_ptr,  # [S, D]     out, fp32 partial per split
    N, ROWS, D, R,
    BT: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, DOT: tl.constexpr,
):
    # dW_u = o^T d_delta with d_delta = s_novel dy + d_dot x: a column block of
    # d over one contiguous split of the tokens; the launcher sums the splits
    # in a fixed order, so the reduction is deterministic without atomics.
    i_d, i_s = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_d, o_r = i_d * BD + tl.arange(0, BD), tl.arange(0, BR)
    m_d, m_r = o_d < D, o_r < R
    s_novel = tl.load(s_ptr)
    b_acc = tl.zeros((BR, BD), dtype=tl.float32)
    b_bacc = tl.zeros((BD,), dtype=tl.float32)
    row0 = i_s * ROWS
    row1 = tl.minimum(row0 + ROWS, N)
    for start in range(row0, row1, BT):
        o_t = start + tl.arange(0, BT)
        m_t = o_t < row1
        m_td = m_t[:, None] & m_d[None, :]
        b_dy = tl.load(dy_ptr + o_t[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)  # [BT, BD]
        b_x = tl.load(x_ptr + o_t[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)    # [BT, BD]
        b_o = tl.load(o_ptr + o_t[:, None] * R + o_r[None, :], mask=m_t[:, None] & m_r[None, :], other=0.0)  # [BT, BR]
        b_dp = tl.load(dp_ptr + o_t, mask=m_t, other=0.0)  # [BT]
        b_g = s_novel * b_dy + b_dp[:, None] * b_x
        if DOT == tl.float32:
            b_acc += tl.dot(tl.trans(b_o), b_g, input_precision="ieee")
        else:
            b_acc += lowp_dot(tl.trans(b_o), b_g, DOT)
        b_bacc += tl.sum(b_g, 0)
    tl.store(dwu_ptr + i_s * R * D + o_r[:, None] * D + o_d[None, :], b_acc, mask=m_r[:, None] & m_d[None, :])
    tl.store(dbu_ptr + i_s * D + o_d, b_bacc, mask=m_d)
