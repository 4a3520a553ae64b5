"""Labelled image sets for training and evaluation.

Sources (``load_dataset``): the embedded synthetic demo, an ImageFolder tree,
a CSV of ``path,label``, a MedMNIST ``.npz`` (e.g. pneumoniamnist.npz), or a
DICOM folder (``pip install -e ".[dicom]"``). Every source becomes a
``LabeledImages`` per split with the class names in label order. Files are
checked when the set is loaded, so a corrupt image stops the run before any
training (and before any checkpoint is written).
"""

import csv
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
SPLITS = ("train", "val", "test")
# MedMNIST .npz files carry no label names; the known ones are filled in.
MEDMNIST_LABELS = {"pneumoniamnist": ["normal", "pneumonia"]}


class DataError(ValueError):
    """Bad or missing data, with a message that names the file or value."""


@dataclass
class LabeledImages(torch.utils.data.Dataset):
    """Images (uint8 arrays in memory, or file paths) with integer labels."""

    items: List[Union[np.ndarray, str]]
    labels: List[int]
    image_size: int = 224
    mean: Sequence[float] = OPENAI_DATASET_MEAN
    std: Sequence[float] = OPENAI_DATASET_STD

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return preprocess(read_image(self.items[i]), self.image_size, self.mean, self.std), self.labels[i]

    def subset(self, indices: Sequence[int]) -> "LabeledImages":
        return LabeledImages([self.items[i] for i in indices], [self.labels[i] for i in indices],
                             self.image_size, self.mean, self.std)


@dataclass
class DataSplits:
    classes: List[str]
    splits: Dict[str, LabeledImages] = field(default_factory=dict)
    description: str = ""


