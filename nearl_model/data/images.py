"""Decoding image and DICOM files to arrays, and the preprocessing every tower input goes through.

Scaling to [0, 1] follows the storage type, so a file and its 8-bit copy look
the same to the model: 8-bit by 255, 16-bit by 65535, and only float or
physical-unit data (float TIFF, DICOM after its rescale) by its own range.
"""

import hashlib
import os
import stat
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


# Images above this many pixels are refused from their header, before decoding: 40 Mpx is an 8000 x 5000
# scan, 120 MB as 8-bit RGB and 480 MB as the float array preprocessing makes. Pillow's own limit (179 Mpx,
# twice PIL.Image.MAX_IMAGE_PIXELS) lets a 490 KB PNG take gigabytes. NEARL_MAX_PIXELS changes it.
DEFAULT_MAX_PIXELS = 40_000_000
PIXEL_BUDGET_ENV = "NEARL_MAX_PIXELS"

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class DataError(ValueError):
    """Bad or missing data, with a message that names the file or value."""


def pixel_budget() -> int:
    """The most pixels (width x height x frames) an image may have: ``NEARL_MAX_PIXELS``, else 40,000,000."""
    raw = os.environ.get(PIXEL_BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(f"{PIXEL_BUDGET_ENV} must be a whole number of pixels >= 1; got {raw!r}")
    return value


def check_regular_file(path: str, what: str = "image file") -> None:
    """Refuse ``path`` unless it is a regular file (or a link to one), without opening it.

    A directory, a named pipe (which would block a reader forever) or a device
    is named as what it is.

    Raises:
        DataError: ``image file 'x.png' does not exist`` or ``... is a directory, not a file``.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{what} {path!r} does not exist") from None
    except OSError as err:
        raise DataError(f"cannot read {what} {path!r}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
        raise DataError(f"{what} {path!r} is {kind}, not a file; list image files only")


def file_digest(path: str) -> str:
    """The sha256 of a file's bytes: its identity, whatever path reaches it."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as err:
        raise DataError(f"cannot read image file {path!r}: {err.strerror or err}") from None
    return h.hexdigest()


def _check_pixels(path: str, shape: tuple) -> None:
    budget = pixel_budget()
    n = 1
    for side in shape:
        n *= int(side)
    if n > budget:
        size = " x ".join(str(int(v)) for v in shape)
        raise DataError(f"image {path!r} is {size} = {n:,} pixels, above the pixel budget of {budget:,}: too large "
                        f"to decode safely; downsample it, or raise {PIXEL_BUDGET_ENV} if you trust the file")


def read_image(item: Union[np.ndarray, str]) -> np.ndarray:
    """Decode an in-memory array, an image file or a DICOM file to (H, W) or (H, W, 3).

    The whole file is decoded (a truncated JPEG fails here, not mid-training),
    and float data must be finite.

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    if isinstance(item, np.ndarray):
        return _checked(item, "an in-memory image")
    check_regular_file(item)
    if item.lower().endswith(DICOM_EXTENSIONS):
        return _checked(_read_dicom(item), repr(item))
    try:
        with Image.open(item) as im:
            # The header gives the size: a decompression bomb is refused before a byte of it is decoded.
            _check_pixels(item, im.size)
            im.load()
            if im.mode not in _KEEP_MODES:
                im = im.convert("RGB")
            pixels = np.asarray(im)
    except DataError:
        raise
    except Image.DecompressionBombError as err:
        raise DataError(f"image {item!r} is too large to decode safely ({err}); downsample it first") from err
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
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        _check_pixels(path, (ds.Rows, ds.Columns) + ((frames,) if frames > 1 else ()))
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
