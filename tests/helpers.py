"""Helpers shared by the tests (fixtures live in conftest.py)."""

import contextlib
import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image

from nearl_model import TINY_CLIP_CONFIG, NearlCLIP, NearlConfig
from nearl_model.data import synthetic_xrays

CLASSES = ["normal lungs", "bacterial pneumonia", "viral pneumonia"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_config(blocks: int) -> dict:
    """nearl-tiny with ``blocks`` blocks per tower: the same shapes, a smaller graph to compile."""
    config = copy.deepcopy(TINY_CLIP_CONFIG)
    config["vision_cfg"]["layers"] = config["text_cfg"]["layers"] = blocks
    return config


def make_model(mode="paired", fused=False, seed=0, backbone="nearl-tiny", **config):
    torch.manual_seed(seed)
    if backbone == "nearl-tiny-2":
        backbone = tiny_config(2)
    return NearlCLIP.from_pretrained(backbone, config=NearlConfig(mode=mode, **config), fused=fused)


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


def within_twice_torch_error(out, ref32, torch_out, dtype):
    """flash-attention's rule: kernel error <= 2 x PyTorch's own low-precision error, plus one
    dtype epsilon of the reference's largest element (max errors of small tensors are noisy)."""
    err = (out.float() - ref32).abs().max()
    torch_err = (torch_out.float() - ref32).abs().max()
    return bool(err <= 2 * torch_err + torch.finfo(dtype).eps * ref32.abs().max()), (err.item(), torch_err.item())


def rel_err(a, b):
    """Max error relative to the reference's largest element; a tensor whose true value is
    ~0 (e.g. q's gradients when a group has one context token) is measured against 0.1."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(0.1)).item()


def write_image_folder(root, n_per_class=16, classes=("normal", "pneumonia")):
    images, labels = synthetic_xrays(n_per_class * 3, seed=7, size=48)
    for i, (img, label) in enumerate(zip(images, labels)):
        if label < len(classes):
            os.makedirs(root / classes[label], exist_ok=True)
            Image.fromarray(img).save(root / classes[label] / f"{i:03d}.png")
    return root


def write_dicom(path, pixels):
    from pydicom.dataset import FileMetaDataset
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture(autouse=True)
def kernels_not_interpreted(monkeypatch):
    """For CLI tests (import it into the module): --fused on CPU takes the custom ops'
    reference maths; the kernels are tested elsewhere."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@contextlib.contextmanager
def reference_kernels():
    """``kernels_not_interpreted`` for module and session fixtures, which run before it: a training run
    there under the interpreter took ~50 s where the CPU maths take under one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield


def fails(argv, capsys, message, cli=None):
    """Run a CLI (train's by default) and check it refused with exit 2 and one ``error:`` line
    containing ``message``, and never advised loading a file unsafely."""
    if cli is None:
        from nearl_model.train import main as cli
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert "weights_only=False" not in err and "allow_pickle" not in err, err
    return err