def read_image(item: Union[np.ndarray, str]) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8/float array from an in-memory array, an image file or a DICOM file."""
    if isinstance(item, np.ndarray):
        return item
    if item.lower().endswith(DICOM_EXTENSIONS):
        return _read_dicom(item)
    try:
        with Image.open(item) as im:
            im = im.convert("RGB") if im.mode not in ("L", "I;16", "I", "F") else im
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot read image {item!r}: {err}") from err


def _read_dicom(path: str) -> np.ndarray:
    try:
        import pydicom
    except ImportError as err:
        raise DataError("reading DICOM needs pydicom: pip install -e \".[dicom]\"") from err
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as err:  # pydicom raises many types for damaged files
        raise DataError(f"cannot read DICOM file {path!r}: {err}") from err
    pixels = pixels * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return pixels


def preprocess(image: np.ndarray, size: int, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD) -> torch.Tensor:
    """Any grey or RGB array -> (3, size, size) float, scaled to [0, 1] and normalised as CLIP expects."""
    t = torch.from_numpy(np.array(image, dtype=np.float32))
    if image.dtype == np.uint8:
        t = t / 255.0
    else:
        lo, hi = t.min(), t.max()
        t = (t - lo) / (hi - lo).clamp_min(1e-6)
    if t.dim() == 2:
        t = t.unsqueeze(-1)
    if t.dim() != 3 or t.shape[-1] not in (1, 3, 4):
        raise DataError(f"images must be (H, W) grey or (H, W, 3) RGB; got shape {tuple(image.shape)}")
    t = t[..., :3].permute(2, 0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    t = F.interpolate(t.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


DEMO_CLASSES = ["normal lungs", "pneumonia", "pleural effusion"]


def synthetic_xrays(n: int, seed: int, size: int = 64) -> tuple:
    """Deterministic chest-X-ray-like images: two lung fields over a body silhouette.

    Class 1 ("pneumonia") adds a faint blurred consolidation somewhere in one
    lung; class 2 ("pleural effusion") fills the bottom of one lung up to a
    fluid level; class 0 ("normal lungs") has neither. Anatomy, exposure,
    noise and the finding's size, side and place vary per image, so the
    finding must be recognised, not memorised.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images, labels = [], []
    for i in range(n):
        label = i % len(DEMO_CLASSES)
        r = torch.rand(12, generator=g)
        body = torch.exp(-((xx / (0.85 + 0.1 * r[0])) ** 2 + (yy / 1.1) ** 2) ** 2) * (0.45 + 0.2 * r[8])
        img = body.clone()
        side = 1 if r[6] > 0.5 else -1
        for s in (-1, 1):
            cx, cy = s * (0.38 + 0.06 * r[1]), -0.05 + 0.1 * r[2]
            ax, ay = 0.26 + 0.04 * r[3], 0.55 + 0.08 * r[4]
            lung = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1
            if label == 2 and s == side:
                level = cy + ay * (0.25 + 0.35 * r[9])
                lung = lung & (yy < level - 0.05 * (xx - cx).abs() / ax)
            img = torch.where(lung, img * (0.3 + 0.1 * r[10]), img)
        ribs = 0.06 * torch.sin(yy * (18 + 4 * r[5]) + xx * 2).clamp_min(0)
        img = img + ribs * (img > 0.1)
        if label == 1:
            px, py = side * (0.3 + 0.15 * r[11]), -0.4 + 0.7 * r[7]
            width = 0.01 + 0.03 * r[9]
            img = img + (0.2 + 0.15 * r[10]) * torch.exp(-(((xx - px) ** 2 + (yy - py) ** 2) / width))
        img = img + 0.08 * torch.randn(size, size, generator=g)
        images.append((img.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
        labels.append(label)
    return images, labels


def load_dataset(
    data: Optional[str], image_size: int, classes: Union[str, Sequence[str], None] = None, seed: int = 0,
    val_fraction: float = 0.15, test_fraction: float = 0.15,
) -> DataSplits:
    """Load ``data`` (None = the synthetic demo) into train/val/test splits.

    Args:
        data: None, a directory (ImageFolder tree, with or without train/val/test
            subfolders, or a DICOM tree), a ``.csv`` (path,label[,split]) or a ``.npz``.
        image_size: the backbone's input size.
        classes: the class names in label order, or a JSON list, JSON
            {label: name} or CSV (label,name) file of them. Named labels
            (folders, CSV) are put in this order; one not in it is an error.
        seed: the split seed for sources without their own splits.
    """
    if data is None:
        sizes = {"train": 600, "val": 150, "test": 300}
        splits = {}
        for i, (name, n) in enumerate(sizes.items()):
            images, labels = synthetic_xrays(n, seed=1000 * (i + 1))
            splits[name] = LabeledImages(images, labels, image_size)
        return DataSplits(list(DEMO_CLASSES), splits,
                          f"SYNTHETIC DEMO: {sum(sizes.values())} generated X-ray-like images, no real patients")
    if not os.path.exists(data):
        raise DataError(f"data path {data!r} does not exist")
    if data.lower().endswith(".npz"):
        out = _load_npz(data, image_size)
    elif data.lower().endswith(".csv"):
        out = _load_csv(data, image_size)
    elif os.path.isdir(data):
        out = _load_folder(data, image_size)
    else:
        raise DataError(f"data {data!r} must be a directory, a .csv or a .npz file")
    if classes:
        names = _read_class_names(classes) if isinstance(classes, str) else list(classes)
        if data.lower().endswith(".npz"):
            if len(names) < len(out.classes):
                raise DataError(f"{classes!r} names {len(names)} classes but the labels in {data!r} go up to {len(out.classes) - 1}")
            out.classes = names
        else:
            _remap(out, names, classes if isinstance(classes, str) else "the class list")
    _fill_missing_splits(out, seed, val_fraction, test_fraction)
    for name, split in out.splits.items():
        if len(split) == 0:
            raise DataError(f"the {name} split of {data!r} is empty")
    return out


def _read_class_names(path: str) -> List[str]:
    try:
        with open(path) as f:
            if path.lower().endswith(".json"):
                raw = json.load(f)
                names = raw if isinstance(raw, list) else [raw[str(i)] for i in range(len(raw))]
            else:
                rows = [r for r in csv.reader(f) if r]
                names = [name for _, name in sorted((int(r[0]), r[1]) for r in rows)]
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise DataError(f"cannot read class names from {path!r}: {err}") from err
    if not names:
        raise DataError(f"{path!r} names no classes")
    return [str(x) for x in names]


def _remap(data: DataSplits, names: List[str], source: str) -> None:
    """Put named labels (folders, CSV) in the order of a class-names file; unknown names are errors."""
    unknown = sorted(set(data.classes) - set(names))
    if unknown:
        raise DataError(f"classes {unknown} in the data are not in {source!r}, which lists {names}")
    new_index = [names.index(c) for c in data.classes]
    for split in data.splits.values():
        split.labels = [new_index[y] for y in split.labels]
    data.classes = list(names)


def _load_npz(path: str, image_size: int) -> DataSplits:
    try:
        arrays = np.load(path, allow_pickle=False)
        keys = set(arrays.files)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path!r} as an .npz file: {err}") from err
    splits = {}
    for name in SPLITS:
        if f"{name}_images" in keys:
            images = arrays[f"{name}_images"]
            labels = arrays[f"{name}_labels"].reshape(-1).astype(int).tolist()
            splits[name] = LabeledImages(list(images), labels, image_size)
    if "train" not in splits:
        raise DataError(f"{path!r} has no train_images/train_labels arrays (MedMNIST layout); it has {sorted(keys)}")
    n_classes = max(max(s.labels) for s in splits.values()) + 1
    stem = os.path.basename(path).split(".")[0].split("_")[0].lower()
    if "label_names" in keys:
        classes = [str(x) for x in arrays["label_names"]]
    else:
        classes = MEDMNIST_LABELS.get(stem, [f"class {i}" for i in range(n_classes)])
    return DataSplits(classes, splits, f"{os.path.basename(path)} (MedMNIST layout)")


def _scan(directory: str) -> Dict[str, List[str]]:
    """class folder -> sorted image/DICOM files under it."""
    classes = {}
    for entry in sorted(os.listdir(directory)):
        sub = os.path.join(directory, entry)
        if os.path.isdir(sub):
            files = sorted(
                os.path.join(root, f) for root, _, fs in os.walk(sub) for f in fs
                if f.lower().endswith(IMAGE_EXTENSIONS + DICOM_EXTENSIONS)
            )
            classes[entry] = files
    return classes


def _load_folder(root: str, image_size: int) -> DataSplits:
    split_dirs = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
    trees = {s: _scan(os.path.join(root, s)) for s in split_dirs} if split_dirs else {"train": _scan(root)}
    classes = sorted(set().union(*(t.keys() for t in trees.values())))
    if not classes or not any(files for t in trees.values() for files in t.values()):
        raise DataError(f"no images found under {root!r}: expected class folders (root/<class>/*.png) "
                        f"with {', '.join(IMAGE_EXTENSIONS + DICOM_EXTENSIONS)} files")
    splits = {}
    for name, tree in trees.items():
        items, labels = [], []
        for label, cls in enumerate(classes):
            items += tree.get(cls, [])
            labels += [label] * len(tree.get(cls, []))
        _verify_files(items)
        splits[name] = LabeledImages(items, labels, image_size)
    return DataSplits(classes, splits, f"ImageFolder {root}")


def _load_csv(path: str, image_size: int) -> DataSplits:
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"cannot read CSV {path!r}: {err}") from err
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DataError(f"CSV {path!r} needs a header with 'path' and 'label' columns (and optionally 'split')")
    classes = sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    by_split: Dict[str, tuple] = {}
    for line, r in enumerate(rows, start=2):
        split = (r.get("split") or "train").strip()
        if split not in SPLITS:
            raise DataError(f"{path!r} line {line}: unknown split {split!r}; use one of {SPLITS}")
        items, labels = by_split.setdefault(split, ([], []))
        items.append(r["path"] if os.path.isabs(r["path"]) else os.path.join(base, r["path"]))
        labels.append(index[r["label"]])
    splits = {}
    for split, (items, labels) in by_split.items():
        _verify_files(items)
        splits[split] = LabeledImages(items, labels, image_size)
    return DataSplits(classes, splits, f"CSV {path}")


