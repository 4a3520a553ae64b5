"""USEformer block: reference vs torch.compile vs fused Triton vs xformers attention."""

import pytest
import torch

from common import DEVICE, MODES, PROVIDERS, Case, measure, provider_or_skip, xformers_attention
from nearl_kernels.synergy import PARAM_NAMES, SynergyFunction, synergy_reference
from nearl_kernels.roofline import FFN_RATIO as FFN
from nearl_kernels.roofline import HEADS, M, R, SYNERGY_SHAPES, synergy_flops
from nearl_model.modules import USEformerBlock

# Context = a ViT-B/16 image's 197 tokens plus K prompts of 16 tokens. The GPU row is the
# roofline's shape: the kernel headers' figures and the compile gate's waves are about it.
SHAPES = {
    "gpu": [dict(s) for s in SYNERGY_SHAPES],
    "cpu": [dict(id="G4-Lc261-K4", G=4, Lc=197 + 4 * 16)],
    "smoke": [dict(id="G2-Lc229-K2", G=2, Lc=197 + 2 * 16)],
}
_COMPILED = {}


def _xformers_attention(q, k, v, mask):
    """xformers' memory-efficient attention with the padding mask as an additive bias."""
    G, H, Mq, rh = q.shape
    Lc = k.shape[2]
    # xformers wants the bias's last dimension allocated in multiples of 8.
    bias = torch.zeros(G, H, Mq, (Lc + 7) // 8 * 8, device=q.device, dtype=torch.bfloat16)[..., :Lc]
    bias.masked_fill_(~mask[:, None, None, :], torch.finfo(torch.bfloat16).min)
    out = xformers_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def synergy_case(shape, provider) -> Case:
    """The setup factory: inputs at ``shape`` and the provider's forward function."""
    G, Lc = shape["G"], shape["Lc"]
    torch.manual_seed(0)
    block = USEformerBlock(R, HEADS, FFN).to(DEVICE)
    params = [getattr(block, n).detach().clone().requires_grad_() for n in PARAM_NAMES]
    z = torch.randn(G, M, R, device=DEVICE, requires_grad=True)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    ctx = torch.randn(G, Lc, R, device=DEVICE, dtype=dtype).requires_grad_()
    mask = torch.ones(G, Lc, dtype=torch.bool, device=DEVICE)
    mask[:, 197:][:, 12::16] = False  # each prompt's padding tail

    def reference(z_, c_, *p):
        return synergy_reference(z_, c_, mask, dict(zip(PARAM_NAMES, p)), HEADS)

    def fused(z_, c_, *p):
        return SynergyFunction.apply(z_, c_, mask, HEADS, *p)

    def xformers(z_, c_, *p):
        return synergy_reference(z_, c_, mask, dict(zip(PARAM_NAMES, p)), HEADS, attention=_xformers_attention)

    if provider == "compiled":
        fn = _COMPILED.setdefault(shape["id"], provider_or_skip("compiled", reference, fused, xformers))
    else:
        fn = provider_or_skip(provider, reference, fused, xformers)
    flops = synergy_flops(G, Lc)
    inputs = [z, ctx, *params]
    return Case(fn, inputs, inputs, flops, shape["id"], notes={"dtype": str(dtype).replace("torch.", "")})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_synergy(benchmark, shape, provider, mode):
    benchmark.group = f"synergy {shape['id']} {mode}"
    info = measure(benchmark, synergy_case(shape, provider), op="synergy", mode=mode, provider=provider)
    assert info["flops"] > 0
