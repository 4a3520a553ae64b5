"""Runs a user can trust, round 2 (issue 20): nothing finished is lost, every failure is one line.

`--overwrite` keeps the old run byte for byte until the new one has a checkpoint; `compare` runs sharing an
`--out` lose no cell; no CLI writes over its inputs; a full disk, Ctrl-C, a DataLoader worker's failure, a
corrupt `compare` state and a half-set torchrun environment each end in one `error:` line and exit code 2.
"""

import csv
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from helpers import fails, kernels_not_interpreted, reference_kernels, write_image_folder  # noqa: F401 (autouse fixture)
from nearl_model import NearlCLIP, _io, compare, evaluate
from nearl_model.data import DataError
from nearl_model.run_dir import COMMIT_NAME, STAGING_NAME, RunDir, RunDirError
from nearl_model.train import main

FAST = ["--batch-size", "8", "--lr", "5e-3", "--seed", "3", "--epochs", "1", "--max-steps", "1"]
# Two one-step epochs: a checkpoint after the first, so a failure in the second has one to keep.
TWO_EPOCHS = [*FAST[:-4], "--epochs", "2", "--max-steps", "1"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "xrays", n_per_class=12)


@pytest.fixture(scope="module")
def base(folder, tmp_path_factory):
    """A finished run: the one every --overwrite below must not lose."""
    out = tmp_path_factory.mktemp("runs") / "base"
    with reference_kernels():
        assert main(["--data", str(folder), "--out", str(out), *FAST]) == 0
    return out


