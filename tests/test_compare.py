"""The few-shot comparison harness: methods at initialisation, learning, determinism, report, resume, CLI."""

import csv
import json
import os

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from nearl_model import compare, create_clip
from nearl_model.compare import class_view, main, read_results, render_report
from nearl_model.prompts import DEMO_TEMPLATE
from nearl_model.data import load_dataset, synthetic_xrays
from nearl_model.methods import METHODS, Backbone, ClassSet, Task, clip_adapter
from nearl_model.methods.clip_adapter import Adapter
from nearl_model.methods.coop import CoOp
from nearl_model.methods import lora as lora_module
from nearl_model.methods.lora import LoRA
from nearl_model.methods.zeroshot import ZeroShot

CHANCE = 1 / 3
# Test images per class: enough that chance accuracy stays within ~0.05 of 1/3.
TEST_PER_CLASS = 60


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    clip = create_clip("nearl-tiny")
    backbone = Backbone(clip, "nearl-tiny", torch.device("cpu"), max_steps=60)
    data = load_dataset(None, backbone.image_size)
    classes = ClassSet(list(data.classes), DEMO_TEMPLATE)
    ids = list(range(len(classes)))
    test = class_view("test", data.splits["test"], ids, TEST_PER_CLASS, 0)
    return backbone, data, classes, test


def make_task(demo, shots=16, seed=1):
    backbone, data, classes, _ = demo
    ids = list(range(len(classes)))
    return Task(classes, class_view("train", data.splits["train"], ids, shots, seed),
                class_view("val", data.splits["val"], ids, shots, seed), seed)


def open_clip_zero_shot(backbone, view, classes):
    """open_clip's own zero-shot logits: its tokenizer (77 tokens), encode_image / encode_text."""
    clip = backbone.clip
    images = torch.stack([view.dataset[i][0] for i in view.indices])
    tokens = open_clip.get_tokenizer("ViT-B-16")(classes.prompts)
    with torch.no_grad():
        img = F.normalize(clip.encode_image(images), dim=-1)
        txt = F.normalize(clip.encode_text(tokens), dim=-1)
    return clip.logit_scale.exp() * img @ txt.t()


def test_zeroshot_equals_open_clip(demo):
    backbone, _, classes, test = demo
    ours = ZeroShot().logits(backbone, test, classes)
    torch.testing.assert_close(ours, open_clip_zero_shot(backbone, test, classes), rtol=1e-5, atol=1e-5)


def test_lora_at_init_equals_frozen(demo):
    backbone, _, classes, test = demo
    lora = LoRA()
    lora.setup(backbone, make_task(demo))
    lora._train_mode(False)
    images = torch.stack([test.dataset[i][0] for i in test.indices])
    with torch.no_grad():
        ours = lora.logits(backbone, images, classes)
    torch.testing.assert_close(ours, open_clip_zero_shot(backbone, test, classes), rtol=1e-4, atol=1e-4)
    # q, k, v of every block of both towers, rank 2: 3 * 2 * (r * d + d * r) per block.
    clip = backbone.clip
    expected = sum(3 * 2 * 2 * t.width * len(t.resblocks) for t in (clip.visual.transformer, clip.transformer))
    assert lora.trainable_parameters() == expected
    # The shared backbone is untouched: LoRA trains its own copy.
    assert all(type(b.attn) is torch.nn.MultiheadAttention for b in clip.transformer.resblocks)


def test_clip_adapter_at_init_equals_frozen(demo):
    backbone, _, classes, test = demo
    method = clip_adapter.ClipAdapter()
    torch.manual_seed(0)
    method.adapter = Adapter(backbone.image_features(test).shape[1])
    with torch.no_grad():
        ours = method.logits(backbone, backbone.image_features(test), backbone.text_features(classes.prompts))
    torch.testing.assert_close(ours, open_clip_zero_shot(backbone, test, classes), rtol=1e-5, atol=1e-5)


def test_coop_from_prompt_equals_zeroshot(demo):
    backbone, _, classes, test = demo
    prefix = DEMO_TEMPLATE.split("{}")[0].strip()
    method = CoOp(ctx_init=prefix)
    method.setup(backbone, make_task(demo))
    assert method.learner.n_ctx == 6  # a, chest, x, -, ray, showing
    torch.testing.assert_close(method.logits(backbone, test, classes),
                               open_clip_zero_shot(backbone, test, classes), rtol=1e-5, atol=1e-5)


