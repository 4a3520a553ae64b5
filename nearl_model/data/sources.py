"""Where labelled images come from: the demo, an ImageFolder or DICOM tree, a CSV, a MedMNIST ``.npz``,
and two named public sets: ``sklearn-digits`` (bundled with scikit-learn) and ``medmnist:NAME``.

Every source is checked whole before training starts: the layout (classes,
labels, counts), then every file decoded once, so bad data stops a run before
any checkpoint is written, never at test time.
"""

import csv
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._progress import track
from .demo import DEMO_CLASSES, synthetic_xrays
from .images import (DICOM_EXTENSIONS, IMAGE_EXTENSIONS, DataError, check_regular_file, file_digest, is_image_file,
                     read_image)
from .splits import SPLITS, DataSplits, LabeledImages, check_layout, fill_missing_splits

# MedMNIST .npz files carry no label names; the 2D single-label sets' names (the medmnist package's INFO) are
# filled in. ChestMNIST is multi-label and refused by the .npz loader.
MEDMNIST_LABELS = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte", "monocyte",
                   "neutrophil", "platelet"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"],
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
                  "cancer-associated stroma", "colorectal adenocarcinoma epithelium"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "organamnist": ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
                    "lung-left", "lung-right", "pancreas", "spleen"],
}
MEDMNIST_PREFIX = "medmnist:"
# Where the medmnist package downloads to (its DEFAULT_ROOT); MEDMNIST_ROOT overrides it.
MEDMNIST_ROOT_ENV = "MEDMNIST_ROOT"
MEDMNIST_RECORD = "https://zenodo.org/records/10519652"
DEMO_SIZES = {"train": 600, "val": 150, "test": 300}

# scikit-learn's load_digits: 1,797 8x8 handwritten digits, 0-16 grey levels, shipped inside the package.
DIGITS = "sklearn-digits"
DIGITS_DEFAULT = "0-4"
DIGITS_PER_CLASS = 100
DIGITS_SIZE = 32


def is_named_source(data: Optional[str]) -> bool:
    """Whether ``data`` names a built-in public set (``sklearn-digits[:DIGITS]``, ``medmnist:NAME``), not a path."""
    return bool(data) and (data == DIGITS or data.startswith((DIGITS + ":", MEDMNIST_PREFIX)))


def load_dataset(
    data: Optional[str], image_size: int, classes: Union[str, Sequence[str], None] = None, seed: int = 0,
    val_fraction: float = 0.15, test_fraction: float = 0.15,
) -> DataSplits:
    """Load ``data`` (None = the synthetic demo) into checked train/val/test splits.

    Args:
        data: None, a directory (ImageFolder tree, with or without train/val/test
            subfolders, or a DICOM tree), a ``.csv`` (path,label[,split]), a ``.npz``,
            ``sklearn-digits[:DIGITS]`` (see ``load_sklearn_digits``) or
            ``medmnist:NAME`` (see ``medmnist_path``).
        image_size: the backbone's input size.
        classes: the class names in label order, or a JSON list, JSON
            {label: name} or CSV (label,name) file of them. Named labels
            (folders, CSV) are put in this order; one not in it is an error.
        seed: the split seed for sources without their own splits.

    Raises:
        DataError: naming the file, line or value that is wrong.
    """
    if data is None:
        names = _read_class_names(classes) if isinstance(classes, str) else classes
        if names is not None and list(names) != DEMO_CLASSES:
            raise DataError(f"the synthetic demo has classes {DEMO_CLASSES}, not {list(names)}; pass the --data "
                            "these classes come from")
        splits = {}
        for i, (name, n) in enumerate(DEMO_SIZES.items()):
            images, labels = synthetic_xrays(n, seed=1000 * (i + 1))
            splits[name] = LabeledImages(images, labels, image_size)
        return DataSplits(list(DEMO_CLASSES), splits,
                          f"SYNTHETIC DEMO: {sum(DEMO_SIZES.values())} generated X-ray-like images, no real patients")
    if data.startswith(MEDMNIST_PREFIX):
        data = medmnist_path(data)
    if not is_named_source(data) and not os.path.exists(data):
        raise DataError(f"data path {data!r} does not exist")
    origins = None
    if is_named_source(data):
        out = load_sklearn_digits(data, image_size)
    elif data.lower().endswith(".npz"):
        out = _load_npz(data, image_size)
    elif data.lower().endswith(".csv"):
        out, origins = _load_csv(data, image_size)
    elif os.path.isdir(data):
        out, origins = _load_folder(data, image_size)
    else:
        raise DataError(f"data {data!r} must be a directory, a .csv or a .npz file")
    if classes:
        names = _read_class_names(classes) if isinstance(classes, str) else [str(c) for c in classes]
        if data.lower().endswith(".npz") or is_named_source(data):
            if len(names) < len(out.classes):
                raise DataError(f"{classes!r} names {len(names)} classes but the labels in {data!r} go up to "
                                f"{len(out.classes) - 1}")
            out.classes = names
        else:
            _remap(out, names, classes if isinstance(classes, str) else "the class list")
    if origins is not None:
        # After the cheap checks of the layout and the class names, before any split is carved.
        _identify(out, origins, repr(data))
    fill_missing_splits(out, seed, val_fraction, test_fraction)
    check_layout(out, repr(data))
    _decode_all(out)
    return out


