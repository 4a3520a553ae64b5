"""Decoding image and DICOM files to arrays, and the preprocessing every tower input goes through.

Scaling to [0, 1] follows the storage type, so a file and its 8-bit copy look
the same to the model: 8-bit by 255, 16-bit by 65535, and only float or
physical-unit data (float TIFF, DICOM after its rescale) by its own range.
"""

import os
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
# PIL's 16-bit modes, in either byte order; np.asarray keeps that order, so the
# values are converted to native uint16 (converting to "RGB" would clip at 255).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_KEEP_MODES = ("L", "RGB", "I", "F") + _SIXTEEN_BIT_MODES
_FULL_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


class DataError(ValueError):
    """Bad or missing data, with a message that names the file or value."""


def read_image(item: Union[np.ndarray, str]) -> np.ndarray:
    """Decode an in-memory array, an image file or a DICOM file to (H, W) or (H, W, 3).

    The whole file is decoded (a truncated JPEG fails here, not mid-training),
    and float data must be finite.

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    if isinstance(item, np.ndarray):
        return _checked(item, "an in-memory image")
    if item.lower().endswith(DICOM_EXTENSIONS):
        return _checked(_read_dicom(item), repr(item))
    try:
        with Image.open(item) as im:
            im.load()
            if im.mode not in _KEEP_MODES:
                im = im.convert("RGB")
            pixels = np.asarray(im)
    except Image.DecompressionBombError as err:
        raise DataError(f"image {item!r} is too large to decode safely ({err}); if you trust the file, raise "
                        "PIL.Image.MAX_IMAGE_PIXELS or downsample it first") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read image {item!r}: {err}") from err
    if im.mode in _SIXTEEN_BIT_MODES:
        pixels = pixels.astype(np.uint16)
    return _checked(pixels, repr(item))


def _checked(pixels: np.ndarray, what: str) -> np.ndarray:
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (1, 3, 4)) or pixels.size == 0:
        raise DataError(f"{what} must be (H, W) grey or (H, W, 3) RGB; got shape {tuple(pixels.shape)}")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        bad = int((~np.isfinite(pixels)).sum())
        raise DataError(f"{what} has {bad} non-finite pixel value(s) (NaN or inf); fix or remove the file")
    return pixels


def _read_dicom(path: str) -> np.ndarray:
    try:
        import pydicom
    except ImportError as err:
        raise DataError("reading DICOM needs pydicom: pip install -e \".[dicom]\"") from err
    try:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            raise DataError(f"DICOM file {path!r} has no pixel data (a report or structured-report object?)")
        pixels = ds.pixel_array.astype(np.float32)
        slope, intercept = float(getattr(ds, "RescaleSlope", 1)), float(getattr(ds, "RescaleIntercept", 0))
    except DataError:
        raise
    except Exception as err:  # pydicom raises many types for damaged files
        raise DataError(f"cannot read DICOM file {path!r}: {err}") from err
    pixels = pixels * slope + intercept
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return pixels


def preprocess(image: np.ndarray, size: int, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD) -> torch.Tensor:
    """Any grey or RGB array -> (3, size, size) float, scaled to [0, 1] and normalised as CLIP expects.

    Args:
        image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); uint8 and uint16 are
            scaled by their full range, anything else by its own min and max.
        size: the backbone's input size.

    Returns:
        the (3, size, size) float32 tensor.
    """
    image = _checked(np.asarray(image), "an image")
    t = torch.from_numpy(np.array(image, dtype=np.float32))
    full_scale = _FULL_SCALE.get(image.dtype)
    if full_scale is not None:
        t = t / full_scale
    else:
        lo, hi = t.min(), t.max()
        t = (t - lo) / (hi - lo).clamp_min(1e-6)
    if t.dim() == 2:
        t = t.unsqueeze(-1)
    t = t[..., :3].permute(2, 0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    t = F.interpolate(t.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS + DICOM_EXTENSIONS) and not os.path.basename(name).startswith(".")
