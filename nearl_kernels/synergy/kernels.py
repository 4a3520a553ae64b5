"""Triton kernels of one USEformer block. Launchers and autograd live in ops.py.

One program per group: its M synergy queries stay in registers while the
context streams through in blocks of BC tokens with an online softmax per head
(LN_c and the k/v projections are applied on the fly, so the normalised
context is never written). The queries' tail (output projection, LN_2, FFN in
hidden chunks of BF) follows in the same program.

The block's tensors arrive packed in one fp32 buffer (PARAM_NAMES order);
``_offsets`` names each tensor's place in it. Per-head state (running max and
sum) is kept column-wise: every column of head e holds head e's statistics.
"""

import triton
import triton.language as tl

LN_EPS: tl.constexpr = 1e-5
NEG: tl.constexpr = -3.4028234663852886e38  # finfo(float32).min, the reference's mask fill


@triton.jit
def _offsets(R: tl.constexpr, F: tl.constexpr):
    """Start of each packed tensor: ln_c_w, ln_c_b, ln_1_w, ln_1_b, w_q, b_q, w_k,
    w_v, b_v, w_o, b_o, ln_2_w, ln_2_b, w_1, b_1, w_2, b_2."""
    o_wq = 4 * R
    o_wk = o_wq + R * R + R
    o_wv = o_wk + R * R
    o_wo = o_wv + R * R + R
    o_ln2 = o_wo + R * R + R
    o_w1 = o_ln2 + 2 * R
    o_w2 = o_w1 + R * F + F
    return o_wq, o_wk, o_wv, o_wo, o_ln2, o_w1, o_w2


@triton.jit
def _load_vec(p_ptr, off, o_r, m_r):
    return tl.load(p_ptr + off + o_r, mask=m_r, other=0.0)


@triton.jit
def _load_mat(p_ptr, off, o_r, m_r, R: tl.constexpr):
    return tl.load(p_ptr + off + o_r[:, None] * R + o_r[None, :], mask=m_r[:, None] & m_r[None, :], other=0.0)


@triton.jit
def _layer_norm(b_x, w, b, m_r, R: tl.constexpr):
    """Row LayerNorm over the R real columns: (normalised * w + b, x_hat, rstd)."""
    mean = tl.sum(b_x, 1) / R
    diff = tl.where(m_r[None, :], b_x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / R + LN_EPS)
    x_hat = diff * rstd[:, None]
    return x_hat * w[None, :] + b[None, :], x_hat, rstd


@triton.jit
def _layer_norm_bwd(d_out, x_hat, rstd, w, m_r, R: tl.constexpr):
    """Input gradient of a row LayerNorm given d(normalised * w + b)."""
    d_hat = tl.where(m_r[None, :], d_out * w[None, :], 0.0)
    mean_d = tl.sum(d_hat, 1) / R
    mean_dx = tl.sum(d_hat * x_hat, 1) / R
    return tl.where(m_r[None, :], (d_hat - mean_d[:, None] - x_hat * mean_dx[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _gelu(u):
    return 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))


@triton.jit
def _gelu_grad(u):
    return 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476)) + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)


@triton.jit
def _context_block(ctx_ptr, mask_ptr, p_ptr, i_g, start, Lc, o_r, m_r, R: tl.constexpr, BC: tl.constexpr):
    """Load BC context tokens, normalise them with LN_c and project to keys and values."""
    o_c = start + tl.arange(0, BC)
    m_c = o_c < Lc
    p_c = ctx_ptr + i_g * Lc * R + o_c[:, None] * R + o_r[None, :]
    b_c = tl.load(p_c, mask=m_c[:, None] & m_r[None, :], other=0.0).to(tl.float32)  # [BC, BR]
    valid = tl.load(mask_ptr + i_g * Lc + o_c, mask=m_c, other=0) != 0              # [BC]
    o_wq, o_wk, o_wv, o_wo, o_ln2, o_w1, o_w2 = _offsets(R, 0)
    b_cn, c_hat, c_rstd = _layer_norm(b_c, _load_vec(p_ptr, 0, o_r, m_r), _load_vec(p_ptr, R, o_r, m_r), m_r, R)
    b_k = tl.dot(b_cn, _load_mat(p_ptr, o_wk, o_r, m_r, R), input_precision="ieee")
    b_v = tl.dot(b_cn, _load_mat(p_ptr, o_wv, o_r, m_r, R), input_precision="ieee") + _load_vec(p_ptr, o_wv + R * R, o_r, m_r)[None, :]
    return o_c, m_c, valid, b_cn, c_hat, c_rstd, b_k, b_v


