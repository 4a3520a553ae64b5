"""Regional compilation (issue 17, part 4): each repeated region compiles once and matches eager.

The kernels run as the CPU's reference maths here (the custom ops are opaque
to the compiler either way); test_oca/test_synergy check the kernels.
"""

import json

import pytest
import torch
from torch._dynamo.utils import counters

from helpers import write_image_folder
from nearl_model import NearlCLIP, NearlConfig
from nearl_model.train import main

# Inductor reorders and fuses fp32 sums. A sum of n terms carries a relative
# error of at most n * u (u = 2**-24, fp32's unit roundoff), and each of the
# step's frozen blocks and interaction layers adds at most one such error.
U = 2.0**-24


@pytest.fixture(autouse=True)
def kernels_not_interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _tolerance(model: NearlCLIP, texts: torch.Tensor) -> float:
    image, text = model.image_tower, model.text_tower
    context = (image.image_size[0] // 16) ** 2 + 1 + texts.numel()
    longest = max(4 * image.width, 4 * text.width, context)  # the MLPs' hidden widths are 4x
    depth = image.n_blocks + text.n_blocks + model.n_layers
    return longest * U * depth


@pytest.mark.parametrize("mode", ["paired", "shared"])
def test_compiled_step_matches_eager_and_compiles_each_region_once(mode, texts):
    torch.manual_seed(0)
    eager = NearlCLIP.from_pretrained("nearl-tiny", config=NearlConfig(mode=mode))
    with torch.no_grad():
        for oca in (*eager.adapters.oca_image, *eager.adapters.oca_text):
            oca.w_up.normal_(0, 0.02)
    compiled = NearlCLIP.from_pretrained("nearl-tiny", config=NearlConfig(mode=mode))
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    compiled.compile_regions()
    images = torch.randn(2, 3, *eager.image_size, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1])
    texts = texts[:2]
    losses = []
    for model in (eager, compiled):
        loss, _ = model.loss(images, texts, labels)
        loss.backward()
        losses.append(loss.detach())
    tol = _tolerance(eager, texts)
    torch.testing.assert_close(losses[1], losses[0], rtol=tol, atol=0)
    for (name, p), q in zip(eager.adapters.named_parameters(), compiled.adapters.parameters()):
        if p.requires_grad:
            scale = p.grad.abs().max()
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=float(tol * scale), msg=name)
    # Reuse across layers: fewer graphs than the 4 + 4 blocks and 4 interaction layers compiled one by one.
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs < eager.image_tower.n_blocks + eager.text_tower.n_blocks + eager.n_layers


def test_train_cli_compile_trains_a_step_matching_eager(tmp_path):
    folder = write_image_folder(tmp_path / "xrays")
    args = ["--data", str(folder), "--batch-size", "8", "--max-steps", "1", "--epochs", "1", "--seed", "3", "--fused"]
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        assert main([*args, *extra, "--out", str(tmp_path / name)]) == 0
    first = [json.loads(open(tmp_path / name / "metrics.jsonl").readline()) for name in ("eager", "compiled")]
    # The first step's loss is the forward alone: the compiled one equals eager's within fp32 reordering.
    model = NearlCLIP.from_pretrained("nearl-tiny")
    # Two class prompts, each at most the text tower's context long.
    tol = _tolerance(model, torch.zeros(2, model.text_tower.context_length))
    assert abs(first[1]["train_loss"] - first[0]["train_loss"]) <= tol * abs(first[0]["train_loss"])
