"""The training, prediction and evaluation CLIs, run in-process on tiny generated data."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nearl_model import evaluate, predict
from nearl_model.data import synthetic_xrays

from helpers import write_dicom, write_image_folder
from nearl_model.train import main

@pytest.fixture(autouse=True)
def kernels_not_interpreted(monkeypatch):
    # --fused on CPU takes the custom ops' reference maths here; the kernels
    # themselves are checked against it in test_oca/test_synergy/test_fused_model.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


FAST = ["--batch-size", "8", "--lr", "5e-3", "--fused", "--seed", "3"]
OUTPUTS = {"adapter.safetensors", "checkpoint.pt", "metrics.jsonl", "summary.json", "curves.png", "confusion.png"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "xrays")


def read_history(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_imagefolder_two_epochs_writes_everything_and_learns(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--data", str(folder), "--epochs", "2", "--out", str(out), *FAST]) == 0
    assert OUTPUTS <= set(os.listdir(out))
    history = read_history(out)
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    summary = json.load(open(out / "summary.json"))
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "num_trainable_parameters", "seconds"):
        assert key in summary, key
    assert summary["classes"] == ["normal", "pneumonia"]
    assert summary["num_trainable_parameters"] == 192904
    assert open(out / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "epoch   2/2" in printed and "test: accuracy" in printed

    image = next((folder / "pneumonia").iterdir())
    assert predict.main(["--adapter", str(out / "adapter.safetensors"), str(image)]) == 0
    printed = capsys.readouterr().out
    assert "normal" in printed and "pneumonia" in printed
    probs = [float(line.split()[-1]) for line in printed.splitlines()[1:3]]
    assert abs(sum(probs) - 1) < 1e-3

    report = tmp_path / "eval.json"
    assert evaluate.main(["--adapter", str(out / "adapter.safetensors"), "--data", str(folder), "--seed", "3",
                          "--out", str(report)]) == 0
    assert json.load(open(report))["accuracy"] == pytest.approx(summary["accuracy"])


def test_medmnist_npz(tmp_path):
    images, labels = synthetic_xrays(40, seed=5, size=28)
    images = np.stack(images)
    labels = np.array(labels).reshape(-1, 1) % 2
    path = tmp_path / "pneumoniamnist.npz"
    np.savez(path, train_images=images[:24], train_labels=labels[:24], val_images=images[24:32],
             val_labels=labels[24:32], test_images=images[32:], test_labels=labels[32:])
    out = tmp_path / "run"
    assert main(["--data", str(path), "--epochs", "2", "--out", str(out), "--mode", "shared", *FAST]) == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["classes"] == ["normal", "pneumonia"] and summary["mode"] == "shared"
    assert len(read_history(out)) == 2


def test_embedded_demo_beats_chance(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--epochs", "6", "--out", str(out)]) == 0
    summary = json.load(open(out / "summary.json"))
    assert "SYNTHETIC DEMO" in capsys.readouterr().out
    # Three classes: chance is 1/3.
    assert summary["accuracy"] >= 0.5 and summary["auroc"] >= 0.7, summary


def test_kill_and_resume_matches_uninterrupted_run(folder, tmp_path, monkeypatch):
    args = ["--data", str(folder), "--epochs", "3", *FAST]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    real_clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def dies_in_epoch_two(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # 4 optimiser steps per epoch: mid-way through epoch 2
            raise KeyboardInterrupt
        return real_clip(*a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", dies_in_epoch_two)
    # Ctrl-C is one error line and exit 2 (tests/test_run_safety_round2.py checks the line).
    assert main([*args, "--out", str(tmp_path / "killed")]) == 2
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    assert [h["epoch"] for h in read_history(tmp_path / "killed")] == [1]
    assert not [f for f in os.listdir(tmp_path / "killed") if f.startswith("tmp-")]

    assert main([*args, "--out", str(tmp_path / "killed"), "--resume"]) == 0
    whole = load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "adapter.safetensors"))
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), name
    losses = lambda run: [h["train_loss"] for h in read_history(tmp_path / run)]  # noqa: E731
    assert losses("whole") == losses("killed")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_one_process(folder, tmp_path):
    args = ["--data", str(folder), "--epochs", "1", "--max-steps", "3", "--device", "cpu", *FAST]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "nearl_model.train", *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    one = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter.safetensors"))
    # Gradient all-reduce sums in another order than one process does, and
    # Adam divides each gradient by its own running size, so an element whose
    # gradient is near zero can move by a good part of a step (lr = 5e-3) on
    # rounding alone: how far depends on the CPU's summation order. A wrong
    # batch split moves nearly every element by about a step, so the test
    # bounds the typical element (mean) tightly and the worst one by a step.
    diffs = torch.cat([(tensor - two[name]).abs().flatten() for name, tensor in one.items()])
    assert diffs.max() <= 5e-3, diffs.max()
    assert diffs.mean() <= 5e-6, diffs.mean()


def _fails_cleanly(argv, out, capsys, message):
    assert main([*argv, "--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    if os.path.isdir(out):
        assert not {"checkpoint.pt", "adapter.safetensors"} & set(os.listdir(out))


def test_bad_input_exits_2_with_reason_and_no_checkpoint(folder, tmp_path, capsys):
    out = tmp_path / "run"
    _fails_cleanly(["--data", str(tmp_path / "missing")], out, capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    _fails_cleanly(["--data", str(tmp_path / "empty")], out, capsys, "no images found")

    csv_path = tmp_path / "labels.csv"
    first = next((folder / "normal").iterdir())
    csv_path.write_text(f"path,label\n{first},normal\n{first},tumour\n")
    names = tmp_path / "classes.json"
    names.write_text(json.dumps(["normal", "pneumonia"]))
    _fails_cleanly(["--data", str(csv_path), "--classes", str(names)], out, capsys, "['tumour']")

    bad = write_image_folder(tmp_path / "bad", n_per_class=3)
    (bad / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    _fails_cleanly(["--data", str(bad)], out, capsys, "broken.png")

    _fails_cleanly(["--model", "ViT-B-99"], out, capsys, "unknown model 'ViT-B-99'")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fails_cleanly([], blocker / "out", capsys, "cannot write to output directory")
    _fails_cleanly(["--data", str(folder), "--resume"], tmp_path / "fresh", capsys, "no checkpoint")


def test_dicom_folder(tmp_path):
    pytest.importorskip("pydicom", reason="the dicom extra is not installed")
    images, labels = synthetic_xrays(24, seed=9, size=32)
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "dicom" / ("normal" if label == 0 else "finding")
        folder.mkdir(parents=True, exist_ok=True)
        write_dicom(folder / f"{i:03d}.dcm", img)
    out = tmp_path / "run"
    assert main(["--data", str(tmp_path / "dicom"), "--epochs", "1", "--out", str(out), *FAST]) == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["classes"] == ["finding", "normal"]


def test_few_shot_without_epochs_trains_min_steps_and_saves_about_20_times(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--data", str(folder), "--shots", "4", "--batch-size", "8", "--min-steps", "60",
                 "--out", str(out), "--seed", "3"]) == 0
    assert "so 60 epochs to reach --min-steps 60 (validation and checkpoint every 3)" in capsys.readouterr().out
    history = read_history(out)
    assert [h["epoch"] for h in history] == list(range(3, 61, 3))
    assert json.load(open(out / "summary.json"))["epochs"] == 60
    assert torch.load(out / "checkpoint.pt", weights_only=True)["scheduler"]["last_epoch"] == 60
