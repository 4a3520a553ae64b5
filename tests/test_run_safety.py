"""Runs a user can trust: bad settings refused, NaN never saved or used, finished results protected."""

import fcntl
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import fails, kernels_not_interpreted, reference_kernels, write_image_folder  # noqa: F401 (autouse fixture)
from nearl_model import NearlCLIP, _io, evaluate, predict, train
from nearl_model._progress import Progress
from nearl_model.adapter_io import read_adapter, read_run
from nearl_model.train import build_parser, main, resolve_config

FAST = ["--batch-size", "8", "--lr", "5e-3", "--seed", "3", "--epochs", "1", "--max-steps", "2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "xrays", n_per_class=12)


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    with reference_kernels():
        assert main(["--data", str(folder), "--out", str(out), *FAST]) == 0
    return out


@pytest.mark.parametrize("flag,value,rule", [
    ("--shots", "0", ">= 1"), ("--grad-clip", "-1", "> 0"), ("--lr", "nan", "> 0"), ("--lr", "inf", "> 0"),
    ("--weight-decay", "-1", ">= 0"), ("--max-steps", "-1", ">= 1"), ("--warmup", "1.5", "in [0, 1)"),
    ("--epochs", "0", ">= 1"), ("--workers", "-2", ">= 0"),
])
def test_every_number_is_range_checked(flag, value, rule, tmp_path, capsys):
    fails([flag, value, "--out", str(tmp_path / "out")], capsys, f"{flag} must be")
    assert not os.path.exists(tmp_path / "out")


def test_mode_default_keeps_the_config_files_mode(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"mode": "shared", "r": 16}))
    assert resolve_config(build_parser().parse_args(["--config", str(cfg)])).mode == "shared"
    assert resolve_config(build_parser().parse_args(["--config", str(cfg), "--mode", "paired"])).mode == "paired"
    cfg.write_text(json.dumps({"n_queries": 2 ** 24}))
    with pytest.raises(train.CLIError, match="n_queries must be an int in 1..1024"):
        resolve_config(build_parser().parse_args(["--config", str(cfg)]))


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    # argparse wraps to the terminal's width, breaking at spaces and hyphens: compare without whitespace.
    text = "".join(capsys.readouterr().out.split())
    for default in ("default: 20, or more to reach --min-steps", "(default: 200)", "(default: 32)",
                    "(default: 0.001)", "(default: True)"):
        assert default.replace(" ", "") in text, default


def test_finished_out_is_refused_unless_resume_or_overwrite(folder, trained, capsys):
    fails(["--data", str(folder), "--out", str(trained), *FAST], capsys, "holds a finished run")
    fails(["--data", str(folder), "--out", str(trained), "--resume", "--overwrite", *FAST], capsys, "contradict")


def test_overwrite_clears_the_old_run_and_outputs_follow_the_umask(folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    (out / "confusion.png").write_text("old")
    (out / "tmp-killed.part").write_text("half a checkpoint")
    old = os.umask(0o027)
    try:
        assert main(["--data", str(folder), "--out", str(out), "--overwrite", "--max-steps", "1",
                     *FAST[:-2]]) == 0
    finally:
        os.umask(old)
    assert json.load(open(out / "summary.json"))["classes"] == ["normal", "pneumonia"]
    assert not (out / "tmp-killed.part").exists()
    for name in ("adapter.safetensors", "checkpoint.pt", "summary.json"):
        assert os.stat(out / name).st_mode & 0o777 == 0o640, name


def test_a_second_run_on_a_locked_out_is_refused(folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".nearl.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fails(["--data", str(folder), "--out", str(out), *FAST], capsys, "another nearl run is using")


def test_nan_loss_stops_with_exit_2_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--data", str(folder), "--out", str(out), *FAST[:-4], "--epochs", "2", "--max-steps", "1"]
    real = NearlCLIP.forward
    calls = {"n": 0}

    def diverges_in_epoch_two(self, images, texts, labels=None):
        if labels is None:
            return real(self, images, texts)
        loss, logits = real(self, images, texts, labels)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), logits

    monkeypatch.setattr(NearlCLIP, "forward", diverges_in_epoch_two)
    fails(argv, capsys, "training diverged: the training loss is nan at epoch 2, batch 1")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "adapter.safetensors")).values())
    assert not (out / "summary.json").exists()


