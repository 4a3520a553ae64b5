"""Issue 20, round two of hostile use: every input checked before anything is built, splits that cannot
leak, and paths that mean files, not strings."""

import contextlib
import copy
import csv
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import fails, kernels_not_interpreted, reference_kernels, write_dicom, write_image_folder  # noqa: F401 (autouse fixture)
from nearl_model import TINY_CLIP_CONFIG, NearlCLIP, NearlConfig, class_prompts, create_clip, evaluate, predict
from nearl_model.backbones import load_pretrained_file
from nearl_model.data import DataError, load_dataset, read_image
from nearl_model.train import main

FAST = ["--batch-size", "4", "--lr", "5e-3", "--seed", "3", "--epochs", "1", "--max-steps", "1"]
RUN_FILES = ("adapter.safetensors", "checkpoint.pt", "metrics.jsonl", "summary.json", "curves.png", "confusion.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "d_ok", n_per_class=6)


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """A finished run, to copy where a refusal must leave a run byte-identical."""
    out = tmp_path_factory.mktemp("runs") / "base"
    with reference_kernels():
        assert main(["--data", str(folder), "--out", str(out), *FAST]) == 0
    return out


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in os.listdir(folder) if name in RUN_FILES}


def model_json(tmp_path, name="model.json", **changes):
    """nearl-tiny as a JSON file, with ``changes`` as {"vision_cfg.layers": 0, ...}."""
    cfg = copy.deepcopy(TINY_CLIP_CONFIG)
    for key, value in changes.items():
        tower, _, field = key.replace("__", ".").rpartition(".")
        (cfg[tower] if tower else cfg)[field] = value
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


def write_csv(path, rows, header=("path", "label")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@contextlib.contextmanager
def no_hang(seconds=20):
    """A hang (a reader opening a FIFO) fails the test instead of stalling the suite."""
    def fail(*_):
        raise AssertionError(f"still running after {seconds}s: something opened a FIFO for reading")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# Prompt templates (failure 11) and prompts that collide (failure 6)

@pytest.mark.parametrize("template, field", [
    ("a {} with {x}", "{x}"), ("{} {:>5}", "{:>5}"), ("{0}", "{0}"), ("{!r} lungs", "{!r}"),
])
def test_a_template_with_other_fields_is_refused_before_the_out_is_touched(template, field, tmp_path, capsys):
    out = tmp_path / "o"
    err = fails(["--prompt", template, "--out", str(out), *FAST], capsys, "--prompt")
    assert field in err and "exactly one bare '{}'" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="exactly one bare"):
        class_prompts(["a", "b"], template)


@pytest.mark.parametrize("template", ["no field", "{} and {}", "a { b {}"])
def test_a_template_needs_exactly_one_field(template, tmp_path, capsys):
    fails(["--prompt", template, "--out", str(tmp_path / "o"), *FAST], capsys, "--prompt")


def test_literal_braces_are_allowed_in_a_template():
    assert class_prompts(["x", "y"], "{{scan}} of {}") == ["{scan} of x", "{scan} of y"]


def test_compare_refuses_a_template_with_other_fields(tmp_path, capsys):
    from nearl_model import compare

    fails(["--prompt", "a {} with {x}", "--methods", "zeroshot", "--out", str(tmp_path / "o")], capsys,
          "{x}", cli=compare.main)


def test_class_folders_whose_prompts_collide_are_refused_with_both_names(tmp_path, capsys):
    data = write_image_folder(tmp_path / "d", n_per_class=4, classes=("normal_lungs", "normal lungs"))
    err = fails(["--data", str(data), "--out", str(tmp_path / "o"), *FAST], capsys, "get the same prompt")
    assert "'normal_lungs'" in err and "'normal lungs'" in err
    with pytest.raises(ValueError, match="'Pneumonia' and 'pneumonia'"):
        class_prompts(["Pneumonia", "pneumonia"])


# The fused kernels' envelope (failure 10)