def hashes(directory):
    """Every entry of ``directory`` (hidden ones included) and the sha256 of every file."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else "dir"
    return out


def copy_of(base, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(base, out)
    return out


def full_disk_for(monkeypatch, name):
    """Patches the writer: the fsync of ``name``'s temporary reports a full disk (ENOSPC), as a filesystem
    that allocates late does; test_a_real_full_disk_* fills a real tmpfs where the machine allows one."""
    real = _io._fsync

    def fsync(path):
        if os.path.basename(path).startswith(f"tmp-{name}-"):
            raise OSError(28, "No space left on device")
        real(path)

    monkeypatch.setattr(_io, "_fsync", fsync)


def forward_that(monkeypatch, fail):
    """NearlCLIP.forward raising ``fail()`` on training batches; scoring is untouched."""
    real = NearlCLIP.forward

    def forward(self, images, texts, labels=None):
        if labels is not None:
            raise fail()
        return real(self, images, texts, labels)

    monkeypatch.setattr(NearlCLIP, "forward", forward)


def _crash():
    return RuntimeError("a model that fails at its first forward")


def _oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB\nmore torch advice")


# Each way a replacing run can end before its first checkpoint; the old run must stay byte-identical.
@pytest.mark.parametrize("failure", ["traceback", "diverged", "ctrl-c", "oom", "disk full", "refused"])
def test_overwrite_keeps_the_old_run_byte_identical_until_the_first_checkpoint(failure, folder, base, tmp_path,
                                                                               monkeypatch, capsys):
    out = copy_of(base, tmp_path)
    before = hashes(out)
    argv = ["--data", str(folder), "--out", str(out), "--overwrite", *FAST]
    if failure == "traceback":
        # A bug, not a user error: it may end in a traceback, but the old run must survive it.
        forward_that(monkeypatch, _crash)
        with pytest.raises(RuntimeError, match="first forward"):
            main(argv)
    elif failure == "diverged":
        # The case: a real divergence, nothing patched.
        err = fails(["--data", str(folder), "--out", str(out), "--overwrite", "--lr", "1e30", "--warmup", "0",
                     "--batch-size", "8", "--epochs", "1", "--max-steps", "2"], capsys, "training diverged")
        assert "is kept as it was" in err
    elif failure == "ctrl-c":
        forward_that(monkeypatch, KeyboardInterrupt)
        err = fails(argv, capsys, "interrupted; the run already in")
        assert "--resume" not in err  # a resume would continue the old run, not this one
    elif failure == "oom":
        forward_that(monkeypatch, _oom)
        fails(argv, capsys, "out of memory on cpu: CUDA out of memory. Tried to allocate 4.00 GiB")
    elif failure == "disk full":
        full_disk_for(monkeypatch, "checkpoint.pt")
        fails(argv, capsys, "No space left on device")
    elif failure == "refused":
        fails([*argv, "--prompt", "no placeholder"], capsys, "")
    assert hashes(out) == before


def test_overwrite_replaces_the_old_run_at_its_first_checkpoint(folder, base, tmp_path, monkeypatch, capsys):
    out = copy_of(base, tmp_path)
    old = hashes(out)
    calls = {"n": 0}
    real = NearlCLIP.forward

    def diverges_in_epoch_two(self, images, texts, labels=None):
        if labels is None:
            return real(self, images, texts)
        calls["n"] += 1
        loss, logits = real(self, images, texts, labels)
        return (loss * float("nan") if calls["n"] == 2 else loss), logits

    monkeypatch.setattr(NearlCLIP, "forward", diverges_in_epoch_two)
    argv = ["--data", str(folder), "--out", str(out), "--overwrite", *TWO_EPOCHS, "--seed", "5"]
    err = fails(argv, capsys, "training diverged")
    assert "the last checkpoint in" in err
    # The new run's epoch-1 checkpoint replaced the old run, whose summary and plots are gone with it.
    now = hashes(out)
    assert sorted(now) == [".nearl.lock", "adapter.safetensors", "checkpoint.pt", "metrics.jsonl"]
    assert now["checkpoint.pt"] != old["checkpoint.pt"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["key"]["seed"] == 5


def test_an_overwrite_killed_before_its_checkpoint_leaves_the_old_run(base, tmp_path):
    out = copy_of(base, tmp_path)
    before = hashes(out)
    run = RunDir(str(out), overwrite=True)
    assert run.write_dir == str(out / STAGING_NAME)
    (out / STAGING_NAME / "checkpoint.pt").write_bytes(b"half of a new run")
    run._lock.close()  # SIGKILL: the lock goes with the process, the staging folder stays
    with pytest.raises(RunDirError, match="holds a finished run"):
        RunDir(str(out))
    assert hashes(out) == before


def test_a_commit_cut_short_is_finished_at_the_next_open(base, tmp_path):
    # Killed between the commit's renames: the old summary already deleted, the new files not yet all moved.
    out = copy_of(base, tmp_path)
    commit = out / COMMIT_NAME
    commit.mkdir()
    for name in ("checkpoint.pt", "adapter.safetensors", "metrics.jsonl"):
        (commit / name).write_bytes(b"new " + name.encode())
    (commit / "files.txt").write_text("checkpoint.pt\nadapter.safetensors\nmetrics.jsonl\n")
    (out / "summary.json").unlink()
    os.replace(commit / "checkpoint.pt", out / "checkpoint.pt")
    run = RunDir(str(out), resume=True)
    run.close()
    assert sorted(hashes(out)) == [".nearl.lock", "adapter.safetensors", "checkpoint.pt", "metrics.jsonl"]
    for name in ("checkpoint.pt", "adapter.safetensors", "metrics.jsonl"):
        assert (out / name).read_bytes() == b"new " + name.encode()


def test_ctrl_c_is_one_line_that_says_how_to_resume(folder, tmp_path, monkeypatch, capsys):
    # No --out: the line must name the default directory the run chose.
    monkeypatch.chdir(tmp_path)
    real = NearlCLIP.forward
    calls = {"n": 0}

    def interrupted_in_epoch_two(self, images, texts, labels=None):
        if labels is not None:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return real(self, images, texts, labels)

    monkeypatch.setattr(NearlCLIP, "forward", interrupted_in_epoch_two)
    err = fails(["--data", str(folder), *TWO_EPOCHS], capsys, "interrupted; the last checkpoint in 'runs/")
    command = shlex.split(err.split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "nearl_model.train"] and "--resume" in command
    monkeypatch.setattr(NearlCLIP, "forward", real)
    assert main(command[3:]) == 0
    out = command[command.index("--out") + 1]
    assert json.load(open(os.path.join(out, "summary.json")))["epochs"] == 2


def test_ctrl_c_before_any_checkpoint_says_nothing_was_written(folder, tmp_path, monkeypatch, capsys):
    forward_that(monkeypatch, KeyboardInterrupt)
    fails(["--data", str(folder), "--out", str(tmp_path / "o"), *FAST], capsys,
          "interrupted; no checkpoint was written yet")


@pytest.mark.parametrize("name", ["checkpoint.pt", "adapter.safetensors", "metrics.jsonl", "curves.png",
                                  "confusion.png", "summary.json"])
def test_a_full_disk_on_any_write_of_train_is_one_line(name, folder, tmp_path, monkeypatch, capsys):
    full_disk_for(monkeypatch, name)
    out = tmp_path / "o"
    fails(["--data", str(folder), "--out", str(out), *FAST], capsys, "No space left on device")
    assert not [f for f in os.listdir(out) if f.startswith("tmp-")]
    assert not (out / "summary.json").exists()


def _can_mount_tmpfs():
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm (user and mount namespaces) for a small tmpfs")
def test_a_real_full_disk_while_writing_the_checkpoint_keeps_the_old_run(folder, base, tmp_path):
    # A real filesystem, really full: a tmpfs sized for the old run plus 64 KiB, mounted in a private namespace.
    # torch.save straight to a file reported this as a RuntimeError (a traceback) before the fix.
    size = sum(os.path.getsize(base / f) for f in os.listdir(base)) + (64 << 10)
    mnt = tmp_path / "small"
    mnt.mkdir()
    train = shlex.join([sys.executable, "-m", "nearl_model.train", "--data", str(folder), "--out", f"{mnt}/o",
                        "--overwrite", *FAST])
    script = (f"mount -t tmpfs -o size={size} tmpfs {mnt} && cp -r {base} {mnt}/o && "
              f"sha256sum {mnt}/o/* > {tmp_path}/before && "
              f"{{ {train} > {tmp_path}/stdout 2> {tmp_path}/stderr; echo $? > {tmp_path}/rc; }}; "
              f"sha256sum {mnt}/o/* > {tmp_path}/after; ls -A {mnt}/o > {tmp_path}/list")
    env = {**os.environ, "PYTHONPATH": REPO, "TRITON_INTERPRET": "0"}
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, timeout=600, env=env)
    err = (tmp_path / "stderr").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", err
    assert err.startswith("error: ") and err.count("\n") == 1 and "No space left on device" in err, err
    assert (tmp_path / "after").read_text() == (tmp_path / "before").read_text()
    assert sorted((tmp_path / "list").read_text().split()) == sorted(os.listdir(base))  # no .nearl-new left


@pytest.mark.parametrize("kind", ["bad image", "killed"])
def test_a_dataloader_worker_failure_is_one_line(kind, folder, tmp_path, monkeypatch, capsys):
    # The images pass the check at load; the failure comes only inside the worker process.
    from nearl_model.data import splits

    parent, real = os.getpid(), splits.read_image

    def read_image(path):
        if os.getpid() != parent:
            if kind == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            raise DataError(f"cannot decode {path!r}: broken data stream\nsecond line of the reason")
        return real(path)

    monkeypatch.setattr(splits, "read_image", read_image)
    out = tmp_path / "o"
    if kind == "bad image":
        err = fails(["--data", str(folder), "--out", str(out), "--workers", "1", *FAST], capsys,
                    "broken data stream; second line of the reason")
        assert str(folder) in err and "Traceback" not in err and "File " not in err
    else:
        fails(["--data", str(folder), "--out", str(out), "--workers", "1", *FAST], capsys,
              "a DataLoader worker failed: DataLoader worker (pid")


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 looks like a distributed launch, but RANK, MASTER_ADDR, MASTER_PORT are"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "localhost"}, "but MASTER_PORT is not set"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' must be an integer >= 1"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     "RANK='2' must be an integer in 0..1"),
])
def test_a_half_set_distributed_environment_is_one_line(env, message, tmp_path, monkeypatch, capsys):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fails(["--out", str(tmp_path / "o"), *FAST], capsys, message)
    assert not (tmp_path / "o").exists()


def test_train_never_writes_into_its_data(folder, capsys):
    fails(["--data", str(folder), "--out", str(folder / "run"), *FAST], capsys, "is inside --data")
    assert not (folder / "run").exists()


def test_evaluate_out_never_writes_over_inputs_or_an_existing_file(base, tmp_path, capsys):
    adapter = str(base / "adapter.safetensors")
    before = hashes(base)
    fails(["--adapter", adapter, "--out", adapter, "--overwrite"], capsys, "would write over --adapter",
          cli=evaluate.main)
    fails(["--adapter", adapter, "--out", str(base / "checkpoint.pt"), "--overwrite"], capsys,
          "is one of a training run's files", cli=evaluate.main)
    fails(["--adapter", adapter, "--out", str(base)], capsys, "is a directory", cli=evaluate.main)
    assert hashes(base) == before
    report = tmp_path / "eval.json"
    report.write_text("an earlier report")
    fails(["--adapter", adapter, "--out", str(report)], capsys, "already exists; pass --overwrite", cli=evaluate.main)
    assert report.read_text() == "an earlier report"
    assert evaluate.main(["--adapter", adapter, "--out", str(report), "--overwrite"]) == 0
    assert "accuracy" in json.load(open(report))


def test_evaluate_full_disk_is_one_line(base, tmp_path, monkeypatch, capsys):
    full_disk_for(monkeypatch, "eval.json")
    fails(["--adapter", str(base / "adapter.safetensors"), "--out", str(tmp_path / "eval.json")], capsys,
          "No space left on device", cli=evaluate.main)
    assert os.listdir(tmp_path) == []


ZEROSHOT = ["--methods", "zeroshot", "--shots", "1"]


def _cells(out):
    with open(os.path.join(out, "results.csv")) as f:
        return sorted((r["method"], r["shots"], r["seed"]) for r in csv.DictReader(f))


def test_two_compare_runs_on_one_out_keep_every_cell(tmp_path, monkeypatch, capsys):
    # The second run starts and finishes while the first is inside its cell: the two interleave as two
    # processes on one --out would, deterministically.
    out = str(tmp_path / "cmp")
    real = compare.run_cell
    nested = {"rc": None}

    def cell_with_a_second_run_meanwhile(*a):
        if nested["rc"] is None:
            nested["rc"] = -1
            nested["rc"] = compare.main([*ZEROSHOT, "--seeds", "3,4", "--out", out])
        return real(*a)

    monkeypatch.setattr(compare, "run_cell", cell_with_a_second_run_meanwhile)
    assert compare.main([*ZEROSHOT, "--seeds", "1,2", "--out", out]) == 0
    assert nested["rc"] == 0
    assert _cells(out) == [("zeroshot", "1", s) for s in ("1", "2", "3", "4")]
    assert "| zeroshot | 0." in open(os.path.join(out, "results.md")).read()


def test_compare_takes_the_lock_train_takes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    monkeypatch.setattr(compare, "LOCK_WAIT_SECONDS", 0.2)
    with open(out / ".nearl.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fails([*ZEROSHOT, "--seeds", "1", "--out", str(out)], capsys, "locked by another nearl process",
              cli=compare.main)
    assert not (out / "results.csv").exists()


@pytest.mark.parametrize("name,content,message", [
    ("run.json", b"{not json", "run.json' is corrupt"),
    ("run.json", b"[1, 2]", "not an object"),
    ("results.csv", b"method,shots,seed,accuracy\nzeroshot,1,1,high\n", "line 2: accuracy 'high' is not a number"),
    ("results.csv", b"a,b\n1,2\n", "no method, shots, seed, accuracy column"),
    ("results.csv", b"method,shots,seed,accuracy\nzeroshot,1\n", "line 2 has fewer fields than the header"),
    ("results.csv", b"method,shots\n\xff\xfe\xfa\n", "results.csv' is corrupt"),
])
def test_a_corrupt_compare_state_is_one_line(name, content, message, tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    # A results.csv beside it makes run.json the record of settings that must not be lost.
    (out / "results.csv").write_text("method,shots,seed,accuracy\nzeroshot,1,1,0.5\n")
    (out / name).write_bytes(content)
    fails([*ZEROSHOT, "--seeds", "1", "--out", str(out)], capsys, message, cli=compare.main)
    assert (out / name).read_bytes() == content


def test_compare_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    full_disk_for(monkeypatch, "results.csv")
    fails([*ZEROSHOT, "--seeds", "1", "--out", str(tmp_path / "cmp")], capsys, "No space left on device",
          cli=compare.main)