def test_resume_compares_contents_not_paths(folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", str(folder), "--out", str(out), *FAST]
    assert main(argv) == 0
    descriptions = tmp_path / "d.json"
    descriptions.write_text(json.dumps({"pneumonia": "patchy consolidation"}))
    err = fails([*argv, "--resume", "--descriptions", str(descriptions)], capsys, "differs from the checkpoint's")
    assert "prompts" in err
    fails([*argv, "--resume", "--grad-clip", "0.5"], capsys, "grad_clip")
    fails([*argv, "--resume", "--precision", "bf16"], capsys, "precision")
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    fails([*argv, "--resume"], capsys, "is unreadable")


def test_disk_full_while_saving_is_an_error_and_keeps_the_previous_files(folder, tmp_path, monkeypatch, capsys):
    # Patches the writer: the fsync of checkpoint.pt's temporary reports a full disk, as a filesystem that
    # allocates late does (test_run_safety_round2 fills a real tmpfs where the machine allows one).
    out = tmp_path / "run"
    real_fsync = _io._fsync
    calls = {"n": 0}

    def full_on_second(path):
        if "checkpoint.pt" in os.path.basename(path):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
        real_fsync(path)

    monkeypatch.setattr(_io, "_fsync", full_on_second)
    fails(["--data", str(folder), "--out", str(out), *FAST[:-4], "--epochs", "2", "--max-steps", "1"], capsys,
          "No space left on device")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not [f for f in os.listdir(out) if f.startswith("tmp-")]


def tampered(trained, tmp_path, name, change_tensors=None, change_meta=None):
    from safetensors import safe_open

    with safe_open(str(trained / "adapter.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(meta)
    path = tmp_path / name
    save_file(tensors, str(path), metadata=meta)
    return str(path)


def test_adapters_are_validated_before_a_backbone_is_built(trained, tmp_path, monkeypatch, capsys):
    def no_backbone(*a, **k):
        raise AssertionError("a backbone was built for an invalid adapter")

    # The name the loader calls. Patching nearl_model.backbones instead leaked: a loader first imported
    # under that patch bound no_backbone for the rest of the session.
    monkeypatch.setattr("nearl_model.loading.create_clip", no_backbone)

    def nan(t):
        t["z0"][0, 0] = float("nan")

    def huge(m):
        m["nearl_config"] = json.dumps({**json.loads(m["nearl_config"]), "n_queries": 1000})

    def malformed(m):
        m["nearl_run"] = json.dumps({"model": "nearl-tiny", "seed": 0})

    for name, kwargs, message in [
        ("nan.safetensors", {"change_tensors": nan}, "NaN or inf values in ['z0']"),
        ("huge.safetensors", {"change_meta": huge}, "z0 has shape (16, 32), model expects (1000, 32)"),
        ("record.safetensors", {"change_meta": malformed}, "malformed run record"),
    ]:
        path = tampered(trained, tmp_path, name, **kwargs)
        fails(["--adapter", path, "--device", "cpu", __file__], capsys, message, cli=predict.main)


def test_evaluate_rebuilds_the_runs_split_and_checks_classes(folder, trained, tmp_path, capsys):
    summary = json.load(open(trained / "summary.json"))
    report = tmp_path / "eval.json"
    assert evaluate.main(["--adapter", str(trained / "adapter.safetensors"), "--out", str(report)]) == 0
    assert json.load(open(report))["accuracy"] == pytest.approx(summary["accuracy"])
    capsys.readouterr()
    fails(["--adapter", str(trained / "adapter.safetensors"), "--data", str(folder), "--device", "cuda:7"], capsys,
          "--device cuda:7" if not torch.cuda.is_available() else "", cli=evaluate.main)

    def demo(m):
        m["nearl_run"] = json.dumps({**json.loads(m["nearl_run"]), "data": None})

    demo_run = tampered(trained, tmp_path, "demo.safetensors", change_meta=demo)
    fails(["--adapter", demo_run], capsys, "synthetic demo has classes", cli=evaluate.main)


def test_evaluate_refuses_data_changed_since_training(folder, tmp_path, capsys):
    data = write_image_folder(tmp_path / "xrays", n_per_class=12)
    out = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(out), *FAST]) == 0
    first = sorted((data / "normal").iterdir())[0]
    # Touched only, the data is the same (the fingerprint reads contents): evaluate scores it.
    os.utime(first, ns=(1, 1))
    assert evaluate.main(["--adapter", str(out / "adapter.safetensors")]) == 0
    with open(first, "ab") as f:
        f.write(b"\0")
    fails(["--adapter", str(out / "adapter.safetensors")], capsys, "changed since the run", cli=evaluate.main)


def test_predict_refuses_non_finite_probabilities(trained, folder, monkeypatch, capsys):
    monkeypatch.setattr(NearlCLIP, "forward", lambda self, images, texts, labels=None:
                        torch.full((images.shape[0], texts.shape[0]), float("nan")))
    image = str(next((folder / "normal").iterdir()))
    fails(["--adapter", str(trained / "adapter.safetensors"), image], capsys, "non-finite probabilities",
          cli=predict.main)


def test_progress_prints_lines_when_not_a_terminal(capsys):
    progress = Progress(3, "epoch 1/1", every=0)
    for _ in range(3):
        progress.update(loss="0.5")
    progress.close()
    assert capsys.readouterr().out.splitlines() == [f"epoch 1/1: {i}/3  loss 0.5" for i in (1, 2, 3)]


def test_notes_on_batch_size_and_underscores_in_prompts(tmp_path, capsys):
    data = write_image_folder(tmp_path / "xrays", n_per_class=9, classes=("normal_lungs", "pneumonia"))
    out = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(out), "--batch-size", "64", "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "--batch-size 64 is more than the" in printed
    _, meta = read_adapter(str(out / "adapter.safetensors"))
    assert read_run("x", meta)["prompts"][0] == "a medical image showing normal lungs."


def test_the_cli_speaks_before_its_heavy_imports():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "nearl_model.train", "--epochs", "0"], capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 2
    assert done.stdout.startswith("nearl: starting"), done.stdout
    assert done.stderr.endswith("error: --epochs must be >= 1; got 0\n"), done.stderr


def test_overwrite_with_a_typo_keeps_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    fails(["--data", str(tmp_path / "typo"), "--out", str(out), "--overwrite", *FAST], capsys, "does not exist")
    assert (out / "summary.json").read_text() == "{}"


@pytest.mark.parametrize("device", ["mps", "cuda:99"])
def test_a_device_this_machine_lacks_is_one_error_line(device, tmp_path, capsys):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    fails(["--device", device, "--out", str(tmp_path / "out"), *FAST], capsys, f"--device {device}")


def test_a_shape_record_claiming_more_layers_than_tensors_is_refused(trained, tmp_path, capsys):
    def layers(m):
        m["shape"] = json.dumps({**json.loads(m["shape"]), "n_layers": 10 ** 6})

    path = tampered(trained, tmp_path, "layers.safetensors", change_meta=layers)
    fails(["--adapter", path, __file__], capsys, "claims 1000000 layers", cli=predict.main)


def test_an_hf_hub_id_with_a_tag_for_pretrained_is_refused():
    from nearl_model.backbones import create_clip

    with pytest.raises(ValueError, match="must be a local checkpoint file"):
        create_clip("hf-hub:org/repo", "openai")