def test_a_config_outside_the_fused_envelope_is_refused_and_the_old_run_is_kept(folder, finished, tmp_path, capsys):
    out = tmp_path / "o"
    shutil.copytree(finished, out)
    before = snapshot(out)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"r": 64}))
    err = fails(["--data", str(folder), "--config", str(cfg), "--out", str(out), "--overwrite", *FAST], capsys,
                "r = 64 is above 32")
    assert str(cfg) in err and "--no-fused" in err
    assert snapshot(out) == before
    cfg.write_text(json.dumps({"r": 32, "n_queries": 64}))
    fails(["--data", str(folder), "--config", str(cfg), "--out", str(tmp_path / "o2"), *FAST], capsys,
          "n_queries = 64 is above 32")


def test_nearlclip_checks_the_envelope_only_when_fused():
    torch.manual_seed(0)
    clip = create_clip("nearl-tiny")
    with pytest.raises(ValueError, match="r = 64 is above 32"):
        NearlCLIP(clip, NearlConfig(r=64, n_heads=2), fused=True)
    assert NearlCLIP(clip, NearlConfig(r=64, n_heads=2), fused=False).config.r == 64


# Model JSON fields and size (failures 7, 12, 17)

@pytest.mark.parametrize("changes, field, bound", [
    ({"vision_cfg.layers": 0}, "vision_cfg.layers = 0", "1..256"),
    ({"text_cfg.layers": -1}, "text_cfg.layers = -1", "1..256"),
    ({"vision_cfg.layers": 10 ** 4}, "vision_cfg.layers = 10000", "1..256"),
    ({"vision_cfg.width": 10 ** 6}, "vision_cfg.width = 1000000", "1..16384"),
    ({"vision_cfg.width": -5}, "vision_cfg.width = -5", "1..16384"),
    ({"vision_cfg.patch_size": 128}, "vision_cfg.patch_size = 128", "at most vision_cfg.image_size = 64"),
    ({"text_cfg.vocab_size": 1000}, "text_cfg.vocab_size = 1000", "49408"),
    ({"text_cfg.heads": 3}, "text_cfg.width = 64 must be a multiple of text_cfg.heads = 3", ""),
    ({"vision_cfg.head_width": 40}, "vision_cfg.width = 96 must be a multiple", ""),
    ({"embed_dim": 0.5}, "embed_dim = 0.5", "1..16384"),
])
def test_model_json_fields_are_checked_before_building(changes, field, bound, tmp_path, capsys, monkeypatch):
    path = model_json(tmp_path, **changes)
    # Nothing may be built: a tower constructed at all is a failure of the check.
    monkeypatch.setattr("open_clip.CLIP.__init__", lambda *a, **k: pytest.fail("the model was built"))
    err = fails(["--model", str(path), "--out", str(tmp_path / "o"), *FAST], capsys, field)
    assert repr(str(path)) in err and bound in err


def test_a_model_too_big_for_this_machine_is_refused_from_its_estimate(tmp_path, capsys, monkeypatch):
    path = model_json(tmp_path, **{"vision_cfg.width": 16384, "vision_cfg.head_width": 64,
                                   "vision_cfg.layers": 256})
    monkeypatch.setattr("open_clip.CLIP.__init__", lambda *a, **k: pytest.fail("the model was built"))
    err = fails(["--model", str(path), "--out", str(tmp_path / "o"), *FAST], capsys, "parameters")
    assert "GiB" in err and "smaller model" in err


