"""The benchmarks' xformers providers, checked on CPU against the reference attention.

xformers has no CPU kernels, so a stand-in with its documented contract
(inputs (B, M, H, K), additive bias (B, H, Mq, Mk), softmax scale 1/sqrt(K))
runs here; on a GPU the real library takes its place. This proves the layout
conversions the providers do, which would otherwise first run on a GPU.
"""

import math
import os
import sys
import types

import pytest
import torch

from nearl_kernels.oca.reference import oca_reference
from nearl_kernels.synergy import PARAM_NAMES, synergy_reference
from nearl_model.modules import USEformerBlock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_oca  # noqa: E402
from helpers import rel_err  # noqa: E402
import common  # noqa: E402
import bench_synergy  # noqa: E402


def _memory_efficient_attention(query, key, value, attn_bias=None, op=None):
    # xformers' kernels take bf16/fp16 only: the benchmark rows must hand them that.
    assert all(t.dtype == torch.bfloat16 for t in (query, key, value)), [t.dtype for t in (query, key, value)]
    assert attn_bias is None or attn_bias.dtype == torch.bfloat16
    q, k, v = (t.float().transpose(1, 2) for t in (query, key, value))  # (B, H, M, K)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if attn_bias is not None:
        s = s + attn_bias.float()
    return (torch.softmax(s, dim=-1) @ v).transpose(1, 2).to(query.dtype)


@pytest.fixture
def fake_xformers(monkeypatch):
    fake = types.SimpleNamespace(memory_efficient_attention=_memory_efficient_attention)
    monkeypatch.setattr(common, "xformers_ops", lambda: ((fake, "cutlass"), None))


@pytest.mark.parametrize("T", [1, 4])
def test_oca_xformers_layout(fake_xformers, T):
    g = torch.Generator().manual_seed(0)
    G, L, d, r, M = 8, 11, 64, 32, 16
    args = [torch.randn(G, L, d, generator=g), torch.randn(G, L, r, generator=g), torch.randn(G // T, M, r, generator=g),
            torch.randn(r, r, generator=g), torch.randn(r, r, generator=g), torch.randn(r, d, generator=g),
            torch.randn(d, generator=g), torch.tensor(0.9), torch.tensor(0.2)]
    expected = oca_reference(*args, 2, T, 1e-6)
    got = oca_reference(*args, 2, T, 1e-6, attention=bench_oca._xformers_attention)
    # bf16 attention inside: bf16 rounding is ~1e-2 of the norm, a layout error O(1).
    assert rel_err(got, expected) <= 2e-2


def test_synergy_xformers_layout_and_mask(fake_xformers):
    torch.manual_seed(0)
    block = USEformerBlock(32, 2, 4)
    params = {n: getattr(block, n).detach() for n in PARAM_NAMES}
    z, ctx = torch.randn(3, 16, 32), torch.randn(3, 29, 32)
    mask = torch.rand(3, 29) > 0.3
    mask[:, 0] = True
    expected = synergy_reference(z, ctx, mask, params, 2)
    got = synergy_reference(z, ctx, mask, params, 2, attention=bench_synergy._xformers_attention)
    assert rel_err(got, expected) <= 2e-2
