"""Loading data: every layout and file is checked before training, with errors that name what is wrong."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_dicom, write_image_folder
from nearl_model.data import DataError, load_dataset, preprocess, read_image


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "xrays", n_per_class=6)


def raises(match, data, **kwargs):
    with pytest.raises(DataError, match=match):
        load_dataset(str(data), 32, **kwargs)


def test_nan_pixel_in_a_float_tiff_is_refused_at_load(folder):
    pixels = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    pixels[3, 4] = np.nan
    Image.fromarray(pixels, mode="F").save(folder / "normal" / "float.tif")
    raises(r"float\.tif.*1 non-finite", folder)


def test_truncated_jpeg_is_refused_at_load(folder):
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG")
    # Headers intact, the last tenth of the scan gone: PIL's verify() accepts this file.
    (folder / "pneumonia" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 9 // 10])
    raises(r"cut\.jpg", folder)


def test_dicom_without_pixel_data_is_refused_at_load(folder, tmp_path):
    pydicom = pytest.importorskip("pydicom", reason="the dicom extra is not installed")
    write_dicom(folder / "normal" / "scan.dcm", np.zeros((8, 8)))
    ds = pydicom.dcmread(str(folder / "normal" / "scan.dcm"))
    del ds.PixelData
    ds.save_as(str(folder / "normal" / "report.dcm"), enforce_file_format=True)
    raises(r"report\.dcm.*no pixel data", folder)


def test_sixteen_bit_images_keep_their_range_and_match_their_8_bit_copies(tmp_path):
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    eight = (values // 257).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    Image.fromarray(values).save(tmp_path / "sixteen.png")
    big_endian = Image.frombytes("I;16B", (32, 32), values.astype(">u2").tobytes())
    big_endian.save(tmp_path / "big.tif")
    ref = preprocess(read_image(str(tmp_path / "eight.png")), 32)
    for name in ("sixteen.png", "big.tif"):
        pixels = read_image(str(tmp_path / name))
        assert pixels.dtype == np.uint16 and pixels.max() == 65535, name
        # The 8-bit copy rounds down by up to one level: 1/255 in [0, 1], 1/255/0.26 after normalising.
        assert (preprocess(pixels, 32) - ref).abs().max() <= 1 / 255 / 0.26 + 1e-6, name


def test_hidden_folders_are_skipped_and_empty_or_single_classes_refused(folder):
    for hidden in (".ipynb_checkpoints", "__MACOSX"):
        (folder / hidden).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / hidden / "x.png")
    assert load_dataset(str(folder), 32).classes == ["normal", "pneumonia"]
    (folder / "tumour").mkdir()
    raises(r"\['tumour'\].*hold no images", folder)
    os.rmdir(folder / "tumour")
    for f in (folder / "pneumonia").iterdir():
        f.unlink()
    (folder / "pneumonia").rmdir()
    raises("needs at least two", folder)


def test_class_folder_with_a_non_utf8_name_is_refused(folder):
    os.rename(folder / "pneumonia", os.path.join(os.fsencode(folder), b"caf\xe9"))
    raises("not valid UTF-8", folder)


def test_decompression_bomb_is_an_error_not_a_crash(folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    raises("too large to decode safely", folder)


def npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_layouts_are_checked(tmp_path):
    images = np.zeros((6, 8, 8), np.uint8)
    raises(r"multi-label", npz(tmp_path / "chestmnist.npz", train_images=images, train_labels=np.zeros((6, 14))))
    raises(r"train_images but no train_labels", npz(tmp_path / "a.npz", train_images=images))
    raises(r"6 images but train_labels has 5", npz(tmp_path / "b.npz", train_images=images,
                                                   train_labels=np.arange(5) % 2))
    raises(r"labels \[5\] outside 0\.\.1", npz(tmp_path / "c.npz", train_images=images,
                                               train_labels=np.array([0, 1, 0, 1, 0, 5]),
                                               label_names=np.array(["a", "b"])))
    raises(r"negative label", npz(tmp_path / "d.npz", train_images=images, train_labels=np.array([0, 1, 0, 1, 0, -1])))


def test_csv_with_byte_order_mark_loads_and_rows_without_labels_are_named(folder, tmp_path):
    files = sorted((folder / "normal").iterdir()) + sorted((folder / "pneumonia").iterdir())
    rows = "".join(f"{f},{f.parent.name}\n" for f in files)
    (tmp_path / "bom.csv").write_bytes(("\ufeffpath,label\n" + rows).encode("utf-8"))
    assert load_dataset(str(tmp_path / "bom.csv"), 32).classes == ["normal", "pneumonia"]
    (tmp_path / "gap.csv").write_text(f"path,label\n{files[0]},normal\n{files[1]}\n")
    raises(r"line 3: no 'label' value", tmp_path / "gap.csv")


def test_demo_refuses_other_classes():
    with pytest.raises(DataError, match="synthetic demo has classes"):
        load_dataset(None, 32, classes=["normal", "pneumonia"])


def test_fingerprint_follows_the_files_not_the_path(folder):
    before = load_dataset(str(folder), 32).fingerprint()
    assert load_dataset(str(folder), 32).fingerprint() == before
    first = sorted((folder / "normal").iterdir())[0]
    Image.fromarray(np.full((48, 48), 7, np.uint8)).save(first)
    os.utime(first, ns=(1, 1))
    assert load_dataset(str(folder), 32).fingerprint() != before


def test_in_memory_nan_images_are_refused_by_preprocess():
    with pytest.raises(DataError, match="non-finite"):
        preprocess(np.array([[0.0, np.inf]], np.float32), 8)
    assert torch.isfinite(preprocess(np.array([[0.0, 2.0]], np.float32), 8)).all()


def test_class_names_file_with_a_duplicate_is_refused(folder, tmp_path):
    names = tmp_path / "classes.json"
    names.write_text(json.dumps(["normal", "normal"]))
    raises("names a class twice", folder, classes=str(names))


def test_sklearn_digits_is_built_in_and_split_like_any_source():
    data = load_dataset("sklearn-digits", 32)
    assert data.classes == ["0", "1", "2", "3", "4"]
    # 100 per digit, carved 70 / 15 / 15 by the same stratified rule as an ImageFolder without splits.
    for split, n in (("train", 70), ("val", 15), ("test", 15)):
        assert np.bincount(data.splits[split].labels).tolist() == [n] * 5
    image = data.splits["train"].items[0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image.max() > 200
    assert data.splits["train"][0][0].shape == (3, 32, 32)
    assert load_dataset("sklearn-digits", 32).fingerprint() == data.fingerprint()
    other = load_dataset("sklearn-digits:5-9", 32)
    assert other.classes == ["5", "6", "7", "8", "9"] and other.fingerprint() != data.fingerprint()
    assert load_dataset("sklearn-digits:1,3,7", 32).classes == ["1", "3", "7"]
    for bad in ("sklearn-digits:x", "sklearn-digits:3,3", "sklearn-digits:8-12"):
        raises("pick digits as", bad)


def medmnist_npz(path, n=8):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 8).reshape(-1, 1)
    return npz(path, **arrays)


def test_medmnist_by_name_reads_the_downloaded_npz_and_names_its_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    medmnist_npz(tmp_path / "bloodmnist.npz")
    data = load_dataset("medmnist:BloodMNIST", 32)
    assert data.classes[:3] == ["basophil", "eosinophil", "erythroblast"] and len(data.classes) == 8
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 8, "val": 8, "test": 8}
    # A local file, by path, is the same data.
    assert load_dataset(f"medmnist:{tmp_path / 'bloodmnist.npz'}", 32).fingerprint() == data.fingerprint()


def test_medmnist_not_downloaded_fails_at_once_saying_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    with pytest.raises(DataError) as err:
        load_dataset("medmnist:pneumoniamnist", 32)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "pneumoniamnist.npz") in message and "medmnist.PneumoniaMNIST(split='test'" in message
    assert "--data /path/to/pneumoniamnist.npz" in message
    with pytest.raises(DataError, match=r"size=64.*dermamnist_64\.npz"):
        load_dataset("medmnist:dermamnist_64", 32)
    raises("name a 2D MedMNIST set", "medmnist:organmnist3d")
    raises("does not exist", f"medmnist:{tmp_path / 'missing.npz'}")


def test_a_named_source_is_recorded_as_typed_not_as_a_path(tmp_path, monkeypatch):
    from argparse import Namespace

    from nearl_model.train import run_record

    monkeypatch.chdir(tmp_path)
    data = load_dataset("sklearn-digits", 32)
    args = Namespace(model="nearl-tiny", pretrained=None, seed=0, data="sklearn-digits", shots=None, precision="fp32")
    assert run_record(args, data, data.fingerprint(), [])["data"] == "sklearn-digits"
    (tmp_path / "folder").mkdir()
    assert run_record(Namespace(**{**vars(args), "data": "folder"}), data, "", [])["data"] == os.path.realpath(tmp_path / "folder")