def test_activation_memory_at_the_batch_size_is_estimated_before_building(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("open_clip.CLIP.__init__", lambda *a, **k: pytest.fail("the model was built"))
    err = fails(["--batch-size", str(10 ** 7), "--out", str(tmp_path / "o"), "--epochs", "1"], capsys,
                "activations at --batch-size 10000000")
    assert "'nearl-tiny'" in err


def test_a_vocabulary_smaller_than_a_hf_tokenizers_ids_is_refused(tmp_path):
    from nearl_model.backbones import get_tokenizer, write_wordpiece_vocab

    vocab = write_wordpiece_vocab(tmp_path / "wp")
    cfg = copy.deepcopy(TINY_CLIP_CONFIG)
    cfg["text_cfg"].update(vocab_size=50, hf_tokenizer_name=str(vocab))
    with pytest.raises(ValueError, match=r"text_cfg.vocab_size = 50 is below the \d+ ids"):
        get_tokenizer(cfg)


# Weights files that must never be unpickled, and never with advice to (failures 13, 18)

def test_npz_weights_on_a_model_that_is_not_siglip_is_one_line(tmp_path, capsys):
    weights = tmp_path / "w.npz"
    np.savez(weights, a=np.zeros(3))
    err = fails(["--pretrained", str(weights), "--out", str(tmp_path / "o"), *FAST], capsys, "not a timm SigLIP")
    assert str(weights) in err


def test_a_garbage_npz_is_refused_without_advice_to_load_it_unsafely(tmp_path):
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"\x80\x04garbage" * 50)
    # A stand-in with a timm trunk (a SigLIP image tower), so the file reaches open_clip's .npz reader.
    clip = torch.nn.Module()
    clip.visual = torch.nn.Module()
    clip.visual.trunk = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError) as info:
        load_pretrained_file(clip, str(weights))
    assert "never loaded" in str(info.value) and "allow_pickle" not in str(info.value)


def test_an_npz_data_file_with_pickled_objects_is_refused_without_that_advice(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, train_images=np.array([{"x": 1}] * 4, dtype=object), train_labels=np.zeros(4))
    with pytest.raises(DataError) as info:
        load_dataset(str(path), 32)
    assert "pickled Python objects, which are never loaded" in str(info.value)
    assert "allow_pickle" not in str(info.value)


class Payload:
    pass


