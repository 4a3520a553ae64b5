"""Triton kernels of the OCA op. Launchers and autograd live in ops.py.

One program owns a tile of BL tokens of one sequence and the full width d of
their rows, so x and h are read once and y written once: the orthogonal split
needs the whole-row statistics <delta, x> and <x, x> before any output.

Heads are handled without slicing registers: head e's scores are a dot with the
query tile masked to e's columns, and its output lands in e's columns only.
For r = 32 that costs two r-wide dots instead of two r/2-wide ones, which is
noise beside the (BL, r) x (r, d) up-projection.
"""

import triton
import triton.language as tl

from .._kernel_utils import lowp_dot


@triton.jit
def _attend_head(b_h, b_k, b_v, m_e, m_m, scale):
    """Softmax attention of one head over the M queries: (probabilities, output in e's columns)."""
    s = tl.dot(tl.where(m_e[None, :], b_h, 0.0), tl.trans(b_k), input_precision="ieee") * scale  # [BL, BM]
    s = tl.where(m_m[None, :], s, float("-inf"))
    p = tl.exp(s - tl.max(s, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    o = tl.dot(p, tl.where(m_e[None, :], b_v, 0.0), input_precision="ieee")  # [BL, BR]
    return p, o


@triton.jit
def _load_kv(k_ptr, v_ptr, i_z, o_m, o_r, m_m, m_r, M: tl.constexpr, R: tl.constexpr):
    """The group's keys and values (z W_k, z W_v), fp32: [BM, BR] each."""
    p_kv = i_z * M * R + o_m[:, None] * R + o_r[None, :]
    m_kv = m_m[:, None] & m_r[None, :]
    return tl.load(k_ptr + p_kv, mask=m_kv, other=0.0), tl.load(v_ptr + p_kv, mask=m_kv, other=0.0)


@triton.jit
def _delta(b_h, b_k, b_v, b_wu, b_bu, o_r, m_r, m_m, scale, DT: tl.constexpr,
           BL: tl.constexpr, BR: tl.constexpr, RH: tl.constexpr, H: tl.constexpr,
           LOWP: tl.constexpr, INTERPRET: tl.constexpr):
    """Attention over the group's queries, all heads, then the up-projection: (o [BL, BR], delta [BL, BD])."""
    b_o = tl.zeros((BL, BR), dtype=tl.float32)
    for e in tl.static_range(H):
        m_e = ((o_r // RH) == e) & m_r
        _, o_e = _attend_head(b_h, b_k, b_v, m_e, m_m, scale)
        b_o += o_e
    # The up-projection is the one large dot: tensor cores in bf16/fp16, IEEE fp32 otherwise.
    if LOWP:
        b_delta = lowp_dot(b_o, b_wu, DT, INTERPRET)
    else:
        b_delta = tl.dot(b_o, b_wu.to(tl.float32), input_precision="ieee")
    return b_o, b_delta + b_bu[None, :]


@triton.jit(do_not_specialize=["L"])
def oca_fwd_kernel(
    x_ptr,   # [G, L, D]   tokens, input dtype
    h_ptr,   # [G, L, R]   down-projected queries
    k_ptr,   # [Gz, M, R]  z W_k, fp32
    v_ptr,   # [Gz, M, R]  z W_v, fp32
    wu_ptr,  # [R, D]      up-projection
    bu_ptr,  # [D]
    s_ptr,   # [2]         s_novel, s_incr (fp32)
    y_ptr,   # [G, L, D]   output, input dtype
    L, eps, scale,
    D: tl.constexpr, R: tl.constexpr, M: tl.constexpr, RH: tl.constexpr, H: tl.constexpr, T: tl.constexpr,
    BL: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, LOWP: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    i_l, i_g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_z = i_g // T
    o_l = i_l * BL + tl.arange(0, BL)
    o_d, o_r, o_m = tl.arange(0, BD), tl.arange(0, BR), tl.arange(0, BM)
    m_l, m_d, m_r, m_m = o_l < L, o_d < D, o_r < R, o_m < M

    p_x = x_ptr + i_g * L * D + o_l[:, None] * D + o_d[None, :]
    b_x = tl.load(p_x, mask=m_l[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BL, BD]
    p_h = h_ptr + i_g * L * R + o_l[:, None] * R + o_r[None, :]
    b_h = tl.load(p_h, mask=m_l[:, None] & m_r[None, :], other=0.0).to(tl.float32)  # [BL, BR]
    b_k, b_v = _load_kv(k_ptr, v_ptr, i_z, o_m, o_r, m_m, m_r, M, R)  # [BM, BR] each
    b_wu = tl.load(wu_ptr + o_r[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)  # [BR, BD]
    b_bu = tl.load(bu_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BD]
    _, b_delta = _delta(b_h, b_k, b_v, b_wu, b_bu, o_r, m_r, m_m, scale, x_ptr.dtype.element_ty,
                        BL, BR, RH, H, LOWP, INTERPRET)  # [BL, BD]

    s_novel = tl.load(s_ptr)
    s_incr = tl.load(s_ptr + 1)
    c = tl.sum(b_delta * b_x, 1) / (tl.sum(b_x * b_x, 1) + eps)  # [BL]
    b_cx = c[:, None] * b_x
    b_y = b_x + s_novel * (b_delta - b_cx) + s_incr * b_cx
    p_y = y_ptr + i_g * L * D + o_l[:, None] * D + o_d[None, :]
    tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_l[:, None] & m_d[None, :])


@triton.jit(do_not_specialize=["L"])
def oca_bwd_kernel(
    dy_ptr,   # [G, L, D]   upstream gradient
    x_ptr,    # [G, L, D]
    h_ptr,    # [G, L, R]
    k_ptr,    # [Gz, M, R]  fp32
    v_ptr,    # [Gz, M, R]  fp32
    wu_ptr,   # [R, D]
    bu_ptr,   # [D]
    s_ptr,    # [2]
    dx_ptr,   # [G, L, D]   out
    dh_ptr,   # [G, L, R]   out
    o_ptr,    # [G, L, R]   out, fp32: attention output for the dW_u pass
    dp_ptr,   # [G, L]      out, fp32: d<delta, x>, ditto
    dk_ptr,   # [G, NL, M, R]  out, fp32 per-tile partial of dL/d(z W_k)
    dv_ptr,   # [G, NL, M, R]  out, fp32 per-tile partial of dL/d(z W_v)
    ds_ptr,   # [G, NL, 2]     out, fp32 per-tile partial of ds_novel, ds_incr
    L, NL, eps, scale,
    D: tl.constexpr, R: tl.constexpr, M: tl.constexpr, RH: tl.constexpr, H: tl.constexpr, T: tl.constexpr,
    BL: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, LOWP: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    i_l, i_g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_z = i_g // T
    o_l = i_l * BL + tl.arange(0, BL)
    o_d, o_r, o_m = tl.arange(0, BD), tl.arange(0, BR), tl.arange(0, BM)
    m_l, m_d, m_r, m_m = o_l < L, o_d < D, o_r < R, o_m < M
    m_ld, m_lr = m_l[:, None] & m_d[None, :], m_l[:, None] & m_r[None, :]

    o_ld = i_g * L * D + o_l[:, None] * D + o_d[None, :]
    o_lr = i_g * L * R + o_l[:, None] * R + o_r[None, :]
    b_x = tl.load(x_ptr + o_ld, mask=m_ld, other=0.0).to(tl.float32)    # [BL, BD]
    b_dy = tl.load(dy_ptr + o_ld, mask=m_ld, other=0.0).to(tl.float32)  # [BL, BD]
    b_h = tl.load(h_ptr + o_lr, mask=m_lr, other=0.0).to(tl.float32)    # [BL, BR]
    b_k, b_v = _load_kv(k_ptr, v_ptr, i_z, o_m, o_r, m_m, m_r, M, R)    # [BM, BR] each
    b_wu = tl.load(wu_ptr + o_r[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)  # [BR, BD]
    b_bu = tl.load(bu_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)

    # Recompute the forward's attention output and delta (cheaper than storing delta).
    b_o, b_delta = _delta(b_h, b_k, b_v, b_wu, b_bu, o_r, m_r, m_m, scale, x_ptr.dtype.element_ty,
                          BL, BR, RH, H, LOWP, INTERPRET)

    s_novel = tl.load(s_ptr)
    s_incr = tl.load(s_ptr + 1)
    xx = tl.sum(b_x * b_x, 1) + eps
    c = tl.sum(b_delta * b_x, 1) / xx
    dyx = tl.sum(b_dy * b_x, 1)
    # y = x + s_n delta + (s_i - s_n) c x, with c = <delta, x> / xx.
    dc = (s_incr - s_novel) * dyx
    d_dot = dc / xx
    d_xx = -dc * c / xx
    b_ddelta = s_novel * b_dy + d_dot[:, None] * b_x  # [BL, BD]
    b_dx = b_dy + ((s_incr - s_novel) * c)[:, None] * b_dy + d_dot[:, None] * b_delta + (2.0 * d_xx)[:, None] * b_x
    tl.store(dx_ptr + o_ld, b_dx.to(dx_ptr.dtype.element_ty), mask=m_ld)

    p_ds = ds_ptr + (i_g * NL + i_l) * 2
    tl.store(p_ds, tl.sum(tl.sum(b_dy * b_delta, 1) - c * dyx, 0))
    tl.store(p_ds + 1, tl.sum(c * dyx, 0))
    tl.store(o_ptr + o_lr, b_o, mask=m_lr)
    tl.store(dp_ptr + i_g * L + o_l, d_dot, mask=m_l)

    if LOWP:
        b_do = lowp_dot(b_ddelta, tl.trans(b_wu), x_ptr.dtype.element_ty, INTERPRET)  # [BL, BR]
    else:
        b_do = tl.dot(b_ddelta, tl.trans(b_wu.to(tl.float32)), input_precision="ieee")  # [BL, BR]
    b_dh = tl.zeros((BL, BR), dtype=tl.float32)
    b_dk = tl.zeros((BM, BR), dtype=tl.float32)
    b_dv = tl.zeros((BM, BR), dtype=tl.float32)
    for e in tl.static_range(H):
        m_e = ((o_r // RH) == e) & m_r
        p, _ = _attend_head(b_h, b_k, b_v, m_e, m_m, scale)  # [BL, BM]
        b_do_e = tl.where(m_e[None, :], b_do, 0.0)
        b_dv += tl.dot(tl.trans(p), b_do_e, input_precision="ieee")
        d_p = tl.dot(b_do_e, tl.trans(b_v), input_precision="ieee")  # [BL, BM]
        d_s = p * (d_p - tl.sum(p * d_p, 1)[:, None]) * scale
        b_dh += tl.dot(d_s, tl.where(m_e[None, :], b_k, 0.0), input_precision="ieee")
        b_dk += tl.dot(tl.trans(d_s), tl.where(m_e[None, :], b_h, 0.0), input_precision="ieee")
    tl.store(dh_ptr + o_lr, b_dh.to(dh_ptr.dtype.element_ty), mask=m_lr)
    p_part = (i_g * NL + i_l) * M * R + o_m[:, None] * R + o_r[None, :]
    m_part = m_m[:, None] & m_r[None, :]
    tl.store(dk_ptr + p_part, b_dk, mask=m_part)
    tl.store(dv_ptr + p_part, b_dv, mask=m_part)


@triton.jit(do_not_specialize=["N", "ROWS"])
def oca_bwd_dwu_kernel(
    dy_ptr,   # [N, D]  upstream gradient, N = G * L tokens
    x_ptr,    # [N, D]
    o_ptr,    # [N, R]  fp32 attention output (from oca_bwd_kernel)
    dp_ptr,   # [N]     fp32 d<delta, x>
    s_ptr,    # [2]
    dwu_ptr,  # [S, R, D]  out, fp32 partial per split
    dbu_ptr,  # [S, D]     out, fp32 partial per split
    N, ROWS,
    D: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, LOWP: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # dW_u = o^T d_delta with d_delta = s_novel dy + d<delta,x> x: a column
    # block of d over one contiguous split of the tokens, summed in a fixed
    # order, so the reduction is deterministic without atomics.
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
        if LOWP:
            b_acc += lowp_dot(tl.trans(b_o), b_g, dy_ptr.dtype.element_ty, INTERPRET)
        else:
            b_acc += tl.dot(tl.trans(b_o), b_g, input_precision="ieee")
        b_bacc += tl.sum(b_g, 0)
    tl.store(dwu_ptr + i_s * R * D + o_r[:, None] * D + o_d[None, :], b_acc, mask=m_r[:, None] & m_d[None, :])
    tl.store(dbu_ptr + i_s * D + o_d, b_bacc, mask=m_d)