def _verify_files(paths: Sequence[str]) -> None:
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"image file {p!r} does not exist")
        if p.lower().endswith(DICOM_EXTENSIONS):
            continue
        try:
            with Image.open(p) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DataError(f"corrupt or unreadable image {p!r}: {err}") from err


def _fill_missing_splits(data: DataSplits, seed: int, val_fraction: float, test_fraction: float) -> None:
    """Carve val/test out of train (stratified, seeded) where the source has none."""
    train = data.splits["train"]
    missing = [s for s in ("val", "test") if s not in data.splits]
    if not missing:
        return
    g = torch.Generator().manual_seed(seed)
    keep, carved = [], {s: [] for s in missing}
    labels = np.asarray(train.labels)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)[torch.randperm(int((labels == label).sum()), generator=g).numpy()]
        start = 0
        for s, frac in (("val", val_fraction), ("test", test_fraction)):
            if s in carved:
                n = max(1, math.floor(len(idx) * frac)) if len(idx) > 2 else 0
                carved[s] += idx[start : start + n].tolist()
                start += n
        keep += idx[start:].tolist()
    data.splits["train"] = train.subset(sorted(keep))
    for s in missing:
        data.splits[s] = train.subset(sorted(carved[s]))


def few_shot(dataset: LabeledImages, shots: int, seed: int) -> LabeledImages:
    """``shots`` examples per class, sampled reproducibly from ``seed``."""
    if shots < 1:
        raise DataError(f"--shots must be >= 1; got {shots}")
    g = torch.Generator().manual_seed(seed)
    labels = np.asarray(dataset.labels)
    chosen = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        chosen += idx[torch.randperm(len(idx), generator=g)[:shots].numpy()].tolist()
    return dataset.subset(sorted(chosen))