def test_resume_from_a_checkpoint_holding_objects_names_no_unsafe_loading(folder, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["--data", str(folder), "--out", str(out), *FAST]
    assert main(argv) == 0
    torch.save({"key": Payload()}, out / "checkpoint.pt")
    err = fails([*argv, "--resume"], capsys, "is unreadable")
    assert "pickled Python objects other than tensors, which are never loaded" in err and "weights_only" not in err


# Images: the pixel budget (failure 8) and files that are not regular files (failure 16)

def test_an_image_over_the_default_pixel_budget_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    # 7000 x 6000 = 42 Mpx of zeros: a small file, above the default 40 Mpx budget, far under Pillow's 179 Mpx.
    Image.fromarray(np.zeros((6000, 7000), np.uint8)).save(path)
    assert path.stat().st_size < 1 << 20
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", lambda self: pytest.fail("the image was decoded"))
    with pytest.raises(DataError, match=r"7000 x 6000 = 42,000,000 pixels, above the pixel budget of 40,000,000"):
        read_image(str(path))


def test_the_pixel_budget_is_configurable_and_checked(folder, monkeypatch):
    monkeypatch.setenv("NEARL_MAX_PIXELS", "1000")
    with pytest.raises(DataError, match="48 x 48 = 2,304 pixels.*NEARL_MAX_PIXELS"):
        load_dataset(str(folder), 32)
    monkeypatch.setenv("NEARL_MAX_PIXELS", "lots")
    with pytest.raises(DataError, match="NEARL_MAX_PIXELS must be a whole number"):
        read_image(str(folder / "normal" / os.listdir(folder / "normal")[0]))


def test_a_dicom_over_the_pixel_budget_is_refused_before_its_pixels_are_decoded(tmp_path, monkeypatch):
    pytest.importorskip("pydicom", reason="the dicom extra is not installed")
    path = tmp_path / "scan.dcm"
    write_dicom(path, np.zeros((64, 64)))
    monkeypatch.setenv("NEARL_MAX_PIXELS", "4095")
    with pytest.raises(DataError, match="64 x 64 = 4,096 pixels"):
        read_image(str(path))


def test_a_csv_row_naming_a_directory_says_so(folder, tmp_path):
    os.mkdir(tmp_path / "sub")
    rows = [[str(folder / "normal" / f), "normal"] for f in sorted(os.listdir(folder / "normal"))]
    rows += [[str(folder / "pneumonia" / f), "pneumonia"] for f in sorted(os.listdir(folder / "pneumonia"))]
    path = write_csv(tmp_path / "d.csv", rows + [["sub", "normal"]])
    with pytest.raises(DataError, match=r"line 14: image file '.*sub' is a directory, not a file"):
        load_dataset(str(path), 32)


def test_a_fifo_among_the_images_is_refused_without_being_opened(tmp_path, capsys):
    data = write_image_folder(tmp_path / "d", n_per_class=4)
    os.mkfifo(data / "normal" / "pipe.png")
    with no_hang():
        with pytest.raises(DataError, match=r"pipe\.png' is a named pipe \(FIFO\), not a file"):
            load_dataset(str(data), 32)
        # predict and the DataLoader read every image through read_image, which checks the same way.
        with pytest.raises(DataError, match="is a named pipe"):
            read_image(str(data / "normal" / "pipe.png"))


# Splits that cannot leak (failure 4)

def _csv_rows(folder):
    return [[f"{cls}/{f}", cls] for cls in ("normal", "pneumonia") for f in sorted(os.listdir(folder / cls))]


def test_rows_listed_three_times_are_dropped_before_the_split_with_one_warning(folder, tmp_path, capsys):
    path = write_csv(folder / "tripled.csv", _csv_rows(folder) * 3)
    try:
        data = load_dataset(str(path), 32, seed=0)
    finally:
        os.unlink(path)
    out = capsys.readouterr().out
    assert out.count("warning") == 1 and "dropped 24 duplicate(s)" in out, out
    digests = {name: set(split.digests) for name, split in data.splits.items()}
    assert sum(len(s) for s in data.splits.values()) == 12
    assert not (digests["train"] & digests["test"]) and not (digests["train"] & digests["val"])
    assert not (digests["val"] & digests["test"])


def test_training_on_a_tripled_csv_tests_only_unseen_images(folder, tmp_path, capsys):
    path = write_csv(folder / "tripled.csv", _csv_rows(folder) * 3)
    try:
        assert main(["--data", str(path), "--out", str(tmp_path / "o"), *FAST]) == 0
    finally:
        os.unlink(path)
    summary = json.load(open(tmp_path / "o" / "summary.json"))
    assert sum(map(sum, summary["confusion_matrix"])) == 2  # 12 distinct images: 1 test image per class


def test_one_file_under_two_labels_is_refused_naming_both_rows(folder, tmp_path):
    rows = _csv_rows(folder)
    rows.append([rows[0][0], "pneumonia"])
    path = write_csv(folder / "conflict.csv", rows)
    try:
        with pytest.raises(DataError, match=r"line 2 \('normal/000.png'\) and line 14 \('normal/000.png'\) are the "
                                            r"same file under two labels, 'normal' and 'pneumonia'"):
            load_dataset(str(path), 32)
    finally:
        os.unlink(path)


def test_the_same_image_by_two_paths_or_as_a_copy_is_one_image(tmp_path, capsys):
    data = write_image_folder(tmp_path / "d", n_per_class=4)
    first = sorted(os.listdir(data / "normal"))[0]
    shutil.copy(data / "normal" / first, data / "pneumonia" / "copy.png")
    with pytest.raises(DataError, match=r"'normal/.*' and 'pneumonia/copy.png' are the same image \(identical "
                                        "bytes\\) under two labels"):
        load_dataset(str(data), 32)
    os.unlink(data / "pneumonia" / "copy.png")
    rows = [[f"./{r[0]}", r[1]] for r in _csv_rows(data)] + [[f"normal/{first}", "normal"]]
    path = write_csv(data / "twice.csv", rows)
    loaded = load_dataset(str(path), 32)
    assert sum(len(s) for s in loaded.splits.values()) == len(rows) - 1
    assert "dropped 1 duplicate(s)" in capsys.readouterr().out


def test_an_image_in_two_of_the_sources_own_splits_is_refused(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root / "train", n_per_class=4)
    write_image_folder(root / "test", n_per_class=4)
    with pytest.raises(DataError, match=r"in the train split and .* in the test split are the same image"):
        load_dataset(str(root), 32)


# Paths mean files, not strings (failure 5)

def test_relative_paths_work_from_any_directory_and_as_dot_slash(folder, tmp_path, monkeypatch, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    shutil.copytree(folder, work / "d_ok")
    model_json(work, "m.json")
    weights = work / "w.safetensors"
    from safetensors.torch import save_file

    torch.manual_seed(5)
    save_file(create_clip(str(work / "m.json")).state_dict(), str(weights))
    monkeypatch.chdir(work)
    argv = ["--data", "d_ok", "--model", "m.json", "--pretrained", "w.safetensors", "--out", "o", *FAST]
    assert main(argv) == 0
    assert main(["--data", "./d_ok", "--model", "./m.json", "--pretrained", "./w.safetensors", "--out", "./o",
                 "--resume", *FAST]) == 0
    capsys.readouterr()

    monkeypatch.chdir(elsewhere)
    adapter = str(work / "o" / "adapter.safetensors")
    assert evaluate.main(["--adapter", adapter]) == 0
    image = str(work / "d_ok" / "normal" / sorted(os.listdir(work / "d_ok" / "normal"))[0])
    assert predict.main(["--adapter", adapter, image]) == 0
    expected = capsys.readouterr().out.splitlines()[-3:]

    # Moved beside the adapter: found again by content. Moved elsewhere: the message names a flag predict has.
    os.rename(work / "m.json", work / "o" / "m.json")
    assert predict.main(["--adapter", adapter, image]) == 0
    assert capsys.readouterr().out.splitlines()[-3:] == expected
    os.rename(work / "o" / "m.json", elsewhere / "moved.json")
    fails(["--adapter", adapter, image], capsys, "pass its new place with --model", cli=predict.main)
    assert predict.main(["--adapter", adapter, "--model", str(elsewhere / "moved.json"), image]) == 0
    assert capsys.readouterr().out.splitlines()[-3:] == expected
    # The working directory is searched too; a folder nobody names is not.
    os.rename(work / "w.safetensors", elsewhere / "w.safetensors")
    assert predict.main(["--adapter", adapter, "--model", str(elsewhere / "moved.json"), image]) == 0
    (tmp_path / "third").mkdir()
    os.rename(elsewhere / "w.safetensors", tmp_path / "third" / "w.safetensors")
    fails(["--adapter", adapter, "--model", str(elsewhere / "moved.json"), image], capsys,
          "pass its new place with --pretrained", cli=predict.main)

    os.rename(work / "d_ok", work / "d_moved")
    fails(["--adapter", adapter, "--model", str(elsewhere / "moved.json"), "--pretrained",
           str(tmp_path / "third" / "w.safetensors")], capsys, "pass its new place with --data", cli=evaluate.main)


def test_another_model_json_under_the_same_name_is_refused(folder, tmp_path, capsys):
    path = model_json(tmp_path, "m.json")
    out = tmp_path / "o"
    assert main(["--data", str(folder), "--model", str(path), "--out", str(out), *FAST]) == 0
    (tmp_path / "other").mkdir()
    other = model_json(tmp_path / "other", "m.json", **{"vision_cfg.image_size": 32})
    image = str(folder / "normal" / sorted(os.listdir(folder / "normal"))[0])
    fails(["--adapter", str(out / "adapter.safetensors"), "--model", str(other), image], capsys,
          "is not the model JSON the run", cli=predict.main)


def test_the_data_fingerprint_names_contents_not_paths(folder, tmp_path, monkeypatch):
    a = load_dataset(str(folder), 32).fingerprint()
    monkeypatch.chdir(folder.parent)
    assert load_dataset(f"./{folder.name}", 32).fingerprint() == a
    moved = shutil.copytree(folder, tmp_path / "moved")
    assert load_dataset(str(moved), 32).fingerprint() == a
    with open(moved / "normal" / sorted(os.listdir(moved / "normal"))[0], "ab") as f:
        f.write(b"\0")
    assert load_dataset(str(moved), 32).fingerprint() != a
