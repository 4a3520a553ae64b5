import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter (exact semantics,
# slow); it must be switched on before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# No network here: make hub look-ups fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nearl_model import NearlCLIP, NearlConfig, class_prompts, tokenize_prompts  # noqa: E402

CLASSES = ["normal lungs", "bacterial pneumonia", "viral pneumonia"]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def texts():
    return tokenize_prompts(class_prompts(CLASSES, "a chest X-ray showing {}."))


def make_model(mode="paired", fused=False, seed=0, **config):
    torch.manual_seed(seed)
    return NearlCLIP.from_pretrained("nearl-tiny", config=NearlConfig(mode=mode, **config), fused=fused)


def perturb_adapters(model, seed=1, scale=0.05):
    """Give the zero-initialised up-projections values so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for oca in (*model.adapters.oca_image, *model.adapters.oca_text):
            oca.w_up.copy_(torch.randn(oca.w_up.shape, generator=g) * scale)
            oca.b_up.copy_(torch.randn(oca.b_up.shape, generator=g) * scale)
    return model


def images_for(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.image_size, generator=g)
