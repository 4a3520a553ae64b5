"""Stacks users install: a kernel that fails to build costs one line, and float64 is the reference's oracle."""

import pytest
import torch
from triton.runtime.errors import OutOfResources
from triton.runtime.interpreter import InterpretedFunction

import nearl_kernels as nk
from helpers import images_for, make_model, perturb_adapters
from nearl_kernels import _dispatch
from nearl_kernels.oca.reference import oca_reference


@pytest.fixture
def failing_build(monkeypatch):
    """Every Triton launch fails the way a kernel over its shared memory does when it is built."""
    if not _dispatch.interpreting():
        pytest.skip("the patched entry point is the interpreter's; this process compiles for a GPU")

    def run(self, *args, **kwargs):
        raise OutOfResources(262_144, 232_448, "shared memory")

    monkeypatch.setattr(InterpretedFunction, "run", run)


def oca_inputs(dtype=torch.float32, G=2, L=7, d=48, r=32, M=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(G, L, d, generator=g)
    t = dict(z=torch.randn(G, M, r, generator=g), w_down=torch.randn(d, r, generator=g) / d ** 0.5,
             b_down=torch.randn(r, generator=g), w_k=torch.randn(r, r, generator=g) / r ** 0.5,
             w_v=torch.randn(r, r, generator=g) / r ** 0.5, w_up=torch.randn(r, d, generator=g) / r ** 0.5,
             b_up=torch.randn(d, generator=g), s_novel=torch.tensor(0.9), s_incr=torch.tensor(0.1))
    return x.to(dtype), {k: v.to(dtype) for k, v in t.items()}


def test_a_kernel_that_does_not_build_is_one_named_error(failing_build):
    x, a = oca_inputs()
    with pytest.raises(nk.KernelBuildError) as info:
        nk.oca(x, *a.values(), fused=True)
    message = str(info.value)
    assert "\n" not in message
    assert "oca_fwd_kernel" in message and f"triton {_dispatch.triton_version()}" in message
    assert f"nearl supports triton {nk.TRITON_RANGE[0]} to {nk.TRITON_RANGE[1]}" in message
    assert "--no-fused" in message and "OutOfResources" in message


def test_the_reference_path_needs_no_kernel_build(failing_build):
    x, a = oca_inputs()
    y, _ = nk.oca(x, *a.values(), fused=False)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_a_run_time_error_is_not_called_a_build_failure(monkeypatch):
    if not _dispatch.interpreting():
        pytest.skip("the patched entry point is the interpreter's")

    def run(self, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(InterpretedFunction, "run", run)
    x, a = oca_inputs()
    with pytest.raises(RuntimeError, match="illegal memory access") as info:
        nk.oca(x, *a.values(), fused=True)
    assert not isinstance(info.value, nk.KernelBuildError)


@pytest.mark.parametrize("version,inside", [("3.3.1", False), ("3.4.0", True), ("3.6.0", True),
                                            ("3.9.0", True), ("3.10.0", False), ("3.9.0+git1234", True)])
def test_supported_range(version, inside):
    assert _dispatch.triton_supported(version) is inside


def test_float64_reference_is_an_oracle_for_the_float32_maths():
    x, a = oca_inputs(torch.float64)
    y64, _ = nk.oca(x, *a.values(), fused=False)
    assert y64.dtype == torch.float64
    # The float64 run computes in float64 (not float32 and back): it differs from a
    # float32 run by float32 rounding, far above float64's.
    y_ref32 = oca_reference(x, nk.oca(x, *a.values(), fused=False)[1], *[a[k] for k in
                            ("z", "w_k", "w_v", "w_up", "b_up", "s_novel", "s_incr")], 2, 1, 1e-6)
    gap = (y64 - y_ref32).abs().max().item()
    assert 0 < gap < 1e-4
    with pytest.raises(TypeError, match=r"oca\(fused=True\) runs float32, bfloat16 or float16"):
        nk.oca(x, *a.values(), fused=True)


@pytest.mark.parametrize("mode", ["paired", "shared"])
def test_nearlclip_double_runs_forward_and_backward_on_the_reference(mode, texts):
    model = perturb_adapters(make_model(mode, fused=False)).double()
    images = images_for(model).double()
    logits = model(images, texts)
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float64 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.fused = True
    with pytest.raises(TypeError, match=r"fused=True\) runs float32, bfloat16 or float16; float64"):
        model(images, texts)


FAST = ["--batch-size", "8", "--seed", "3", "--epochs", "1", "--max-steps", "1"]


def one_error_line(err: str, *needles: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_train_evaluate_and_predict_stop_with_one_line_when_a_kernel_does_not_build(tmp_path, capsys, monkeypatch):
    from helpers import write_image_folder
    from nearl_model import evaluate, predict, train

    if not _dispatch.interpreting():
        pytest.skip("the patched entry point is the interpreter's; this process compiles for a GPU")
    folder = write_image_folder(tmp_path / "xrays", n_per_class=6)
    # A finished run made on the reference maths, so evaluate has something to load.
    assert train.main(["--data", str(folder), "--out", str(tmp_path / "run"), "--no-fused", *FAST]) == 0
    capsys.readouterr()

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: (_ for _ in ()).throw(
        OutOfResources(262_144, 232_448, "shared memory")))
    range_text = f"nearl supports triton {nk.TRITON_RANGE[0]} to {nk.TRITON_RANGE[1]}"
    assert train.main(["--data", str(folder), "--out", str(tmp_path / "fused"), *FAST]) == 2
    one_error_line(capsys.readouterr().err, "did not build", range_text, "--no-fused")
    assert not (tmp_path / "fused" / "summary.json").exists()
    adapter = str(tmp_path / "run" / "adapter.safetensors")
    assert evaluate.main(["--adapter", adapter]) == 2
    one_error_line(capsys.readouterr().err, "did not build", range_text)
    image = str(next(p for p in sorted(folder.rglob("*.png"))))
    assert predict.main(["--adapter", adapter, image]) == 2
    one_error_line(capsys.readouterr().err, "did not build", range_text)
