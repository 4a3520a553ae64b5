"""Triton kernels of one USEformer block. Launchers and autograd live in ops.py.

Forward: one program per group. Its M synergy queries stay in registers while
the context streams through in blocks of BC tokens with an online softmax per
head (LN_c and the k/v projections are applied on the fly, so the normalised
context is never written). The queries' tail (output projection, LN_2, FFN in
hidden chunks of BF) follows in the same program.

Backward: four launches, so that no program holds the whole block's state.
- ``synergy_bwd_ffn_kernel`` (one program per group and chunk of BF hidden
  units): the FFN backward of that chunk: its slices of W_1, b_1, W_2 whole,
  and its share of dL/d LN_2(z1).
- ``synergy_bwd_tail_kernel`` (one program per group): sums those shares, then
  LN_2 and output projection backward; it writes dL/dz1, the attention output
  gradient ``do``, its per-head ``delta = rowsum(do * o)`` and the queries ``q``.
- ``synergy_bwd_ctx_kernel`` (one program per group and block of BC context
  tokens): the attention backward of that block, from q, do, delta and the
  forward's log-sum-exp. It writes the block's dctx, and per-block partials of
  dq and of the k/v projection and LN_c gradients. Nothing is carried from
  block to block: the context is spread over programs, not walked by one.
- ``synergy_bwd_finish_kernel`` (one program per group): sums the group's
  block partials in a fixed order (deterministic, no atomics), then the query
  path q = LN_1(z) W_q + b_q, completing dz.
The one-kernel backward this replaced walked the context with a dozen live
[BM, BR] and [BR, BR] blocks and spilled registers under every Triton release
once its contraction blocks reached the 16 that Triton 3.4-3.7 require.

Only the tiles (BM, BR, BC, BF) are compile-time: the width R, the queries M,
the heads H, the FFN width F and the context length Lc are runtime ints, so one
compiled kernel serves every shape its tiles cover. Heads are visited with a
runtime loop and are masks over the R columns: head e's queries (and output
gradients) are masked to e's columns, so in a product with all heads' keys
they meet only e's rows; per-head softmax statistics are kept column-wise
(every column of head e holds head e's running max and sum). Keys and values
are computed transposed ([BR, BC]), which keeps the weights on the left of
their dots. Every dot contracts over at least 16 elements.

Every dot is exact fp32 (IEEE FMA, not TF32). Register budget, not arithmetic,
bounds these kernels.

The block's tensors arrive packed in one fp32 buffer (PARAM_NAMES order);
``_offsets`` names each tensor's place in it.
"""

import triton
import triton.language as tl

LN_EPS = tl.constexpr(1e-5)
# finfo(float32).min, the reference's fill for masked scores.
NEG = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _offsets(R, F):
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
def _vec(p_ptr, off, o_i, m_i):
    """Elements o_i of the packed vector at ``off``: [len(o_i)]."""
    return tl.load(p_ptr + off + o_i, mask=m_i, other=0.0)


@triton.jit
def _mat(p_ptr, off, o_i, o_j, m_i, m_j, N):
    """Rows o_i, columns o_j of the packed row-major (., N) matrix at ``off``."""
    return tl.load((p_ptr + off + o_i * N)[:, None] + o_j[None, :], mask=m_i[:, None] & m_j[None, :], other=0.0)


@triton.jit
def _mat_t(p_ptr, off, o_i, o_j, m_i, m_j, N):
    """Rows o_i, columns o_j of the transpose of the packed (., N) matrix at ``off``."""
    return tl.load((p_ptr + off + o_i)[:, None] + (o_j * N)[None, :], mask=m_i[:, None] & m_j[None, :], other=0.0)


@triton.jit
def _rows(ptr, o_i, o_r, m_i, m_r, R):
    """Pointers and mask of rows o_i of a row-major (., R) block."""
    return (ptr + o_i * R)[:, None] + o_r[None, :], m_i[:, None] & m_r[None, :]


@triton.jit
def _layer_norm(b_x, w, b, m_r, R):
    """Row LayerNorm over the R real columns: (normalised * w + b, x_hat, rstd)."""
    mean = tl.sum(b_x, 1) / R
    diff = tl.where(m_r[None, :], b_x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(diff * diff, 1) / R + LN_EPS)
    x_hat = diff * rstd[:, None]
    return x_hat * w[None, :] + b[None, :], x_hat, rstd


