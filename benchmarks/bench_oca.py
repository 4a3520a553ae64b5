"""OCA op: reference vs torch.compile vs fused Triton vs xformers attention, forward/backward/full."""

import pytest
import torch

from common import DEVICE, MODES, PROVIDERS, Case, measure, provider_or_skip, xformers_attention
from nearl_kernels.oca import OCAFunction, oca_reference
from nearl_kernels.oca.ops import resolve_dot_dtype
from nearl_kernels.roofline import HEADS, M, OCA_SHAPES, R, oca_flops

# The GPU rows are the roofline's shapes: the kernel headers' figures and the compile gate's waves
# are about these.
SHAPES = {
    "gpu": [dict(s) for s in OCA_SHAPES],
    "cpu": [dict(id="image-G4-L197-d768", G=4, L=197, d=768, T=1),
            dict(id="text-G16-L16-d512-T4", G=16, L=16, d=512, T=4)],
    "smoke": [dict(id="image-G2-L197-d768", G=2, L=197, d=768, T=1),
              dict(id="text-G4-L16-d512-T2", G=4, L=16, d=512, T=2)],
}
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
_COMPILED = {}


def _xformers_attention(q, k, v):
    """xformers' memory-efficient attention on the reference's (Gz, T, H, L, r_h) layout."""
    Gz, T, H, L, rh = q.shape
    qx = q.permute(0, 1, 3, 2, 4).reshape(Gz * T, L, H, rh)
    kx, vx = (t.expand(Gz, T, H, t.shape[3], rh).permute(0, 1, 3, 2, 4).reshape(Gz * T, -1, H, rh) for t in (k, v))
    return xformers_attention(qx, kx, vx).reshape(Gz, T, L, H, rh).permute(0, 1, 3, 2, 4)


def oca_case(shape, provider) -> Case:
    """The setup factory: inputs at ``shape`` and the provider's forward function."""
    G, L, d, T = shape["G"], shape["L"], shape["d"], shape["T"]
    g = torch.Generator().manual_seed(0)

    def rnd(*s, scale=1.0, dtype=torch.float32):
        return (torch.randn(*s, generator=g) * scale).to(DEVICE, dtype).requires_grad_()

    inputs = [rnd(G, L, d, dtype=DTYPE), rnd(G, L, R, dtype=DTYPE), rnd(G // T, M, R), rnd(R, R, scale=R**-0.5),
              rnd(R, R, scale=R**-0.5), rnd(R, d, scale=0.05), rnd(d, scale=0.05),
              torch.tensor(1.0, device=DEVICE, requires_grad=True), torch.tensor(0.0, device=DEVICE)]

    def reference(*a):
        return oca_reference(*a, HEADS, T, 1e-6)

    def fused(*a):
        return OCAFunction.apply(*a, HEADS, T, 1e-6, resolve_dot_dtype(a[0]))

    def xformers(*a):
        return oca_reference(*a, HEADS, T, 1e-6, attention=_xformers_attention)

    if provider == "compiled":
        fn = _COMPILED.setdefault(shape["id"], provider_or_skip("compiled", reference, fused, xformers))
    else:
        fn = provider_or_skip(provider, reference, fused, xformers)
    flops = oca_flops(G, L, d, T)
    return Case(fn, inputs, inputs[:8], flops, shape["id"], audit_tokens=G * L,
                notes={"dtype": str(DTYPE).replace("torch.", "")})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_oca(benchmark, shape, provider, mode):
    benchmark.group = f"oca {shape['id']} {mode}"
    info = measure(benchmark, oca_case(shape, provider), op="oca", mode=mode, provider=provider)
    assert info["flops"] > 0
