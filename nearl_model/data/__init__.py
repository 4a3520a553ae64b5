"""Labelled image sets for training and evaluation.

``images``: decoding files and preprocessing; ``sources``: the demo, ImageFolder,
CSV, MedMNIST ``.npz``, DICOM, ``sklearn-digits`` and ``medmnist:NAME`` sources behind ``load_dataset``; ``splits``:
the datasets, their splits and few-shot sampling; ``demo``: the synthetic set.
"""

from .demo import DEMO_CLASSES, synthetic_xrays
from .images import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, DataError, preprocess, read_image
from .sources import is_named_source, load_dataset
from .splits import DataSplits, LabeledImages, few_shot

__all__ = [
    "DEMO_CLASSES", "DICOM_EXTENSIONS", "IMAGE_EXTENSIONS", "DataError", "DataSplits", "LabeledImages",
    "few_shot", "is_named_source", "load_dataset", "preprocess", "read_image", "synthetic_xrays",
]