def load_sklearn_digits(spec: str, image_size: int) -> DataSplits:
    """scikit-learn's bundled handwritten digits as an in-memory set: no download.

    ``sklearn-digits`` is digits 0-4; ``sklearn-digits:5-9``, ``:0-9`` or
    ``:1,3,7`` pick others. Each digit keeps its first 100 images in
    ``load_digits`` order (the set has 174-183 of each), upscaled from 8x8 to
    32x32 RGB (bilinear) with the 17 grey levels spread over 0-255: the set
    issue 19 measured. Class names are the digits; val and test are carved
    from them as for any source without splits.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    wanted = spec.partition(":")[2] or DIGITS_DEFAULT
    try:
        digits = []
        for part in wanted.split(","):
            lo, _, hi = part.strip().partition("-")
            digits += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        digits = []
    if not digits or len(set(digits)) != len(digits) or not all(0 <= d <= 9 for d in digits):
        raise DataError(f"--data {spec!r}: pick digits as {DIGITS}:0-4, {DIGITS}:5-9 or {DIGITS}:1,3,7 "
                        "(each of 0-9 at most once)")
    bunch = load_digits()
    items, labels = [], []
    for label, d in enumerate(digits):
        for pixels in bunch.images[bunch.target == d][:DIGITS_PER_CLASS]:
            grey = Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8))
            up = np.asarray(grey.resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR))
            items.append(np.repeat(up[:, :, None], 3, axis=2))
            labels.append(label)
    return DataSplits([str(d) for d in digits], {"train": LabeledImages(items, labels, image_size)},
                      f"scikit-learn digits {wanted} ({DIGITS_PER_CLASS} per digit, {DIGITS_SIZE}x{DIGITS_SIZE} RGB)")


def medmnist_path(spec: str) -> str:
    """``medmnist:NAME`` -> the MedMNIST ``.npz`` it names, which must already be on disk (nothing is downloaded).

    NAME is a MedMNIST flag (``pneumoniamnist``, ``BloodMNIST``, ``dermamnist_64`` for the 64-pixel
    release), looked up in ``$MEDMNIST_ROOT`` or ``~/.medmnist`` (where the medmnist package saves it),
    or a path to the ``.npz`` itself.

    Raises:
        DataError: one line saying how to fetch the file, or which ``.npz`` to pass instead.
    """
    name = spec[len(MEDMNIST_PREFIX):].strip()
    if name.lower().endswith(".npz"):
        if not os.path.exists(name):
            raise DataError(f"--data {spec!r}: {name!r} does not exist")
        return name
    flag = name.lower()
    base = flag.split("_")[0]
    if not base.endswith("mnist") or base.endswith("3d") or not base[:-5]:
        raise DataError(f"--data {spec!r}: name a 2D MedMNIST set, e.g. medmnist:pneumoniamnist, medmnist:bloodmnist "
                        "or medmnist:dermamnist_64, or give the .npz path")
    root = os.environ.get(MEDMNIST_ROOT_ENV) or os.path.join(os.path.expanduser("~"), ".medmnist")
    path = os.path.join(root, flag + ".npz")
    if not os.path.exists(path):
        size = flag.partition("_")[2]
        cls = next((k for k in _MEDMNIST_CLASSES if k.lower() == base), base)
        raise DataError(f"--data {spec!r}: {path} is not there and nearl downloads nothing; fetch it with "
                        f"`pip install medmnist && python -c \"import medmnist; medmnist.{cls}(split='test', "
                        f"download=True{', size=' + size if size else ''})\"` (or from {MEDMNIST_RECORD}), "
                        f"or pass the file: --data /path/to/{flag}.npz")
    return path


# The medmnist package's class names, for the fetch command in medmnist_path's error.
_MEDMNIST_CLASSES = ("PathMNIST", "DermaMNIST", "OCTMNIST", "PneumoniaMNIST", "RetinaMNIST", "BreastMNIST",
                     "BloodMNIST", "TissueMNIST", "OrganAMNIST", "OrganCMNIST", "OrganSMNIST")


def _identify(data: DataSplits, origins: Dict[str, List[str]], source: str) -> None:
    """Read every file once for its sha256, then refuse or drop duplicates, before any split is carved.

    Identity is the file's bytes, so the same file listed twice, reached by
    two paths (a link, ``./a`` and ``a``) or copied under another name is one
    image. Under two labels, or in two of the source's own splits, it is
    refused: either would put test images in training or teach the model
    both answers. Listed again with the same label in the same split, the
    repeat is dropped, with one warning line for them all.

    Args:
        data: the loaded splits, file paths as items; each split gets its ``digests``.
        origins: per split, where each item came from (``"line 7 ('x.png')"``), for messages.
        source: the data as the user named it, for messages.

    Raises:
        DataError: naming both places and the two labels or splits.
    """
    items = [item for split in data.splits.values() for item in split.items]
    real = {item: os.path.realpath(item) for item in items}
    unique = sorted(set(real.values()))
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    try:
        report = os.environ.get("RANK", "0") == "0"
        digests = dict(zip(unique, track(pool.map(file_digest, unique), "reading files", total=len(unique),
                                         enabled=report and len(unique) > 1000)))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    first: Dict[str, Tuple[str, int]] = {}
    repeats: Dict[str, set] = {name: set() for name in data.splits}
    example = None
    for name in [s for s in SPLITS if s in data.splits]:
        split = data.splits[name]
        split.digests = [digests[real[item]] for item in split.items]
        for i, digest in enumerate(split.digests):
            if digest not in first:
                first[digest] = (name, i)
                continue
            name0, i0 = first[digest]
            split0 = data.splits[name0]
            a, b = origins[name0][i0], origins[name][i]
            same = "the same file" if real[split0.items[i0]] == real[split.items[i]] else \
                "the same image (identical bytes)"
            if split0.labels[i0] != split.labels[i]:
                label_a, label_b = data.classes[split0.labels[i0]], data.classes[split.labels[i]]
                raise DataError(f"{source}: {a} and {b} are {same} under two labels, {label_a!r} and {label_b!r}; "
                                "an image has one label: remove one of them")
            if name0 != name:
                raise DataError(f"{source}: {a} in the {name0} split and {b} in the {name} split are {same}; an image "
                                "in two splits leaks into the scores: keep it in one")
            repeats[name].add(i)
            example = example or f"{b} repeats {a}"
    n = sum(len(r) for r in repeats.values())
    if not n:
        return
    for name, drop in repeats.items():
        if drop:
            keep = [i for i in range(len(data.splits[name])) if i not in drop]
            data.splits[name] = data.splits[name].subset(keep)
            origins[name] = [origins[name][i] for i in keep]
    if os.environ.get("RANK", "0") == "0":
        print(f"nearl: warning: {source}: dropped {n} duplicate(s), the same file or identical bytes listed again with "
              f"the same label, before splitting ({example})", flush=True)


def _decode_all(data: DataSplits) -> None:
    """Decode every file once, in parallel, so a truncated or non-finite image fails now."""
    items = [item for split in data.splits.values() for item in split.items]
    workers = min(8, os.cpu_count() or 1)
    # Only the first process of a torchrun job reports progress.
    report = os.environ.get("RANK", "0") == "0"
    pool = ThreadPoolExecutor(workers)
    try:
        for _ in track(pool.map(read_image, items), "checking images", total=len(items), enabled=report):
            pass
    finally:
        # On the first bad file (or Ctrl-C), drop the decodes still queued rather than wait for them all.
        pool.shutdown(wait=True, cancel_futures=True)


def _read_class_names(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            if path.lower().endswith(".json"):
                raw = json.load(f)
                names = raw if isinstance(raw, list) else [raw[str(i)] for i in range(len(raw))]
            else:
                rows = [r for r in csv.reader(f) if r]
                names = [name for _, name in sorted((int(r[0]), r[1]) for r in rows)]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise DataError(f"cannot read class names from {path!r}: {err}") from err
    if not names:
        raise DataError(f"{path!r} names no classes")
    names = [str(x) for x in names]
    if len(set(names)) != len(names):
        raise DataError(f"{path!r} names a class twice: {names}")
    return names


def _remap(data: DataSplits, names: List[str], source: str) -> None:
    """Put named labels (folders, CSV) in the order of a class-names file; unknown names are errors."""
    unknown = sorted(set(data.classes) - set(names))
    if unknown:
        raise DataError(f"classes {unknown} in the data are not in {source!r}, which lists {names}")
    new_index = [names.index(c) for c in data.classes]
    for split in data.splits.values():
        split.labels = [new_index[y] for y in split.labels]
    data.classes = list(names)


def _npz_labels(path: str, name: str, labels: np.ndarray, n_images: int) -> List[int]:
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{path!r}: {name}_labels is {labels.shape}, one column per finding (multi-label, as in "
                        "ChestMNIST); nearl trains single-label classification, so give one label per image")
    if labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] != 1):
        raise DataError(f"{path!r}: {name}_labels must be (N,) or (N, 1); got {labels.shape}")
    labels = labels.reshape(-1)
    if labels.dtype.kind not in "iub" and not (labels.dtype.kind == "f" and np.all(labels == np.round(labels))):
        raise DataError(f"{path!r}: {name}_labels must be whole numbers; got dtype {labels.dtype}")
    if len(labels) != n_images:
        raise DataError(f"{path!r}: {name}_images has {n_images} images but {name}_labels has {len(labels)} labels")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path!r}: {name}_labels has negative label {int(labels.min())}")
    return labels.astype(np.int64).tolist()


def _load_npz(path: str, image_size: int) -> DataSplits:
    try:
        arrays = np.load(path, allow_pickle=False)
        keys = set(arrays.files)
        splits = {}
        for name in SPLITS:
            has_images, has_labels = f"{name}_images" in keys, f"{name}_labels" in keys
            if has_images != has_labels:
                raise DataError(f"{path!r} has {name}_{'images' if has_images else 'labels'} but no "
                                f"{name}_{'labels' if has_images else 'images'}")
            if has_images:
                images = arrays[f"{name}_images"]
                if images.ndim not in (3, 4):
                    raise DataError(f"{path!r}: {name}_images must be (N, H, W) or (N, H, W, C); got {images.shape}")
                labels = _npz_labels(path, name, arrays[f"{name}_labels"], len(images))
                splits[name] = LabeledImages(list(images), labels, image_size)
        label_names = [str(x) for x in arrays["label_names"]] if "label_names" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as err:
        # numpy's text for an object array suggests allow_pickle, which would run code from the file.
        reason = "it holds pickled Python objects, which are never loaded" if "pickle" in str(err) else str(err)
        raise DataError(f"cannot read {path!r} as an .npz file of arrays: {reason}") from err
    if "train" not in splits:
        raise DataError(f"{path!r} has no train_images/train_labels arrays (MedMNIST layout); it has {sorted(keys)}")
    n_classes = max(max(s.labels, default=0) for s in splits.values()) + 1
    stem = os.path.basename(path).split(".")[0].split("_")[0].lower()
    classes = label_names or MEDMNIST_LABELS.get(stem, [f"class {i}" for i in range(n_classes)])
    return DataSplits(classes, splits, f"{os.path.basename(path)} (MedMNIST layout)")


def _hidden(name: str) -> bool:
    # Dot-folders (.ipynb_checkpoints, .DS_Store) and archive debris (__MACOSX) are never classes.
    return name.startswith((".", "__"))


def _scan(directory: str) -> Dict[str, List[str]]:
    """class folder -> sorted image/DICOM files under it (hidden folders and files skipped)."""
    classes = {}
    for entry in sorted(os.listdir(directory)):
        sub = os.path.join(directory, entry)
        if _hidden(entry) or not os.path.isdir(sub):
            continue
        try:
            entry.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"class folder {os.fsencode(sub)!r} has a name that is not valid UTF-8; rename it "
                            "(class names become prompts)") from None
        files = []
        for root, dirs, names in os.walk(sub):
            dirs[:] = sorted(d for d in dirs if not _hidden(d))
            files += [os.path.join(root, f) for f in names if is_image_file(f)]
        classes[entry] = sorted(files)
    return classes


def _load_folder(root: str, image_size: int) -> Tuple[DataSplits, Dict[str, List[str]]]:
    root = os.path.abspath(root)
    split_dirs = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
    trees = {s: _scan(os.path.join(root, s)) for s in split_dirs} if split_dirs else {"train": _scan(root)}
    classes = sorted(set().union(*(t.keys() for t in trees.values())))
    if not classes or not any(files for t in trees.values() for files in t.values()):
        raise DataError(f"no images found under {root!r}: expected class folders (root/<class>/*.png) "
                        f"with {', '.join(IMAGE_EXTENSIONS + DICOM_EXTENSIONS)} files")
    empty = [c for c in classes if not any(t.get(c) for t in trees.values())]
    if empty:
        raise DataError(f"class folders {empty} under {root!r} hold no images; remove them or add images")
    splits, origins = {}, {}
    for name, tree in trees.items():
        items, labels = [], []
        for label, cls in enumerate(classes):
            items += tree.get(cls, [])
            labels += [label] * len(tree.get(cls, []))
        for item in items:
            check_regular_file(item)
        splits[name] = LabeledImages(items, labels, image_size)
        origins[name] = [repr(os.path.relpath(item, root)) for item in items]
    return DataSplits(classes, splits, f"ImageFolder {root}"), origins


def _load_csv(path: str, image_size: int) -> Tuple[DataSplits, Dict[str, List[str]]]:
    base = os.path.dirname(os.path.abspath(path))
    try:
        # utf-8-sig: spreadsheets save CSVs with a byte-order mark before "path".
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = list(reader)
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"cannot read CSV {path!r}: {err}") from err
    if not {"path", "label"} <= set(header):
        raise DataError(f"CSV {path!r} needs a header with 'path' and 'label' columns (and optionally 'split'); "
                        f"it has {header}")
    if not rows:
        raise DataError(f"CSV {path!r} has a header but no rows")
    for line, r in enumerate(rows, start=2):
        for column in ("path", "label"):
            if not (r.get(column) or "").strip():
                raise DataError(f"{path!r} line {line}: no {column!r} value")
    classes = sorted({r["label"].strip() for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    by_split: Dict[str, tuple] = {}
    for line, r in enumerate(rows, start=2):
        split = (r.get("split") or "train").strip()
        if split not in SPLITS:
            raise DataError(f"{path!r} line {line}: unknown split {split!r}; use one of {SPLITS}")
        items, labels, origins = by_split.setdefault(split, ([], [], []))
        file = r["path"].strip()
        items.append(os.path.normpath(file if os.path.isabs(file) else os.path.join(base, file)))
        labels.append(index[r["label"].strip()])
        origins.append(f"line {line} ({file!r})")
    if "train" not in by_split:
        raise DataError(f"CSV {path!r} has no rows in the train split")
    checked = set()
    for line, r in enumerate(rows, start=2):
        file = r["path"].strip()
        if file not in checked:
            try:
                check_regular_file(file if os.path.isabs(file) else os.path.join(base, file))
            except DataError as err:
                raise DataError(f"{path!r} line {line}: {err}") from None
            checked.add(file)
    splits = {split: LabeledImages(items, labels, image_size) for split, (items, labels, _) in by_split.items()}
    return DataSplits(classes, splits, f"CSV {path}"), {split: v[2] for split, v in by_split.items()}
