import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter (exact semantics,
# slow); it must be switched on before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# No network here: make hub look-ups fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import CLASSES  # noqa: E402
from nearl_model import class_prompts, tokenize_prompts  # noqa: E402


@pytest.fixture(scope="session")
def texts():
    return tokenize_prompts(class_prompts(CLASSES, "a chest X-ray showing {}."))


@pytest.fixture
def poison(monkeypatch):
    """Every kernel output buffer starts as NaN, so an unwritten element fails loudly."""
    from nearl_kernels import _dispatch

    monkeypatch.setattr(_dispatch, "POISON_OUTPUTS", True)