# On the random-init demo backbone the image features are nearly collinear (mean
# pairwise cosine 0.99) and the logit scale is 14.3, so the methods that only
# recombine frozen features under CLIP's cosine head (CLIP-Adapter, CoOp,
# Tip-Adapter) barely beat chance on the demo in the test's 60 steps; they are
# checked on planted features below, and on real digits in tests/test_baselines.py.
LEARN_ON_DEMO = ["linear-probe", "lora", "nearl", "nearl-shared"]
LEARN_ON_PLANTED = ["clip-adapter", "coop", "tip-adapter", "tip-adapter-f"]
PLANTED_OVERRIDES = {}
assert sorted(LEARN_ON_DEMO + LEARN_ON_PLANTED + ["zeroshot"]) == sorted(METHODS)


def _accuracy(method, backbone, view, classes):
    return float((method.predict_proba(backbone, view, classes).argmax(1) == np.asarray(view.labels)).mean())


# CLIP-LoRA's lr (2e-4) is set for its 500 x shots iterations; the test budget
# is 60 steps (Backbone.max_steps), so the test raises the lr to see it learn.
DEMO_OVERRIDES = {"lora": ("LR", 1e-2)}


@pytest.mark.parametrize("name", LEARN_ON_DEMO)
def test_every_method_learns_above_chance(demo, name, monkeypatch):
    backbone, _, classes, test = demo
    if name in DEMO_OVERRIDES:
        monkeypatch.setattr(lora_module, *DEMO_OVERRIDES[name])
    method = METHODS[name]()
    method.fit(backbone, make_task(demo))
    accuracy = _accuracy(method, backbone, test, classes)
    assert accuracy > CHANCE + 0.06, f"{name}: test accuracy {accuracy:.3f} vs chance {CHANCE:.3f}"