@triton.jit
def _scores(b_q, b_k, m_e, valid, m_c, scale):
    """Head e's scores (BM, BC): masked tokens get the reference's finite fill, out-of-range ones -inf."""
    s = tl.dot(tl.where(m_e[None, :], b_q, 0.0), tl.trans(b_k), input_precision="ieee") * scale
    s = tl.where(valid[None, :], s, NEG)
    return tl.where(m_c[None, :], s, float("-inf"))


@triton.jit
def _queries(b_z, p_ptr, o_r, m_r, R: tl.constexpr):
    """LN_1 of the synergy queries and their projection q: (ln1, x_hat, rstd, q)."""
    o_wq, o_wk, o_wv, o_wo, o_ln2, o_w1, o_w2 = _offsets(R, 0)
    ln1, z_hat, z_rstd = _layer_norm(b_z, _load_vec(p_ptr, 2 * R, o_r, m_r), _load_vec(p_ptr, 3 * R, o_r, m_r), m_r, R)
    b_q = tl.dot(ln1, _load_mat(p_ptr, o_wq, o_r, m_r, R), input_precision="ieee") + _load_vec(p_ptr, o_wq + R * R, o_r, m_r)[None, :]
    return ln1, z_hat, z_rstd, b_q


@triton.jit(do_not_specialize=["Lc"])
def synergy_fwd_kernel(
    z_ptr,     # [G, M, R]   synergy queries
    ctx_ptr,   # [G, Lc, R]  context tokens
    mask_ptr,  # [G, Lc]     uint8, 1 = real token
    p_ptr,     # [P]         packed block tensors, fp32
    out_ptr,   # [G, M, R]   updated queries, z's dtype
    o_ptr,     # [G, M, R]   fp32 attention output, saved for backward
    lse_ptr,   # [G, M, R]   fp32 log-sum-exp, column-wise per head, saved for backward
    Lc, scale,
    M: tl.constexpr, R: tl.constexpr, F: tl.constexpr, RH: tl.constexpr, H: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BF: tl.constexpr,
):
    i_g = tl.program_id(0).to(tl.int64)
    o_m, o_r = tl.arange(0, BM), tl.arange(0, BR)
    m_m, m_r = o_m < M, o_r < R
    m_mr = m_m[:, None] & m_r[None, :]
    o_mr = i_g * M * R + o_m[:, None] * R + o_r[None, :]
    o_wq, o_wk, o_wv, o_wo, o_ln2, o_w1, o_w2 = _offsets(R, F)

    b_z = tl.load(z_ptr + o_mr, mask=m_mr, other=0.0).to(tl.float32)  # [BM, BR]
    _, _, _, b_q = _queries(b_z, p_ptr, o_r, m_r, R)

    m_col = tl.full((BM, BR), NEG, dtype=tl.float32)
    l_col = tl.zeros((BM, BR), dtype=tl.float32)
    b_acc = tl.zeros((BM, BR), dtype=tl.float32)
    for start in range(0, Lc, BC):
        o_c, m_c, valid, _, _, _, b_k, b_v = _context_block(ctx_ptr, mask_ptr, p_ptr, i_g, start, Lc, o_r, m_r, R, BC)
        for e in tl.static_range(H):
            m_e = ((o_r // RH) == e) & m_r
            s = _scores(b_q, b_k, m_e, valid, m_c, scale)  # [BM, BC]
            m_old = tl.max(tl.where(m_e[None, :], m_col, NEG), 1)
            l_old = tl.max(tl.where(m_e[None, :], l_col, 0.0), 1)
            m_new = tl.maximum(m_old, tl.max(s, 1))
            alpha = tl.exp(m_old - m_new)
            p = tl.exp(s - m_new[:, None])
            b_acc = tl.where(m_e[None, :], b_acc * alpha[:, None], b_acc)
            b_acc += tl.dot(p, tl.where(m_e[None, :], b_v, 0.0), input_precision="ieee")
            m_col = tl.where(m_e[None, :], m_new[:, None], m_col)
            l_col = tl.where(m_e[None, :], (l_old * alpha + tl.sum(p, 1))[:, None], l_col)
    # Padding columns (r not a power of two) belong to no head: give them l = 1.
    l_col = tl.where(m_r[None, :], l_col, 1.0)
    b_o = tl.where(m_r[None, :], b_acc / l_col, 0.0)
    tl.store(o_ptr + o_mr, b_o, mask=m_mr)
    tl.store(lse_ptr + o_mr, m_col + tl.log(l_col), mask=m_mr)

    b_z1 = b_z + tl.dot(b_o, _load_mat(p_ptr, o_wo, o_r, m_r, R), input_precision="ieee") + _load_vec(p_ptr, o_wo + R * R, o_r, m_r)[None, :]
    ln2, _, _ = _layer_norm(b_z1, _load_vec(p_ptr, o_ln2, o_r, m_r), _load_vec(p_ptr, o_ln2 + R, o_r, m_r), m_r, R)
    b_ffn = tl.zeros((BM, BR), dtype=tl.float32)
    for f0 in range(0, F, BF):
        o_f = f0 + tl.arange(0, BF)
        m_f = o_f < F
        b_w1 = tl.load(p_ptr + o_w1 + o_r[:, None] * F + o_f[None, :], mask=m_r[:, None] & m_f[None, :], other=0.0)  # [BR, BF]
        b_b1 = tl.load(p_ptr + o_w1 + R * F + o_f, mask=m_f, other=0.0)
        b_w2 = tl.load(p_ptr + o_w2 + o_f[:, None] * R + o_r[None, :], mask=m_f[:, None] & m_r[None, :], other=0.0)  # [BF, BR]
        u = tl.dot(ln2, b_w1, input_precision="ieee") + b_b1[None, :]  # [BM, BF]
        b_ffn += tl.dot(_gelu(u), b_w2, input_precision="ieee")
    b_z2 = b_z1 + b_ffn + _load_vec(p_ptr, o_w2 + F * R, o_r, m_r)[None, :]
    tl.store(out_ptr + o_mr, b_z2.to(out_ptr.dtype.element_ty), mask=m_mr)


@triton.jit
def _store_vec(dp_ptr, off, o_r, m_r, val):
    tl.store(dp_ptr + off + o_r, val, mask=m_r)


@triton.jit
def _store_mat(dp_ptr, off, o_r, m_r, val, R: tl.constexpr):
    tl.store(dp_ptr + off + o_r[:, None] * R + o_r[None, :], val, mask=m_r[:, None] & m_r[None, :])


@triton.jit(do_not_specialize=["Lc"])
def synergy_bwd_kernel(
    dout_ptr,  # [G, M, R]   upstream gradient
    z_ptr,     # [G, M, R]
    ctx_ptr,   # [G, Lc, R]
    mask_ptr,  # [G, Lc]     uint8
    p_ptr,     # [P]         packed block tensors, fp32
    o_ptr,     # [G, M, R]   fp32 attention output from the forward
    lse_ptr,   # [G, M, R]   fp32 log-sum-exp from the forward
    dz_ptr,    # [G, M, R]   out
    dctx_ptr,  # [G, Lc, R]  out
    dp_ptr,    # [G, P]      out, fp32 per-group partial gradients of the packed tensors
    Lc, scale,
    M: tl.constexpr, R: tl.constexpr, F: tl.constexpr, RH: tl.constexpr, H: tl.constexpr, P: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BF: tl.constexpr,
):
    i_g = tl.program_id(0).to(tl.int64)
    o_m, o_r = tl.arange(0, BM), tl.arange(0, BR)
    m_m, m_r = o_m < M, o_r < R
    m_mr = m_m[:, None] & m_r[None, :]
    o_mr = i_g * M * R + o_m[:, None] * R + o_r[None, :]
    o_wq, o_wk, o_wv, o_wo, o_ln2, o_w1, o_w2 = _offsets(R, F)
    dp_ptr += i_g * P

    b_dout = tl.load(dout_ptr + o_mr, mask=m_mr, other=0.0).to(tl.float32)  # [BM, BR]
    b_z = tl.load(z_ptr + o_mr, mask=m_mr, other=0.0).to(tl.float32)
    b_o = tl.load(o_ptr + o_mr, mask=m_mr, other=0.0)
    b_wo = _load_mat(p_ptr, o_wo, o_r, m_r, R)
    b_z1 = b_z + tl.dot(b_o, b_wo, input_precision="ieee") + _load_vec(p_ptr, o_wo + R * R, o_r, m_r)[None, :]
    w_ln2 = _load_vec(p_ptr, o_ln2, o_r, m_r)
    ln2, z1_hat, z1_rstd = _layer_norm(b_z1, w_ln2, _load_vec(p_ptr, o_ln2 + R, o_r, m_r), m_r, R)

    # FFN: z2 = z1 + GELU(ln2 W_1 + b_1) W_2 + b_2.
    d_ln2 = tl.zeros((BM, BR), dtype=tl.float32)
    for f0 in range(0, F, BF):
        o_f = f0 + tl.arange(0, BF)
        m_f = o_f < F
        m_rf = m_r[:, None] & m_f[None, :]
        p_w1 = p_ptr + o_w1 + o_r[:, None] * F + o_f[None, :]
        b_w1 = tl.load(p_w1, mask=m_rf, other=0.0)  # [BR, BF]
        b_b1 = tl.load(p_ptr + o_w1 + R * F + o_f, mask=m_f, other=0.0)
        p_w2 = p_ptr + o_w2 + o_f[:, None] * R + o_r[None, :]
        m_fr = m_f[:, None] & m_r[None, :]
        b_w2 = tl.load(p_w2, mask=m_fr, other=0.0)  # [BF, BR]
        u = tl.dot(ln2, b_w1, input_precision="ieee") + b_b1[None, :]  # [BM, BF]
        u = tl.where(m_m[:, None], u, 0.0)
        d_g = tl.dot(b_dout, tl.trans(b_w2), input_precision="ieee")
        tl.store(dp_ptr + o_w2 + o_f[:, None] * R + o_r[None, :],
                 tl.dot(tl.trans(_gelu(u)), b_dout, input_precision="ieee"), mask=m_fr)
        d_u = tl.where(m_m[:, None], d_g * _gelu_grad(u), 0.0)
        tl.store(dp_ptr + o_w1 + R * F + o_f, tl.sum(d_u, 0), mask=m_f)
        tl.store(dp_ptr + o_w1 + o_r[:, None] * F + o_f[None, :],
                 tl.dot(tl.trans(ln2), d_u, input_precision="ieee"), mask=m_rf)
        d_ln2 += tl.dot(d_u, tl.trans(b_w1), input_precision="ieee")
    _store_vec(dp_ptr, o_w2 + F * R, o_r, m_r, tl.sum(b_dout, 0))
    _store_vec(dp_ptr, o_ln2, o_r, m_r, tl.sum(d_ln2 * z1_hat, 0))
    _store_vec(dp_ptr, o_ln2 + R, o_r, m_r, tl.sum(d_ln2, 0))
    b_dz1 = b_dout + _layer_norm_bwd(d_ln2, z1_hat, z1_rstd, w_ln2, m_r, R)
    b_dz1 = tl.where(m_mr, b_dz1, 0.0)

    # Output projection: z1 = z + o W_o + b_o.
    _store_mat(dp_ptr, o_wo, o_r, m_r, tl.dot(tl.trans(b_o), b_dz1, input_precision="ieee"), R)
    _store_vec(dp_ptr, o_wo + R * R, o_r, m_r, tl.sum(b_dz1, 0))
    b_do = tl.dot(b_dz1, tl.trans(b_wo), input_precision="ieee")  # [BM, BR]

    ln1, z_hat, z_rstd, b_q = _queries(b_z, p_ptr, o_r, m_r, R)
    b_lse = tl.load(lse_ptr + o_mr, mask=m_mr, other=0.0)
    b_delta = tl.zeros((BM, BR), dtype=tl.float32)  # rowsum(do * o) per head, column-wise
    for e in tl.static_range(H):
        m_e = ((o_r // RH) == e) & m_r
        d_e = tl.sum(tl.where(m_e[None, :], b_do * b_o, 0.0), 1)
        b_delta = tl.where(m_e[None, :], d_e[:, None], b_delta)

    w_lnc = _load_vec(p_ptr, 0, o_r, m_r)
    b_wk = _load_mat(p_ptr, o_wk, o_r, m_r, R)
    b_wv = _load_mat(p_ptr, o_wv, o_r, m_r, R)
    b_dq = tl.zeros((BM, BR), dtype=tl.float32)
    b_dwk = tl.zeros((BR, BR), dtype=tl.float32)
    b_dwv = tl.zeros((BR, BR), dtype=tl.float32)
    b_dbv = tl.zeros((BR,), dtype=tl.float32)
    b_dlnc_w = tl.zeros((BR,), dtype=tl.float32)
    b_dlnc_b = tl.zeros((BR,), dtype=tl.float32)
    for start in range(0, Lc, BC):
        o_c, m_c, valid, b_cn, c_hat, c_rstd, b_k, b_v = _context_block(
            ctx_ptr, mask_ptr, p_ptr, i_g, start, Lc, o_r, m_r, R, BC)
        b_dk = tl.zeros((BC, BR), dtype=tl.float32)
        b_dv = tl.zeros((BC, BR), dtype=tl.float32)
        for e in tl.static_range(H):
            m_e = ((o_r // RH) == e) & m_r
            s = _scores(b_q, b_k, m_e, valid, m_c, scale)  # [BM, BC]
            lse_e = tl.max(tl.where(m_e[None, :], b_lse, NEG), 1)
            p = tl.where(m_m[:, None], tl.exp(s - lse_e[:, None]), 0.0)
            b_do_e = tl.where(m_e[None, :], b_do, 0.0)
            b_dv += tl.dot(tl.trans(p), b_do_e, input_precision="ieee")
            d_p = tl.dot(b_do_e, tl.trans(b_v), input_precision="ieee")
            d_s = p * (d_p - tl.max(tl.where(m_e[None, :], b_delta, NEG), 1)[:, None]) * scale
            b_dq += tl.dot(d_s, tl.where(m_e[None, :], b_k, 0.0), input_precision="ieee")
            b_dk += tl.dot(tl.trans(d_s), tl.where(m_e[None, :], b_q, 0.0), input_precision="ieee")
        b_dwk += tl.dot(tl.trans(b_cn), b_dk, input_precision="ieee")
        b_dwv += tl.dot(tl.trans(b_cn), b_dv, input_precision="ieee")
        b_dbv += tl.sum(b_dv, 0)
        d_cn = tl.dot(b_dk, tl.trans(b_wk), input_precision="ieee") + tl.dot(b_dv, tl.trans(b_wv), input_precision="ieee")
        d_cn = tl.where(m_c[:, None], d_cn, 0.0)
        b_dlnc_w += tl.sum(d_cn * c_hat, 0)
        b_dlnc_b += tl.sum(d_cn, 0)
        b_dc = _layer_norm_bwd(d_cn, c_hat, c_rstd, w_lnc, m_r, R)
        p_dc = dctx_ptr + i_g * Lc * R + o_c[:, None] * R + o_r[None, :]
        tl.store(p_dc, b_dc.to(dctx_ptr.dtype.element_ty), mask=m_c[:, None] & m_r[None, :])
    _store_vec(dp_ptr, 0, o_r, m_r, b_dlnc_w)
    _store_vec(dp_ptr, R, o_r, m_r, b_dlnc_b)
    _store_mat(dp_ptr, o_wk, o_r, m_r, b_dwk, R)
    _store_mat(dp_ptr, o_wv, o_r, m_r, b_dwv, R)
    _store_vec(dp_ptr, o_wv + R * R, o_r, m_r, b_dbv)

    # Queries: q = LN_1(z) W_q + b_q.
    b_dq = tl.where(m_mr, b_dq, 0.0)
    _store_mat(dp_ptr, o_wq, o_r, m_r, tl.dot(tl.trans(ln1), b_dq, input_precision="ieee"), R)
    _store_vec(dp_ptr, o_wq + R * R, o_r, m_r, tl.sum(b_dq, 0))
    d_ln1 = tl.dot(b_dq, tl.trans(_load_mat(p_ptr, o_wq, o_r, m_r, R)), input_precision="ieee")
    w_ln1 = _load_vec(p_ptr, 2 * R, o_r, m_r)
    _store_vec(dp_ptr, 2 * R, o_r, m_r, tl.sum(d_ln1 * z_hat, 0))
    _store_vec(dp_ptr, 3 * R, o_r, m_r, tl.sum(d_ln1, 0))
    b_dz = b_dz1 + _layer_norm_bwd(d_ln1, z_hat, z_rstd, w_ln1, m_r, R)
    tl.store(dz_ptr + o_mr, b_dz.to(dz_ptr.dtype.element_ty), mask=m_mr)