@triton.jit
def _layer_norm_bwd(d_out, x_hat, rstd, w, m_r, R):
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
def _queries(z_ptr, p_ptr, o_m, o_r, m_m, m_r, R):
    """q = LN_1(z) W_q + b_q for the group's [BM, BR] block of queries."""
    p_z, m_z = _rows(z_ptr, o_m, o_r, m_m, m_r, R)
    b_z = tl.load(p_z, mask=m_z, other=0.0).to(tl.float32)
    ln1, z_hat, z_rstd = _layer_norm(b_z, _vec(p_ptr, 2 * R, o_r, m_r), _vec(p_ptr, 3 * R, o_r, m_r), m_r, R)
    o_wq = 4 * R
    b_q = tl.dot(ln1, _mat(p_ptr, o_wq, o_r, o_r, m_r, m_r, R), input_precision="ieee")
    return b_q + _vec(p_ptr, o_wq + R * R, o_r, m_r)[None, :]


@triton.jit
def _context_block(ctx_ptr, mask_ptr, p_ptr, o_c, m_c, o_r, m_r, R):
    """BC context tokens normalised by LN_c: (c_n, c_hat, rstd, valid), c_n [BC, BR]."""
    p_c, m_cr = _rows(ctx_ptr, o_c, o_r, m_c, m_r, R)
    b_c = tl.load(p_c, mask=m_cr, other=0.0).to(tl.float32)
    valid = tl.load(mask_ptr + o_c, mask=m_c, other=0) != 0
    b_cn, c_hat, c_rstd = _layer_norm(b_c, _vec(p_ptr, 0, o_r, m_r), _vec(p_ptr, R, o_r, m_r), m_r, R)
    return b_cn, c_hat, c_rstd, valid


@triton.jit
def _kv_t(b_cnt, p_ptr, o_wk, o_wv, o_r, m_r, m_rows, R):
    """Keys and values of a context block, transposed ([BR, BC]), from the rows m_rows
    of W_k^T and W_v^T (the other rows are zero): k^T = W_k^T c_n^T, v^T = W_v^T c_n^T + b_v."""
    b_wkt = _mat_t(p_ptr, o_wk, o_r, o_r, m_rows, m_r, R)  # [BR, BR]
    b_wvt = _mat_t(p_ptr, o_wv, o_r, o_r, m_rows, m_r, R)
    b_kt = tl.dot(b_wkt, b_cnt, input_precision="ieee")
    b_vt = tl.dot(b_wvt, b_cnt, input_precision="ieee") + _vec(p_ptr, o_wv + R * R, o_r, m_rows)[:, None]
    return b_kt, b_vt


@triton.jit
def _scores(b_q, b_kt, valid, m_c, scale):
    """Head e's scores [BM, BC]: masked tokens get the reference's finite fill, out-of-range ones -inf."""
    s = tl.dot(b_q, b_kt, input_precision="ieee") * scale
    s = tl.where(valid[None, :], s, NEG)
    return tl.where(m_c[None, :], s, float("-inf"))