class PlantedBackbone(Backbone):
    """The demo backbone, but each image's frozen feature carries its class along a random direction.

    The directions are unrelated to the text features, so zero-shot stays at
    chance and a method must learn the mapping from the few shots.
    """

    def __init__(self, clip, dim, n_classes):
        super().__init__(clip, "nearl-tiny", torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        self.common = F.normalize(torch.randn(dim, generator=g), dim=0)
        self.directions = F.normalize(torch.randn(n_classes, dim, generator=g), dim=1)

    def image_features(self, view):
        rows = []
        for i, label in zip(view.indices, view.labels):
            g = torch.Generator().manual_seed(hash((view.split, i)) % 2**31)
            noise = torch.randn(self.common.shape[0], generator=g)
            rows.append(self.common + 0.3 * self.directions[label] + 0.05 * noise)
        return F.normalize(torch.stack(rows), dim=-1)


@pytest.mark.parametrize("name", LEARN_ON_PLANTED)
def test_feature_methods_learn_above_chance_on_planted_features(demo, name, monkeypatch):
    backbone, _, classes, test = demo
    if name in PLANTED_OVERRIDES:
        monkeypatch.setattr(*PLANTED_OVERRIDES[name])
    planted = PlantedBackbone(backbone.clip, backbone.image_features(test).shape[1], len(classes))
    zero_shot = _accuracy(ZeroShot(), planted, test, classes)
    method = METHODS[name]()
    method.fit(planted, make_task(demo))
    accuracy = _accuracy(method, planted, test, classes)
    assert accuracy > max(zero_shot, CHANCE) + 0.2, f"{name}: {accuracy:.3f}, zero-shot {zero_shot:.3f}"


def test_zeroshot_is_chance_on_random_init(demo):
    """The demo backbone is random: zero-shot has nothing to go on (the reference every method must beat)."""
    backbone, _, classes, test = demo
    probs = ZeroShot().predict_proba(backbone, test, classes)
    accuracy = float((probs.argmax(1) == np.asarray(test.labels)).mean())
    assert abs(accuracy - CHANCE) < 0.1


@pytest.mark.parametrize("name", ["coop", "lora", "nearl"])
def test_same_seed_same_results(demo, name, monkeypatch):
    backbone, _, classes, test = demo
    monkeypatch.setattr(backbone, "max_steps", 10)

    def fitted(seed):
        method = METHODS[name]()
        method.fit(backbone, make_task(demo, shots=2, seed=seed))
        return method.predict_proba(backbone, test, classes)

    first = fitted(7)
    np.testing.assert_array_equal(first, fitted(7))
    assert not np.array_equal(first, fitted(8))


FIXTURE_CSV = """method,shots,seed,accuracy,balanced_accuracy,macro_f1,auroc,trainable_parameters,train_seconds,peak_memory_bytes
zeroshot,1,1,0.3,0.3,0.2,0.5,0,0.0,
zeroshot,1,2,0.3,0.3,0.2,0.5,0,0.0,
zeroshot,4,1,0.3,0.3,0.2,0.5,0,0.0,
zeroshot,4,2,0.3,0.3,0.2,0.5,0,0.0,
nearl,1,1,0.4,0.4,0.35,0.6,1000,2.0,1048576
nearl,1,2,0.6,0.6,0.55,0.8,1000,4.0,2097152
nearl,4,1,0.7,0.7,0.65,,1000,3.0,1048576
nearl,4,2,0.9,0.9,0.85,0.9,1000,5.0,1048576
"""


def test_report_renders_from_committed_csv(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(FIXTURE_CSV)
    rows = read_results(str(path))
    assert rows[4] == {"method": "nearl", "shots": 1, "seed": 1, "accuracy": 0.4, "balanced_accuracy": 0.4,
                       "macro_f1": 0.35, "auroc": 0.6, "trainable_parameters": 1000, "train_seconds": 2.0,
                       "peak_memory_bytes": 1048576}
    render_report(rows, str(tmp_path), ["- data: fixture"])
    md = (tmp_path / "results.md").read_text()
    # nearl at 1 shot: mean 0.5, sample std 0.1414; at 4 shots 0.8 +- 0.1414; AUROC with one seed missing.
    assert "| zeroshot | 0.300 ± 0.000 | 0.300 ± 0.000 |" in md
    assert "| nearl | 0.500 ± 0.141 | 0.800 ± 0.141 |" in md
    assert "| nearl | 0.700 ± 0.141 | 0.900 |" in md
    assert "| nearl | 1,000 | 3.50 | 2.0 |" in md
    assert "- data: fixture" in md
    png = (tmp_path / "accuracy_vs_shots.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_flags_a_fitted_method_stuck_at_chance(tmp_path):
    rows = read_results(_write(tmp_path / "results.csv", FIXTURE_CSV + COLLAPSED_CSV))
    # 3 classes, 300 test images: sigma = sqrt(1/3 * 2/3 / 300) = 0.0272; chance + 2 sigma = 0.388.
    flagged = render_report(rows, str(tmp_path), n_classes=3, n_test=300)
    assert [(f["method"], f["shots"]) for f in flagged] == [("linear-probe", 4)]
    md = (tmp_path / "results.md").read_text()
    assert "| linear-probe | 0.700 ± 0.000 | 0.340 ± 0.000 ⚠ |" in md
    assert "- ⚠ linear-probe at 4-shot: 0.340, while nearl reaches 0.800" in md
    # Zero-shot at chance is never flagged; nor is any cell without a method well above chance.
    assert "zeroshot at" not in md
    # 10 test images: sigma 0.149, and no method is 4 sigma (0.596) above chance.
    assert compare.collapsed_cells(rows, n_classes=3, n_test=10) == []


def test_cli_warns_naming_the_collapsed_method(tmp_path, capsys, monkeypatch):
    accuracy = {"linear-probe": 1 / 3, "nearl": 0.9}

    def fake_cell(backbone, name, splits, classes, novel, base_ids, novel_ids, shots, seed):
        return {"method": name, "shots": shots, "seed": seed, "accuracy": accuracy[name], "train_seconds": 0.0,
                "trainable_parameters": 1}

    monkeypatch.setattr(compare, "run_cell", fake_cell)
    assert main(["--methods", "linear-probe,nearl", "--shots", "4", "--seeds", "1", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "warning: linear-probe stays at chance at 4-shot (0.333, chance 0.333) while nearl reaches 0.900" in err
    assert "nearl stays" not in err


def _write(path, text):
    path.write_text(text)
    return str(path)


COLLAPSED_CSV = """linear-probe,1,1,0.7,0.7,0.7,0.8,100,1.0,
linear-probe,1,2,0.7,0.7,0.7,0.8,100,1.0,
linear-probe,4,1,0.34,0.34,0.2,0.5,100,1.0,
linear-probe,4,2,0.34,0.34,0.2,0.5,100,1.0,
"""


def _rows(out):
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


def test_cli_smoke(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["--methods", "zeroshot,linear-probe", "--shots", "1", "--seeds", "1", "--out", out]) == 0
    rows = _rows(out)
    assert [(r["method"], r["shots"], r["seed"]) for r in rows] == [("zeroshot", "1", "1"), ("linear-probe", "1", "1")]
    assert list(rows[0]) == compare.COLUMNS
    assert all(0 <= float(r["accuracy"]) <= 1 and r["peak_memory_bytes"] == "" for r in rows)
    assert int(rows[1]["trainable_parameters"]) == 64 * 3 + 3
    for name in ("results.md", "accuracy_vs_shots.png", "machine.json", "run.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    machine = json.loads(open(os.path.join(out, "machine.json")).read())
    assert machine["torch"] == torch.__version__ and "--methods zeroshot,linear-probe" in machine["command"]
    assert machine["earlier_runs"] == []
    # A second run adding cells keeps the record of the first.
    assert main(["--methods", "zeroshot", "--shots", "2", "--seeds", "1", "--out", out]) == 0
    again = json.loads(open(os.path.join(out, "machine.json")).read())
    assert "--shots 2" in again["command"]
    assert [r["command"] for r in again["earlier_runs"]] == [machine["command"]]
    # Not a terminal: progress comes as plain lines.
    assert "compare [2/2] linear-probe 1-shot seed 1" in capsys.readouterr().out


def test_cli_runs_on_built_in_digits(tmp_path, capsys):
    out = str(tmp_path / "digits")
    assert main(["--data", "sklearn-digits", "--methods", "zeroshot", "--shots", "1", "--seeds", "1",
                 "--out", out]) == 0
    assert "scikit-learn digits 0-4" in capsys.readouterr().out
    assert json.loads(open(os.path.join(out, "run.json")).read())["data"] == "sklearn-digits"
    assert len(_rows(out)) == 1


def test_resume_runs_only_missing_cells(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    args = ["--methods", "zeroshot,tip-adapter", "--shots", "1", "--out", out]
    calls = []
    real = compare.run_cell

    def killed_after_three(*a):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append((a[1], a[7], a[8]))
        return real(*a)

    monkeypatch.setattr(compare, "run_cell", killed_after_three)
    # Ctrl-C is one error line and exit code 2; the cells finished before it stay.
    assert main(args + ["--seeds", "1,2"]) == 2
    assert len(_rows(out)) == 3
    first = _rows(out)

    calls.clear()
    monkeypatch.setattr(compare, "run_cell", lambda *a: calls.append((a[1], a[7], a[8])) or real(*a))
    assert main(args + ["--seeds", "1,2,3"]) == 0
    assert calls == [("tip-adapter", 1, 2), ("zeroshot", 1, 3), ("tip-adapter", 1, 3)]
    rows = _rows(out)
    assert rows[:3] == first and len(rows) == 6


def _npz_four_classes(path):
    """A MedMNIST-layout file with 4 classes (the demo's 3 plus its images flipped upside down)."""
    arrays = {}
    for split, n, seed in (("train", 48, 1), ("val", 24, 2), ("test", 24, 3)):
        images, labels = synthetic_xrays(n, seed, size=32)
        flipped = [im[::-1] for im in images[: n // 3]]
        arrays[f"{split}_images"] = np.stack(images + flipped)
        arrays[f"{split}_labels"] = np.array(labels + [3] * len(flipped))[:, None]
    np.savez(path, **arrays)


def test_base_to_novel(tmp_path):
    data = str(tmp_path / "four.npz")
    _npz_four_classes(data)
    out = str(tmp_path / "b2n")
    assert main(["--data", data, "--methods", "zeroshot,linear-probe", "--shots", "2", "--seeds", "1",
                 "--base-to-novel", "--out", out]) == 0
    rows = {r["method"]: r for r in _rows(out)}
    assert list(rows["zeroshot"])[-3:] == compare.B2N_COLUMNS
    zs = rows["zeroshot"]
    base, novel = float(zs["base_accuracy"]), float(zs["novel_accuracy"])
    assert float(zs["harmonic_mean"]) == pytest.approx(0 if base + novel == 0 else 2 * base * novel / (base + novel))
    assert rows["linear-probe"]["novel_accuracy"] == "" and rows["linear-probe"]["harmonic_mean"] == ""
    assert "## Harmonic mean" in open(os.path.join(out, "results.md")).read()


@pytest.mark.parametrize("argv, flag", [
    (["--shots", "0"], "--shots"),
    (["--shots", "1,x"], "--shots"),
    (["--seeds", "one"], "--seeds"),
    (["--methods", "zeroshot,clip-lora"], "--methods"),
    (["--max-steps", "0"], "--max-steps"),
    (["--base-to-novel"], "--base-to-novel"),
    (["--prompt", "no placeholder"], "--prompt"),
    (["--model", "ViT-Q-99"], "--model"),
    (["--device", "tpu:0"], "--device"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, flag):
    # One cheap method and a private --out unless the case sets them itself.
    for name, value in (("--methods", "zeroshot"), ("--out", str(tmp_path / "o"))):
        if name not in argv:
            argv = argv + [name, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["--methods", "zeroshot", "--shots", "1", "--seeds", "1", "--out", out]) == 0
    assert main(["--methods", "zeroshot", "--shots", "1", "--seeds", "1", "--out", out, "--precision", "bf16"]) == 2
    assert "--out" in capsys.readouterr().err
