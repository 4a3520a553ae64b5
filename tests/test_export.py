"""Issue 18: a trained run exported to one AOTInductor package that runs without nearl, in Python and in
cpp/nearl_classify, with the Python model's outputs.

One tiny run per mode is trained and exported once per session (AOTInductor takes about a minute on 2
cores), and the classifier is built once (or taken from CTest's build through NEARL_CLASSIFY).
"""

import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import fails, kernels_not_interpreted, reference_kernels, tiny_config, write_image_folder  # noqa: F401 (autouse fixture)
from nearl_model import export, predict
from nearl_model.data import LabeledImages
from nearl_model.data.images import file_digest
from nearl_model.loading import load_trained
from nearl_model.train import main as train

REPO = pathlib.Path(__file__).resolve().parent.parent
FAST = ["--batch-size", "4", "--lr", "5e-3", "--seed", "3", "--epochs", "1", "--max-steps", "1", "--no-fused"]
# The bound: logits are logit_scale * cos (scale 1/0.07 here) from fp32 maths whose kernels Inductor
# reorders; measured differences are about 1e-6.
LOGIT_TOL = 1e-5


def _train(root: pathlib.Path, mode: str) -> pathlib.Path:
    data = write_image_folder(root / "data", n_per_class=4)
    # Two blocks per tower: nearl-tiny's shapes, half the graph for AOTInductor to compile.
    model = root / "tiny-2.json"
    model.write_text(json.dumps(tiny_config(2)))
    out = root / "run"
    with reference_kernels():
        assert train(["--data", str(data), "--model", str(model), "--out", str(out), "--mode", mode, *FAST]) == 0
    return out


