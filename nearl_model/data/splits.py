"""Labelled image sets, their train/val/test splits, and few-shot sampling."""

import hashlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from .images import DataError, file_digest, preprocess, read_image

SPLITS = ("train", "val", "test")


@dataclass
class LabeledImages(torch.utils.data.Dataset):
    """Images (uint8 arrays in memory, or file paths) with integer labels.

    ``digests`` holds the sha256 of each file's bytes when the loader has
    read them (None otherwise): the data's identity, whatever its paths.
    """

    items: List[Union[np.ndarray, str]]
    labels: List[int]
    image_size: int = 224
    mean: Sequence[float] = OPENAI_DATASET_MEAN
    std: Sequence[float] = OPENAI_DATASET_STD
    digests: Optional[List[str]] = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return preprocess(read_image(self.items[i]), self.image_size, self.mean, self.std), self.labels[i]

    def subset(self, indices: Sequence[int]) -> "LabeledImages":
        digests = None if self.digests is None else [self.digests[i] for i in indices]
        return LabeledImages([self.items[i] for i in indices], [self.labels[i] for i in indices],
                             self.image_size, self.mean, self.std, digests)


@dataclass
class DataSplits:
    classes: List[str]
    splits: Dict[str, LabeledImages] = field(default_factory=dict)
    description: str = ""

    def fingerprint(self) -> str:
        """A digest of the classes and of every split's contents (file bytes or pixels) and labels.

        It names contents, not paths: ``./d`` and ``d``, another working
        directory, or the folder moved whole give the same fingerprint, while
        an edited, added or re-split image changes it. A resumed run and
        ``evaluate`` compare it with the run's.
        """
        h = hashlib.sha256(repr(self.classes).encode())
        for name in sorted(self.splits):
            split = self.splits[name]
            h.update(f"|{name}|{split.labels}".encode())
            digests = split.digests or [None] * len(split.items)
            for item, digest in zip(split.items, digests):
                if isinstance(item, np.ndarray):
                    h.update(np.ascontiguousarray(item).tobytes())
                else:
                    h.update((digest or file_digest(item)).encode())
        return h.hexdigest()


def fill_missing_splits(data: DataSplits, seed: int, val_fraction: float = 0.15, test_fraction: float = 0.15) -> None:
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


def check_layout(data: DataSplits, source: str) -> None:
    """At least two classes, every class with training images, every split non-empty, labels in range."""
    k = len(data.classes)
    if k < 2:
        raise DataError(f"{source} has {k} class(es) {data.classes}; classification needs at least two")
    for name, split in data.splits.items():
        bad = [y for y in split.labels if not 0 <= y < k]
        if bad:
            raise DataError(f"the {name} split of {source} has labels {sorted(set(bad))[:5]} outside 0..{k - 1}")
        if len(split) == 0:
            raise DataError(f"the {name} split of {source} is empty")
    counts = np.bincount(np.asarray(data.splits["train"].labels, dtype=np.int64), minlength=k)
    empty = [data.classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"classes {empty} of {source} have no training images; add images or remove the class")


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