@triton.jit(do_not_specialize=["Lc", "NS", "CH", "M", "R", "H"])
def synergy_fwd_split_kernel(
    z_ptr,     # [G, M, R]   synergy queries
    ctx_ptr,   # [G, Lc, R]  context tokens
    mask_ptr,  # [G, Lc]     uint8, 1 = real token
    p_ptr,     # [P]         packed block tensors, fp32
    m_ptr,     # [G, NS, M, R]  out, fp32 running max of the split, column-wise per head
    l_ptr,     # [G, NS, M, R]  out, fp32 softmax denominator of the split, ditto
    acc_ptr,   # [G, NS, M, R]  out, fp32 unnormalised attention output of the split
    Lc, NS, CH, M, R, H, scale,
    BM: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):
    """Attention of a group's queries over one split of CH context tokens (a multiple of BC):
    every (group, split) is its own program, and the splits are merged by the combine kernel."""
    i_p = tl.program_id(0).to(tl.int64)
    i_g, i_s = i_p // NS, i_p % NS
    z_ptr += i_g * M * R
    ctx_ptr += i_g * Lc * R
    mask_ptr += i_g * Lc
    m_ptr += i_p * M * R
    l_ptr += i_p * M * R
    acc_ptr += i_p * M * R
    RH = R // H
    o_m, o_r = tl.arange(0, BM), tl.arange(0, BR)
    m_m, m_r = o_m < M, o_r < R
    # Only the k/v offsets are used here, and they do not depend on the FFN width.
    o_wq, o_wk, o_wv, o_wo, o_ln2, o_w1, o_w2 = _offsets(R, 0)

    # Each split recomputes the queries (M x R x R): cheaper than a launch to share them.
    b_q = _queries(z_ptr, p_ptr, o_m, o_r, m_m, m_r, R)  # [BM, BR]
    m_col = tl.full((BM, BR), NEG, dtype=tl.float32)
    l_col = tl.zeros((BM, BR), dtype=tl.float32)
    b_acc = tl.zeros((BM, BR), dtype=tl.float32)
    c0 = i_s * CH
    c1 = tl.minimum(c0 + CH, Lc)
    for start in range(c0, c1, BC):
        o_c = start + tl.arange(0, BC)
        m_c = o_c < c1
        b_cn, c_hat, c_rstd, valid = _context_block(ctx_ptr, mask_ptr, p_ptr, o_c, m_c, o_r, m_r, R)
        # Every head's keys and values at once ([BR, BC]); a head's queries are masked
        # to its columns, so they meet only its rows.
        b_kt, b_vt = _kv_t(tl.trans(b_cn), p_ptr, o_wk, o_wv, o_r, m_r, m_r, R)
        for e in range(H):
            m_e = ((o_r // RH) == e) & m_r
            s = _scores(tl.where(m_e[None, :], b_q, 0.0), b_kt, valid, m_c, scale)  # [BM, BC]
            m_old = tl.max(tl.where(m_e[None, :], m_col, NEG), 1)
            l_old = tl.max(tl.where(m_e[None, :], l_col, 0.0), 1)
            m_new = tl.maximum(m_old, tl.max(s, 1))
            alpha = tl.exp(m_old - m_new)
            p = tl.exp(s - m_new[:, None])
            b_acc = tl.where(m_e[None, :], b_acc * alpha[:, None], b_acc)
            b_acc += tl.dot(p, tl.trans(tl.where(m_e[:, None], b_vt, 0.0)), input_precision="ieee")
            m_col = tl.where(m_e[None, :], m_new[:, None], m_col)
            l_col = tl.where(m_e[None, :], (l_old * alpha + tl.sum(p, 1))[:, None], l_col)
    p_mr, m_mr = _rows(m_ptr, o_m, o_r, m_m, m_r, R)
    tl.store(p_mr, m_col, mask=m_mr)
    tl.store(_rows(l_ptr, o_m, o_r, m_m, m_r, R)[0], l_col, mask=m_mr)
    tl.store(_rows(acc_ptr, o_m, o_r, m_m, m_r, R)[0], b_acc, mask=m_mr)


@triton.jit(do_not_specialize=["NS", "M", "R", "F"])
def synergy_fwd_combine_kernel(
    z_ptr,     # [G, M, R]   synergy queries
    p_ptr,     # [P]         packed block tensors, fp32
    m_ptr,     # [G, NS, M, R]  fp32 per-split running max (split kernel)
    l_ptr,     # [G, NS, M, R]  fp32 per-split denominators
    acc_ptr,   # [G, NS, M, R]  fp32 per-split unnormalised outputs
    out_ptr,   # [G, M, R]   updated queries, z's dtype
    o_ptr,     # [G, M, R]   fp32 attention output, saved for backward
    lse_ptr,   # [G, M, R]   fp32 log-sum-exp, column-wise per head, saved for backward
    NS, M, R, F,
    BM: tl.constexpr, BR: tl.constexpr, BF: tl.constexpr,
):
    """Merge a group's splits in a fixed order (deterministic, no atomics), then the queries'
    tail: output projection, LN_2 and the FFN in hidden chunks of BF. One program per group."""
    i_g = tl.program_id(0).to(tl.int64)
    z_ptr += i_g * M * R
    out_ptr += i_g * M * R
    o_ptr += i_g * M * R
    lse_ptr += i_g * M * R
    m_ptr += i_g * NS * M * R
    l_ptr += i_g * NS * M * R
    acc_ptr += i_g * NS * M * R
    o_m, o_r = tl.arange(0, BM), tl.arange(0, BR)
    m_m, m_r = o_m < M, o_r < R
    o_wq, o_wk, o_wv, o_wo, o_ln2, o_w1, o_w2 = _offsets(R, F)

    # Unnormalised (max, sum, output) triples merge exactly: a split whose tokens are all
    # masked has max NEG and weighs exp(NEG - m) = 0 next to a real token, and a group
    # with no real token sums every split's counts, as one program over the whole context would.
    p_mr, m_mr = _rows(m_ptr, o_m, o_r, m_m, m_r, R)
    p_l, _ = _rows(l_ptr, o_m, o_r, m_m, m_r, R)
    p_acc, _ = _rows(acc_ptr, o_m, o_r, m_m, m_r, R)
    m_col = tl.full((BM, BR), NEG, dtype=tl.float32)
    l_col = tl.zeros((BM, BR), dtype=tl.float32)
    b_acc = tl.zeros((BM, BR), dtype=tl.float32)
    for s in range(NS):
        m_s = tl.load(p_mr + s * M * R, mask=m_mr, other=NEG)
        m_new = tl.maximum(m_col, m_s)
        a_old, a_s = tl.exp(m_col - m_new), tl.exp(m_s - m_new)
        # Rows beyond M read a count of 1 per split, so their (discarded) output is 0, not 0 / 0.
        l_col = l_col * a_old + tl.load(p_l + s * M * R, mask=m_mr, other=1.0) * a_s
        b_acc = b_acc * a_old + tl.load(p_acc + s * M * R, mask=m_mr, other=0.0) * a_s
        m_col = m_new
    # Padding columns (r not a power of two) belong to no head: give them l = 1.
    l_col = tl.where(m_r[None, :], l_col, 1.0)
    b_o = tl.where(m_r[None, :], b_acc / l_col, 0.0)
    p_o, m_mr = _rows(o_ptr, o_m, o_r, m_m, m_r, R)
    tl.store(p_o, b_o, mask=m_mr)
    # A fully masked group has m = NEG, and NEG + log(l) rounds to NEG: backward relies on it.
    p_lse, m_mr = _rows(lse_ptr, o_m, o_r, m_m, m_r, R)
    tl.store(p_lse, m_col + tl.log(l_col), mask=m_mr)

    p_z, m_mr = _rows(z_ptr, o_m, o_r, m_m, m_r, R)
    b_z1 = tl.load(p_z, mask=m_mr, other=0.0).to(tl.float32)
    b_z1 += tl.dot(b_o, _mat(p_ptr, o_wo, o_r, o_r, m_r, m_r, R), input_precision="ieee")
    b_z1 += _vec(p_ptr, o_wo + R * R, o_r, m_r)[None, :]
    ln2, z1_hat, z1_rstd = _layer_norm(b_z1, _vec(p_ptr, o_ln2, o_r, m_r), _vec(p_ptr, o_ln2 + R, o_r, m_r), m_r, R)
    for f0 in range(0, F, BF):
        o_f = f0 + tl.arange(0, BF)
        m_f = o_f < F
        u = tl.dot(ln2, _mat(p_ptr, o_w1, o_r, o_f, m_r, m_f, F), input_precision="ieee")  # [BM, BF]
        u += _vec(p_ptr, o_w1 + R * F, o_f, m_f)[None, :]
        b_z1 += tl.dot(_gelu(u), _mat(p_ptr, o_w2, o_f, o_r, m_f, m_r, R), input_precision="ieee")
    b_z2 = b_z1 + _vec(p_ptr, o_w2 + F * R, o_r, m_r)[None, :]
    p_out, m_mr = _rows(out_ptr, o_m, o_r, m_m, m_r, R)
    tl.store(p_out, b_z2.to(out_ptr.dtype.element_ty), mask=m_mr)


@triton.jit
def _store_vec(dp_ptr, off, o_i, m_i, val):
    tl.store(dp_ptr + off + o_i, val, mask=m_i)


@triton.jit
def _store_mat(dp_ptr, off, o_i, o_j, m_i, m_j, N, val):
    tl.store((dp_ptr + off + o_i * N)[:, None] + o_j[None, :], val, mask=m_i[:, None] & m_j[None, :])


@triton.jit
def _store_mat_t(dp_ptr, off, o_i, o_j, m_i, m_j, N, val):
    """Store ``val`` (rows o_i, columns o_j of a transpose) into the (., N) matrix at ``off``."""
    tl.store((dp_ptr + off + o_i)[:, None] + (o_j * N)[None, :], val, mask=m_i[:, None] & m_j[None, :])


@triton.jit
def _attention_residual(z_ptr, o_ptr, p_ptr, o_m, o_r, m_m, m_r, o_wo, R):
    """z1 = z + o W_o + b_o for the group's queries, from the forward's attention output o:
    (z1 [BM, BR] fp32, o [BM, BR])."""
    p_mr, m_mr = _rows(o_ptr, o_m, o_r, m_m, m_r, R)
    b_o = tl.load(p_mr, mask=m_mr, other=0.0)
    p_mr, m_mr = _rows(z_ptr, o_m, o_r, m_m, m_r, R)
    b_z1 = tl.load(p_mr, mask=m_mr, other=0.0).to(tl.float32)
    b_z1 += tl.dot(b_o, _mat(p_ptr, o_wo, o_r, o_r, m_r, m_r, R), input_precision="ieee")
    return b_z1 + _vec(p_ptr, o_wo + R * R, o_r, m_r)[None, :], b_o


@triton.jit(do_not_specialize=["NF", "M", "R", "F", "P"])
def synergy_bwd_ffn_kernel(
    dout_ptr,  # [G, M, R]   upstream gradient
    z_ptr,     # [G, M, R]
    p_ptr,     # [P]         packed block tensors, fp32
    o_ptr,     # [G, M, R]   fp32 attention output from the forward
    dln2_ptr,  # [G, NF, M, R]  out, fp32 per-chunk partial dL/d LN_2(z1)
    dp_ptr,    # [G, P]      out, fp32 per-group partial gradients (this chunk's W_1, b_1, W_2 slices)
    NF, M, R, F, P,
    BM: tl.constexpr, BR: tl.constexpr, BF: tl.constexpr,
):
    """FFN backward for one chunk of BF hidden units of one group: z2 = z1 + GELU(ln2 W_1 + b_1) W_2 + b_2.
    The chunks' weight slices are disjoint, so each is stored whole; their shares of dL/d ln2 are summed
    by the tail kernel."""
    i_p = tl.program_id(0).to(tl.int64)
    i_g, i_f = i_p // NF, i_p % NF
    dout_ptr += i_g * M * R
    z_ptr += i_g * M * R
    o_ptr += i_g * M * R
    dln2_ptr += i_p * M * R
    dp_ptr += i_g * P
    o_m, o_r = tl.arange(0, BM), tl.arange(0, BR)
    m_m, m_r = o_m < M, o_r < R
    o_wq, o_wk, o_wv, o_wo, o_ln2, o_w1, o_w2 = _offsets(R, F)
    o_f = i_f * BF + tl.arange(0, BF)
    m_f = o_f < F

    b_z1, b_o = _attention_residual(z_ptr, o_ptr, p_ptr, o_m, o_r, m_m, m_r, o_wo, R)
    ln2, z1_hat, z1_rstd = _layer_norm(b_z1, _vec(p_ptr, o_ln2, o_r, m_r), _vec(p_ptr, o_ln2 + R, o_r, m_r), m_r, R)
    p_dout, m_mr = _rows(dout_ptr, o_m, o_r, m_m, m_r, R)
    b_dout = tl.load(p_dout, mask=m_mr, other=0.0).to(tl.float32)  # [BM, BR]
    b_w1 = _mat(p_ptr, o_w1, o_r, o_f, m_r, m_f, F)     # [BR, BF]
    b_w2t = _mat_t(p_ptr, o_w2, o_r, o_f, m_r, m_f, R)  # [BR, BF] = W_2^T
    u = tl.dot(ln2, b_w1, input_precision="ieee") + _vec(p_ptr, o_w1 + R * F, o_f, m_f)[None, :]  # [BM, BF]
    u = tl.where(m_m[:, None], u, 0.0)
    d_g = tl.dot(b_dout, b_w2t, input_precision="ieee")  # [BM, BF]
    _store_mat_t(dp_ptr, o_w2, o_r, o_f, m_r, m_f, R, tl.dot(tl.trans(b_dout), _gelu(u), input_precision="ieee"))
    d_u = tl.where(m_m[:, None], d_g * _gelu_grad(u), 0.0)
    _store_vec(dp_ptr, o_w1 + R * F, o_f, m_f, tl.sum(d_u, 0))
    _store_mat(dp_ptr, o_w1, o_r, o_f, m_r, m_f, F, tl.dot(tl.trans(ln2), d_u, input_precision="ieee"))
    tl.store(_rows(dln2_ptr, o_m, o_r, m_m, m_r, R)[0], tl.dot(d_u, tl.trans(b_w1), input_precision="ieee"),
             mask=m_mr)


@triton.jit(do_not_specialize=["NF", "M", "R", "F", "H", "P"])
def synergy_bwd_tail_kernel(
    dout_ptr,  # [G, M, R]   upstream gradient
    z_ptr,     # [G, M, R]
    p_ptr,     # [P]         packed block tensors, fp32
    o_ptr,     # [G, M, R]   fp32 attention output from the forward
    dln2_ptr,  # [G, NF, M, R]  fp32 per-chunk partial dL/d LN_2(z1) (FFN kernel)
    dz_ptr,    # [G, M, R]   out, fp32: dL/dz1 (the finish kernel adds the query path's share)
    q_ptr,     # [G, M, R]   out, fp32: the queries, for the context kernel
    do_ptr,    # [G, M, R]   out, fp32: dL/d(attention output)
    delta_ptr, # [G, M, R]   out, fp32: rowsum(do * o) per head, column-wise
    dp_ptr,    # [G, P]      out, fp32 per-group partial gradients (b_2, LN_2, output projection slots)
    NF, M, R, F, H, P,
    BM: tl.constexpr, BR: tl.constexpr,
):
    """LN_2 and output projection backward, after the FFN's chunks; one program per group."""
    i_g = tl.program_id(0).to(tl.int64)
    dout_ptr += i_g * M * R
    z_ptr += i_g * M * R
    o_ptr += i_g * M * R
    dln2_ptr += i_g * NF * M * R
    dz_ptr += i_g * M * R
    q_ptr += i_g * M * R
    do_ptr += i_g * M * R
    delta_ptr += i_g * M * R
    dp_ptr += i_g * P
    RH = R // H
    o_m, o_r = tl.arange(0, BM), tl.arange(0, BR)
    m_m, m_r = o_m < M, o_r < R
    o_wq, o_wk, o_wv, o_wo, o_ln2, o_w1, o_w2 = _offsets(R, F)

    # The queries first, for the context kernel: their registers are free before the rest begins.
    p_mr, m_mr = _rows(q_ptr, o_m, o_r, m_m, m_r, R)
    tl.store(p_mr, _queries(z_ptr, p_ptr, o_m, o_r, m_m, m_r, R), mask=m_mr)
    p_mr, m_mr = _rows(dln2_ptr, o_m, o_r, m_m, m_r, R)
    d_ln2 = tl.zeros((BM, BR), dtype=tl.float32)
    for f in range(NF):
        d_ln2 += tl.load(p_mr + f * M * R, mask=m_mr, other=0.0)
    b_z1, b_o = _attention_residual(z_ptr, o_ptr, p_ptr, o_m, o_r, m_m, m_r, o_wo, R)
    w_ln2 = _vec(p_ptr, o_ln2, o_r, m_r)
    ln2, z1_hat, z1_rstd = _layer_norm(b_z1, w_ln2, _vec(p_ptr, o_ln2 + R, o_r, m_r), m_r, R)
    b_dout = tl.load(_rows(dout_ptr, o_m, o_r, m_m, m_r, R)[0], mask=m_mr, other=0.0).to(tl.float32)
    _store_vec(dp_ptr, o_w2 + F * R, o_r, m_r, tl.sum(b_dout, 0))
    _store_vec(dp_ptr, o_ln2, o_r, m_r, tl.sum(d_ln2 * z1_hat, 0))
    _store_vec(dp_ptr, o_ln2 + R, o_r, m_r, tl.sum(d_ln2, 0))
    b_dz1 = b_dout + _layer_norm_bwd(d_ln2, z1_hat, z1_rstd, w_ln2, m_r, R)
    b_dz1 = tl.where(m_mr, b_dz1, 0.0)
    tl.store(_rows(dz_ptr, o_m, o_r, m_m, m_r, R)[0], b_dz1, mask=m_mr)

    # Output projection: z1 = z + o W_o + b_o.
    _store_mat(dp_ptr, o_wo, o_r, o_r, m_r, m_r, R, tl.dot(tl.trans(b_o), b_dz1, input_precision="ieee"))
    _store_vec(dp_ptr, o_wo + R * R, o_r, m_r, tl.sum(b_dz1, 0))
    b_do = tl.dot(b_dz1, _mat_t(p_ptr, o_wo, o_r, o_r, m_r, m_r, R), input_precision="ieee")  # [BM, BR]
    # delta = rowsum(do * o) per head, column-wise: a product with the same-head indicator.
    same_head = ((o_r[:, None] // RH) == (o_r[None, :] // RH)) & m_r[:, None] & m_r[None, :]
    b_delta = tl.dot(b_do * b_o, same_head.to(tl.float32), input_precision="ieee")  # [BM, BR]
    tl.store(_rows(do_ptr, o_m, o_r, m_m, m_r, R)[0], b_do, mask=m_mr)
    tl.store(_rows(delta_ptr, o_m, o_r, m_m, m_r, R)[0], b_delta, mask=m_mr)


@triton.jit(do_not_specialize=["Lc", "NC", "M", "R", "H", "Q"])
def synergy_bwd_ctx_kernel(
    ctx_ptr,   # [G, Lc, R]  context tokens
    mask_ptr,  # [G, Lc]     uint8
    p_ptr,     # [P]         packed block tensors, fp32
    q_ptr,     # [G, M, R]   fp32 queries (tail kernel)
    do_ptr,    # [G, M, R]   fp32 dL/d(attention output) (tail kernel)
    delta_ptr, # [G, M, R]   fp32 (tail kernel)
    lse_ptr,   # [G, M, R]   fp32 log-sum-exp from the forward
    dctx_ptr,  # [G, Lc, R]  out
    dq_ptr,    # [G, NC, M, R]  out, fp32 per-block partial dL/dq
    dw_ptr,    # [G, NC, Q]     out, fp32 per-block partial dW_k^T, dW_v^T, db_v, dLN_c w and b
    Lc, NC, M, R, H, Q, scale,
    BM: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):
    """Attention backward over one block of BC context tokens: every block of every group is
    its own program, so no program walks the context and no state is carried between blocks."""
    i_p = tl.program_id(0).to(tl.int64)
    i_g, i_c = i_p // NC, i_p % NC
    q_ptr += i_g * M * R
    do_ptr += i_g * M * R
    delta_ptr += i_g * M * R
    lse_ptr += i_g * M * R
    ctx_ptr += i_g * Lc * R
    dctx_ptr += i_g * Lc * R
    mask_ptr += i_g * Lc
    dq_ptr += i_p * M * R
    dw_ptr += i_p * Q
    RH = R // H
    o_m, o_r = tl.arange(0, BM), tl.arange(0, BR)
    m_m, m_r = o_m < M, o_r < R
    # Only the k/v offsets are used here, and they do not depend on the FFN width.
    o_wq, o_wk, o_wv, o_wo, o_ln2, o_w1, o_w2 = _offsets(R, 0)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < Lc

    p_mr, m_mr = _rows(q_ptr, o_m, o_r, m_m, m_r, R)
    b_q = tl.load(p_mr, mask=m_mr, other=0.0)     # [BM, BR]
    b_do = tl.load(_rows(do_ptr, o_m, o_r, m_m, m_r, R)[0], mask=m_mr, other=0.0)
    b_delta = tl.load(_rows(delta_ptr, o_m, o_r, m_m, m_r, R)[0], mask=m_mr, other=0.0)
    b_cn, c_hat, c_rstd, valid = _context_block(ctx_ptr, mask_ptr, p_ptr, o_c, m_c, o_r, m_r, R)
    # Every head's keys and values at once ([BR, BC]); a head's queries and output
    # gradients are masked to its columns, so they meet only its rows.
    b_kt, b_vt = _kv_t(tl.trans(b_cn), p_ptr, o_wk, o_wv, o_r, m_r, m_r, R)
    b_dq = tl.zeros((BM, BR), dtype=tl.float32)
    b_dkt = tl.zeros((BR, BC), dtype=tl.float32)  # dk^T of the block, all heads
    b_dvt = tl.zeros((BR, BC), dtype=tl.float32)
    for e in range(H):
        m_e = ((o_r // RH) == e) & m_r
        b_q_e = tl.where(m_e[None, :], b_q, 0.0)
        s = _scores(b_q_e, b_kt, valid, m_c, scale)  # [BM, BC]
        lse_e = tl.load(lse_ptr + o_m * R + e * RH, mask=m_m, other=0.0)  # [BM]
        # A fully masked group: every score is NEG and so is lse (NEG + log(Lc) rounds to it),
        # so exp(s - lse) = 1 where the reference's uniform softmax has 1 / Lc.
        p = tl.exp(s - lse_e[:, None]) * tl.where(lse_e == NEG, 1.0 / Lc, 1.0)[:, None]
        p = tl.where(m_m[:, None], p, 0.0)
        b_do_e = tl.where(m_e[None, :], b_do, 0.0)
        b_dvt += tl.dot(tl.trans(b_do_e), p, input_precision="ieee")  # [BR, BC]
        d_p = tl.dot(b_do_e, b_vt, input_precision="ieee")            # [BM, BC]
        delta_e = tl.max(tl.where(m_e[None, :], b_delta, NEG), 1)
        # Masked scores are the constant fill (masked_fill): no gradient flows through them.
        d_s = tl.where(valid[None, :], p * (d_p - delta_e[:, None]) * scale, 0.0)
        b_dq += tl.dot(d_s, tl.trans(tl.where(m_e[:, None], b_kt, 0.0)), input_precision="ieee")
        b_dkt += tl.dot(tl.trans(b_q_e), d_s, input_precision="ieee")  # [BR, BC]
    tl.store(_rows(dq_ptr, o_m, o_r, m_m, m_r, R)[0], b_dq, mask=m_mr)
    m_rr = m_r[:, None] & m_r[None, :]
    tl.store(_rows(dw_ptr, o_r, o_r, m_r, m_r, R)[0], tl.dot(b_dkt, b_cn, input_precision="ieee"), mask=m_rr)
    tl.store(_rows(dw_ptr + R * R, o_r, o_r, m_r, m_r, R)[0], tl.dot(b_dvt, b_cn, input_precision="ieee"),
             mask=m_rr)
    _store_vec(dw_ptr, 2 * R * R, o_r, m_r, tl.sum(b_dvt, 1))
    # d c_n^T = W_k dk^T + W_v dv^T.
    b_dcnt = tl.dot(_mat(p_ptr, o_wk, o_r, o_r, m_r, m_r, R), b_dkt, input_precision="ieee")
    b_dcnt += tl.dot(_mat(p_ptr, o_wv, o_r, o_r, m_r, m_r, R), b_dvt, input_precision="ieee")
    d_cn = tl.where(m_c[:, None], tl.trans(b_dcnt), 0.0)  # [BC, BR]
    _store_vec(dw_ptr, 2 * R * R + R, o_r, m_r, tl.sum(d_cn * c_hat, 0))
    _store_vec(dw_ptr, 2 * R * R + 2 * R, o_r, m_r, tl.sum(d_cn, 0))
    b_dc = _layer_norm_bwd(d_cn, c_hat, c_rstd, _vec(p_ptr, 0, o_r, m_r), m_r, R)
    p_dc, m_cr = _rows(dctx_ptr, o_c, o_r, m_c, m_r, R)
    tl.store(p_dc, b_dc.to(dctx_ptr.dtype.element_ty), mask=m_cr)


@triton.jit(do_not_specialize=["NC", "M", "R", "F", "H", "P", "Q"])
def synergy_bwd_finish_kernel(
    z_ptr,     # [G, M, R]
    p_ptr,     # [P]         packed block tensors, fp32
    dq_ptr,    # [G, NC, M, R]  fp32 per-block partial dL/dq (context kernel)
    dw_ptr,    # [G, NC, Q]     fp32 per-block weight partials (context kernel)
    dz_ptr,    # [G, M, R]   in: dL/dz1 (tail kernel); out: dL/dz, fp32
    dp_ptr,    # [G, P]      out, fp32 per-group partials (query path, LN_c, k/v projection slots)
    NC, M, R, F, H, P, Q,
    BM: tl.constexpr, BR: tl.constexpr,
):
    """Sum the group's context-block partials in a fixed order, then the query path:
    q = LN_1(z) W_q + b_q. One program per group."""
    i_g = tl.program_id(0).to(tl.int64)
    z_ptr += i_g * M * R
    dz_ptr += i_g * M * R
    dq_ptr += i_g * NC * M * R
    dw_ptr += i_g * NC * Q
    dp_ptr += i_g * P
    o_m, o_r = tl.arange(0, BM), tl.arange(0, BR)
    m_m, m_r = o_m < M, o_r < R
    m_rr = m_r[:, None] & m_r[None, :]
    o_wq, o_wk, o_wv, o_wo, o_ln2, o_w1, o_w2 = _offsets(R, F)
    p_mr, m_mr = _rows(dq_ptr, o_m, o_r, m_m, m_r, R)
    p_rr, _ = _rows(dw_ptr, o_r, o_r, m_r, m_r, R)

    b_dq = tl.zeros((BM, BR), dtype=tl.float32)
    b_dwkt = tl.zeros((BR, BR), dtype=tl.float32)
    b_dwvt = tl.zeros((BR, BR), dtype=tl.float32)
    b_dbv = tl.zeros((BR,), dtype=tl.float32)
    b_dlnc_w = tl.zeros((BR,), dtype=tl.float32)
    b_dlnc_b = tl.zeros((BR,), dtype=tl.float32)
    for c in range(NC):
        b_dq += tl.load(p_mr + c * M * R, mask=m_mr, other=0.0)
        b_dwkt += tl.load(p_rr + c * Q, mask=m_rr, other=0.0)
        b_dwvt += tl.load(p_rr + c * Q + R * R, mask=m_rr, other=0.0)
        b_dbv += _vec(dw_ptr, c * Q + 2 * R * R, o_r, m_r)
        b_dlnc_w += _vec(dw_ptr, c * Q + 2 * R * R + R, o_r, m_r)
        b_dlnc_b += _vec(dw_ptr, c * Q + 2 * R * R + 2 * R, o_r, m_r)
    _store_vec(dp_ptr, 0, o_r, m_r, b_dlnc_w)
    _store_vec(dp_ptr, R, o_r, m_r, b_dlnc_b)
    _store_mat_t(dp_ptr, o_wk, o_r, o_r, m_r, m_r, R, b_dwkt)
    _store_mat_t(dp_ptr, o_wv, o_r, o_r, m_r, m_r, R, b_dwvt)
    _store_vec(dp_ptr, o_wv + R * R, o_r, m_r, b_dbv)

    w_ln1 = _vec(p_ptr, 2 * R, o_r, m_r)
    p_z, m_z = _rows(z_ptr, o_m, o_r, m_m, m_r, R)
    b_z = tl.load(p_z, mask=m_z, other=0.0).to(tl.float32)
    ln1, z_hat, z_rstd = _layer_norm(b_z, w_ln1, _vec(p_ptr, 3 * R, o_r, m_r), m_r, R)
    _store_mat(dp_ptr, o_wq, o_r, o_r, m_r, m_r, R, tl.dot(tl.trans(ln1), b_dq, input_precision="ieee"))
    _store_vec(dp_ptr, o_wq + R * R, o_r, m_r, tl.sum(b_dq, 0))
    d_ln1 = tl.dot(b_dq, _mat_t(p_ptr, o_wq, o_r, o_r, m_r, m_r, R), input_precision="ieee")
    _store_vec(dp_ptr, 2 * R, o_r, m_r, tl.sum(d_ln1 * z_hat, 0))
    _store_vec(dp_ptr, 3 * R, o_r, m_r, tl.sum(d_ln1, 0))
    p_dz, m_dz = _rows(dz_ptr, o_m, o_r, m_m, m_r, R)
    b_dz = tl.load(p_dz, mask=m_dz, other=0.0) + _layer_norm_bwd(d_ln1, z_hat, z_rstd, w_ln1, m_r, R)
    tl.store(p_dz, b_dz, mask=m_dz)