def _export(run: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    assert export.main(["--run", str(run), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def paired_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("paired"), "paired")


@pytest.fixture(scope="session")
def paired(paired_run):
    """(run directory, package) of a tiny paired-mode run."""
    return paired_run, _export(paired_run, paired_run.parent / "model.pt2")


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    run = _train(root, "shared")
    return run, _export(run, root / "model.pt2")


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """A folder of the kinds a user brings: grey, RGB, RGBA, 16-bit grey PNGs, another size, grey and RGB JPEGs."""
    folder = tmp_path_factory.mktemp("images")
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 256, (64, 64), dtype=np.uint8)).save(folder / "grey.png")
    Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(g.integers(0, 256, (64, 64, 4), dtype=np.uint8)).save(folder / "rgba.png")
    Image.fromarray(g.integers(0, 65536, (64, 64), dtype=np.uint16)).save(folder / "grey16.png")
    Image.fromarray(g.integers(0, 256, (100, 70, 3), dtype=np.uint8)).save(folder / "resized.png")
    Image.fromarray(g.integers(0, 256, (64, 64), dtype=np.uint8)).save(folder / "grey.jpg", quality=95)
    Image.fromarray(g.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(folder / "rgb.jpeg", quality=95)
    return folder


def image_files(folder):
    # nearl_classify lists a folder in byte order of its paths.
    return sorted(str(p) for p in folder.iterdir())


def python_outputs(run, files):
    """(logits, probabilities) of the Python model (reference maths) on ``files``, preprocessed as predict does."""
    model, _, texts = load_trained(str(run / "adapter.safetensors"), fused=False)
    batch = torch.stack([x for x, _ in LabeledImages(files, [0] * len(files), model.image_size[0])])
    with torch.no_grad():
        logits = model(batch, texts).float()
    return logits, logits.softmax(-1)


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """cpp/nearl_classify: CTest's build when it runs these tests, else built here once."""
    given = os.environ.get("NEARL_CLASSIFY")
    if given:
        return given
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building cpp/nearl_classify needs {missing} on PATH")
    build = tmp_path_factory.mktemp("build")
    configure = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"],
                               capture_output=True, text=True)
    assert configure.returncode == 0, configure.stderr
    if "nearl_classify is not built" in configure.stderr:
        pytest.skip(configure.stderr.strip().splitlines()[-1])
    built = subprocess.run(["cmake", "--build", str(build), "--target", "nearl_classify", "-j", "2"],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return str(build / "cpp" / "nearl_classify")


def classify(binary, *args):
    return subprocess.run([binary, *map(str, args)], capture_output=True, text=True)


# ---- the package in Python --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["paired", "shared"])
def test_package_matches_the_python_model(which, request, images):
    run, package = request.getfixturevalue(which)
    files = image_files(images)
    want_logits, want_probs = python_outputs(run, files)
    loaded = torch._inductor.aoti_load_package(str(package))
    batch = torch.stack([x for x, _ in LabeledImages(files, [0] * len(files), 64)])
    logits, probs = loaded(batch)
    assert logits.shape == (len(files), 2) and probs.shape == (len(files), 2)
    assert (logits - want_logits).abs().max() <= LOGIT_TOL
    assert (probs - want_probs).abs().max() <= LOGIT_TOL
    # The batch dimension is dynamic: one image gives that image's row.
    one, _ = loaded(batch[:1])
    assert (one - want_logits[:1]).abs().max() <= LOGIT_TOL


def test_shared_package_runs_only_the_image_tower(shared, paired):
    # Shared mode: the text side depends on the prompts alone, so export computes it once and the package
    # holds its results (the text context per interaction layer, the text features), not the text tower:
    # no text block, embedding or text OCA weight is in it. A paired package runs its text tower per image.
    fqns = {which: set(torch._inductor.aoti_load_package(str(pkg)).loader.get_constant_fqns())
            for which, (_, pkg) in (("shared", shared), ("paired", paired))}
    text_side = ("model.clip.token_embedding", "model.clip.transformer.", "model.clip.ln_final",
                 "model.clip.text_projection", "model.adapters.oca_text.")
    held = {which: sorted(f for f in names if f.startswith(text_side)) for which, names in fqns.items()}
    assert held["shared"] == [], held["shared"]
    assert "model.clip.token_embedding.weight" in held["paired"]
    assert any(f.startswith("model.adapters.oca_text.") for f in held["paired"])
    assert {"text_ctx", "text_features"} <= fqns["shared"]
    assert any(f.startswith("model.clip.visual.") for f in fqns["shared"])


def test_json_beside_the_package_records_what_a_loader_needs(paired):
    run, package = paired
    info = json.loads(package.with_suffix(".json").read_text())
    record = LabeledImages([], [])
    assert info["classes"] == ["normal", "pneumonia"] and info["image_size"] == [64, 64]
    assert info["mean"] == list(record.mean) and info["std"] == list(record.std)
    assert info["adapter"]["sha256"] == file_digest(str(run / "adapter.safetensors"))
    assert len(info["backbone"]["sha256"]) == 64 and info["torch"] == torch.__version__
    assert info["device"] == "cpu" and info["kernels"] == "reference" and info["batch"] == {"min": 1, "max": 64}
    meta = torch._inductor.aoti_load_package(str(package)).get_metadata()
    assert meta["nearl.classes"].split("\n") == info["classes"] and meta["nearl.image_size"] == "64,64"
    assert [float(v) for v in meta["nearl.mean"].split(",")] == info["mean"]


NO_NEARL = r"""
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("nearl_model", "nearl_kernels"):
            raise ImportError(f"{name} is blocked in this process")

sys.meta_path.insert(0, Blocked())
import torch

package = torch._inductor.aoti_load_package(sys.argv[1])
logits, probs = package(torch.load(sys.argv[2]))
assert not [m for m in sys.modules if m.split(".")[0] in ("nearl_model", "nearl_kernels")]
print(json.dumps(logits.tolist()))
"""


def test_package_loads_where_nearl_cannot_be_imported(paired, images, tmp_path):
    run, package = paired
    files = image_files(images)
    batch = torch.stack([x for x, _ in LabeledImages(files, [0] * len(files), 64)])
    torch.save(batch, tmp_path / "batch.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -I: no PYTHONPATH, no user site, not the working directory; the finder blocks an installed nearl too.
    done = subprocess.run([sys.executable, "-I", "-c", NO_NEARL, str(package), str(tmp_path / "batch.pt")],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    want, _ = python_outputs(run, files)
    assert (torch.tensor(json.loads(done.stdout)) - want).abs().max() <= LOGIT_TOL


# ---- the C++ classifier -----------------------------------------------------------------------------------


def test_cpp_classifier_matches_predict(paired, images, classifier, capsys):
    run, package = paired
    files = image_files(images)
    done = classify(classifier, "--json", package, images)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert [r["path"] for r in out["images"]] == files and out["classes"] == ["normal", "pneumonia"]
    want_logits, want_probs = python_outputs(run, files)
    assert (torch.tensor([r["logits"] for r in out["images"]]) - want_logits).abs().max() <= LOGIT_TOL
    assert (torch.tensor([r["probabilities"] for r in out["images"]]) - want_probs).abs().max() <= LOGIT_TOL

    assert predict.main(["--adapter", str(run / "adapter.safetensors"), *files]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    lines = classify(classifier, package, *files)
    assert lines.returncode == 0, lines.stderr
    # predict and the classifier print the same "path: class (probability)" line per image.
    for mine, theirs in zip(lines.stdout.splitlines(), printed, strict=True):
        path, rest = mine.rsplit(": ", 1)
        their_path, their_rest = theirs.rsplit(": ", 1)
        assert path == their_path and rest.split(" (")[0] == their_rest.split(" (")[0]
        assert abs(float(rest.split("(")[1][:-1]) - float(their_rest.split("(")[1][:-1])) <= 1e-3


@pytest.mark.parametrize("case", ["missing image", "not an image", "no package", "not a package",
                                  "not a nearl package", "empty folder"])
def test_cpp_classifier_refuses_bad_input_in_one_line(case, paired, images, classifier, tmp_path, request):
    _, package = paired
    image = image_files(images)[0]
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip archive")
    (tmp_path / "empty").mkdir()
    args, needle = {
        "missing image": ((package, tmp_path / "gone.png"), "does not exist"),
        "not an image": ((package, tmp_path / "notes.txt"), "reads .png, .jpg and .jpeg"),
        "no package": ((tmp_path / "gone.pt2", image), "does not exist"),
        "not a package": ((tmp_path / "junk.pt2", image), "not a readable AOTInductor package"),
        "not a nearl package": ((request.getfixturevalue("foreign_package") if case == "not a nearl package" else None,
                                 image), "was not written by"),
        "empty folder": ((package, tmp_path / "empty"), "holds no .png"),
    }[case]
    done = classify(classifier, *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and needle in done.stderr and done.stderr.count("\n") == 1, done.stderr


@pytest.fixture(scope="session")
def foreign_package(tmp_path_factory):
    """An AOTInductor package nearl did not write: it has none of nearl's metadata."""
    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2

    path = tmp_path_factory.mktemp("foreign") / "double.pt2"
    torch._inductor.aoti_compile_and_package(torch.export.export(Double(), (torch.ones(2),)), package_path=str(path))
    return path


# ---- the export CLI's refusals ----------------------------------------------------------------------------


def test_export_refuses_a_missing_or_unfinished_run(tmp_path, paired_run, capsys):
    run = paired_run
    out = str(tmp_path / "m.pt2")
    fails(["--run", str(tmp_path / "gone"), "--out", out], capsys, "does not exist", cli=export.main)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "adapter.safetensors", unfinished)
    fails(["--run", str(unfinished), "--out", out], capsys, "has not finished", cli=export.main)
    fails(["--run", str(tmp_path), "--out", out], capsys, "holds no adapter.safetensors", cli=export.main)
    fails(["--run", str(run), "--out", str(tmp_path / "m.zip")], capsys, "must end in .pt2", cli=export.main)
    fails(["--run", str(run), "--out", out, "--classes", "normal,effusion"], capsys, "did not train on",
          cli=export.main)
    assert os.listdir(unfinished) == ["adapter.safetensors"] and not os.path.exists(out)


def test_export_refuses_a_diverged_run(tmp_path, paired_run, capsys):
    run = paired_run
    bad = tmp_path / "diverged"
    shutil.copytree(run, bad)
    with safe_open(str(run / "adapter.safetensors"), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(bad / "adapter.safetensors"), metadata=metadata)
    fails(["--run", str(bad), "--out", str(tmp_path / "m.pt2")], capsys, "NaN or inf", cli=export.main)
    assert not (tmp_path / "m.pt2").exists() and not (tmp_path / "m.json").exists()


def test_export_refuses_to_write_over_a_package(paired, capsys):
    run, package = paired
    before = package.read_bytes()
    fails(["--run", str(run), "--out", str(package)], capsys, "already exists", cli=export.main)
    assert package.read_bytes() == before


@torch.library.custom_op("nearl_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def test_export_names_the_operator_torch_export_refuses(paired_run, monkeypatch, tmp_path, capsys):
    # An image tower that calls an operator with no shape (fake) implementation: torch.export cannot trace it.
    from nearl_model.towers import OpenClipViT

    head = OpenClipViT.head
    monkeypatch.setattr(OpenClipViT, "head", lambda self, x: _opaque(head(self, x)))
    run = paired_run
    err = fails(["--run", str(run), "--out", str(tmp_path / "m.pt2")], capsys, "torch.export cannot capture",
                cli=export.main)
    assert "nearl_test" in err and "opaque" in err, err
    assert not (tmp_path / "m.pt2").exists()


# ---- the fused kernels in a CUDA package; loading without import cycles -----------------------------------


FAKE_CUDA_EXPORT = r"""
import collections, json, sys
import torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from helpers import make_model
from nearl_model import class_prompts, tokenize_prompts
from nearl_model.export import Classifier

report = {}
for mode in ("paired", "shared"):
    model = make_model(mode=mode, fused=True).eval()
    texts = tokenize_prompts(class_prompts(["a", "b", "c"], "a photo of {}."))
    classifier = Classifier(model, texts)  # shared mode computes its text side here, on the CPU
    # Fake CUDA tensors: shapes and devices only, so this runs without a GPU.
    with FakeTensorMode(allow_non_fake_inputs=True):
        program = torch.export.export(classifier.to("cuda"),
                                      (torch.zeros(2, 3, *model.image_size, device="cuda"),))
        ops = collections.Counter(str(n.target) for n in program.graph.nodes if "nearl" in str(n.target))
        lowered = program.run_decompositions(decompose_custom_triton_ops=True)
    kernels = collections.Counter(kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
                                  for n in lowered.graph.nodes if "triton_kernel_wrapper" in str(n.target))
    left = [str(n.target) for n in lowered.graph.nodes if "nearl" in str(n.target)]
    report[mode] = {"ops": ops, "kernels": kernels, "left": left, "layers": model.n_layers}
print(json.dumps(report))
"""


def test_cuda_export_carries_the_triton_kernels():
    # What AOTInductor lowers for a CUDA package: every nearl op decomposed into the Triton kernel launches
    # it makes (triton_op + wrap_triton), not an opaque Python call. Kernels are compiled (not
    # interpreted) here, so this runs in its own process with TRITON_INTERPRET=0.
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    done = subprocess.run([sys.executable, "-c", FAKE_CUDA_EXPORT], capture_output=True, text=True, env=env,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    for mode, r in report.items():
        layers = r["layers"]
        # Paired: an image and a text OCA per layer. Shared: the text side was computed at export, so the
        # package holds only the image OCAs.
        ocas = 2 * layers if mode == "paired" else layers
        assert r["ops"] == {"nearl.synergy_fwd.default": layers, "nearl.oca_fwd.default": ocas}, mode
        # The USEformer forward is two launches: a split over context, then the combine of its partials.
        assert r["kernels"] == {"synergy_fwd_split_kernel": layers, "synergy_fwd_combine_kernel": layers,
                                "oca_fwd_kernel": ocas}, mode
        assert r["left"] == [], mode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA package is built and run on a CUDA GPU")
def test_cuda_package_carries_the_fused_kernels_and_matches_the_model(paired_run, images, tmp_path):
    out = tmp_path / "cuda.pt2"
    assert export.main(["--run", str(paired_run), "--out", str(out), "--device", "cuda"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["kernels"] == "triton"
    files = image_files(images)
    model, _, texts = load_trained(str(paired_run / "adapter.safetensors"), fused=True)
    model, texts = model.cuda(), texts.cuda()
    batch = torch.stack([x for x, _ in LabeledImages(files, [0] * len(files), 64)]).cuda()
    with torch.no_grad():
        want = model(batch, texts).float()
    logits, _ = torch._inductor.aoti_load_package(str(out))(batch)
    assert (logits - want).abs().max() <= LOGIT_TOL


def test_cpu_export_carries_the_reference_maths(monkeypatch):
    # On CPU the same ops decompose into the reference's aten ops: nothing of nearl is left to call.
    from helpers import make_model, perturb_adapters

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = perturb_adapters(make_model(fused=True))

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.oca = model.adapters.useformer[0], model.adapters.oca_image[0]

        def forward(self, x, z, ctx, mask):
            z = self.block(z, ctx, mask, fused=True)
            return self.oca(x, self.oca.down(x), z, 1, model.config.eps, True)

    r, d = model.config.r, model.image_tower.width
    args = (torch.randn(2, 5, d), model.adapters.z0.detach().expand(2, -1, -1).clone(), torch.randn(2, 9, r),
            torch.ones(2, 9, dtype=torch.bool))
    layer = Layer().eval()
    with torch.no_grad():
        program = torch.export.export(layer, args)
    assert {"nearl.synergy_fwd.default", "nearl.oca_fwd.default"} <= {str(n.target) for n in program.graph.nodes}
    lowered = program.run_decompositions(decompose_custom_triton_ops=True)
    targets = {str(n.target) for n in lowered.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "nearl" in t or "triton" in t], targets
    with torch.no_grad():
        torch.testing.assert_close(lowered.module()(*args), layer(*args))


def test_nearl_model_has_no_import_cycles():
    # Loading a run once needed adapter_io -> clip -> adapter_io; every import, at any depth, counts.
    root = REPO / "nearl_model"
    graph = {}
    for path in root.rglob("*.py"):
        parts = path.with_suffix("").relative_to(REPO).parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                deps.add(".".join(base + ([node.module] if node.module else [])))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nearl_model"):
                deps.add(node.module)
        graph[module] = deps
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    cycles.append(trail + [start])
                elif dep in graph and dep not in seen:
                    seen.add(dep)
                    stack.append((dep, trail + [dep]))
    assert not cycles, cycles
