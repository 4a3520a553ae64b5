"""NearlCLIP through the fused custom ops: same logits and gradients as the reference, compiles."""

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE, images_for, make_model, perturb_adapters

# On a GPU machine the fused model runs the Triton kernels natively; here, interpreted.
LABELS = torch.tensor([0, 2], device=DEVICE)


def _loss_and_grads(model, images, texts):
    loss, logits = model.loss(images, texts, LABELS)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.adapters.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["paired", "shared"])
def test_fused_matches_reference_logits_and_adapter_grads(mode, texts, poison):
    ref = perturb_adapters(make_model(mode, fused=False)).to(DEVICE)
    fused = perturb_adapters(make_model(mode, fused=True)).to(DEVICE)
    assert ref.state_dict().keys() == fused.state_dict().keys()
    images, texts = images_for(ref).to(DEVICE), texts.to(DEVICE)
    logits_ref, grads_ref = _loss_and_grads(ref, images, texts)
    logits, grads = _loss_and_grads(fused, images, texts)
    assert (logits - logits_ref).abs().max() <= 1e-4 * logits_ref.abs().max()
    assert grads.keys() == grads_ref.keys() and len(grads) == sum(1 for p in ref.adapters.parameters() if p.requires_grad)
    for name, g in grads.items():
        g_ref = grads_ref[name]
        assert (g - g_ref).abs().max() <= 1e-4 * g_ref.abs().max().clamp_min(1e-3), name


def test_fused_shared_text_once_matches_the_reference_model(texts, poison):
    # The exported shared package's split (the text group alone, then the images against its context)
    # through the kernels: a one-group USEformer and a K-prompt OCA group, against the joint reference.
    ref = perturb_adapters(make_model("shared", fused=False)).to(DEVICE)
    fused = perturb_adapters(make_model("shared", fused=True)).to(DEVICE)
    images, texts = images_for(ref).to(DEVICE), texts.to(DEVICE)
    with torch.no_grad():
        img_ref, txt_ref, _ = ref._features(images, texts)
        ctx, valid, txt_f = fused.shared_text(texts)
        img_f = fused.image_features(images, ctx, valid)
    assert (txt_f - txt_ref).abs().max() <= 1e-4 * txt_ref.abs().max()
    assert (img_f - img_ref).abs().max() <= 1e-4 * img_ref.abs().max()


def test_autocast_bf16_outputs_in_input_dtype(texts):
    model = perturb_adapters(make_model(fused=True)).to(DEVICE)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        logits = model(images_for(model).to(DEVICE), texts.to(DEVICE))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_torch_compile_fullgraph_forward_and_backward(texts, monkeypatch):
    # Inductor traces the custom ops through their fake implementations; at run
    # time they call Triton on CUDA and the reference maths on CPU (the
    # interpreter is off here: it would only make the compiled run slow).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = perturb_adapters(make_model(fused=True, backbone="nearl-tiny-2")).to(DEVICE)
    images, texts = images_for(model).to(DEVICE), texts.to(DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss = F.cross_entropy(compiled(images, texts), LABELS)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.adapters.named_parameters() if p.grad is not None}
    model.zero_grad()
    eager = F.cross_entropy(model(images, texts), LABELS)
    eager.backward()
    assert torch.allclose(loss, eager, atol=1e-5)
    for name, p in model.adapters.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, atol=1e-5, rtol=1e-4), name
