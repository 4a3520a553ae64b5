"""Adapter-only checkpoints and backbone loading: round trips and clear failures."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from helpers import images_for, make_model, perturb_adapters
from nearl_model import NearlCLIP, NearlConfig, adapter_config, create_clip


def test_round_trip_reproduces_logits_bit_for_bit(tmp_path, texts):
    src = perturb_adapters(make_model(seed=0, r=16, n_heads=2), seed=3)
    path = tmp_path / "adapter.safetensors"
    src.save_adapter(str(path))
    dst = make_model(seed=0, r=16, n_heads=2)
    dst.clip.load_state_dict(src.clip.state_dict())
    dst.load_adapter(str(path))
    images = images_for(src)
    with torch.no_grad():
        assert torch.equal(src(images, texts), dst(images, texts))
    assert adapter_config(str(path)) == src.config
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]


def test_mismatched_shapes_are_named(tmp_path):
    path = str(tmp_path / "a.safetensors")
    make_model(r=16).save_adapter(path)
    with pytest.raises(ValueError, match=r"r: file 16 vs model 32"):
        make_model(r=32).load_adapter(path)
    with pytest.raises(ValueError, match=r"n_queries: file 16 vs model 8"):
        make_model(r=16, n_queries=8).load_adapter(path)


def test_bad_files_get_clear_errors(tmp_path):
    model = make_model()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.load_adapter(str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors adapter"):
        model.load_adapter(str(junk))
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a NEARL adapter"):
        model.load_adapter(str(other))


def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    model = perturb_adapters(make_model())
    path = str(tmp_path / "adapter.safetensors")
    model.save_adapter(path)
    before = open(path, "rb").read()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("nearl_model.adapter_io.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter(path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


def test_offline_pretrained_tag_says_how_to_pass_a_file():
    with pytest.raises(RuntimeError, match="pass its local path"):
        create_clip("ViT-B-32", pretrained="openai")


def test_unknown_model_and_missing_checkpoint():
    with pytest.raises(ValueError, match="unknown model 'ViT-B-99'"):
        create_clip("ViT-B-99")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_clip("ViT-B-32", pretrained="/nonexistent/open_clip_pytorch_model.bin")


def test_local_checkpoint_and_json_config_load(tmp_path, texts):
    src = make_model(seed=5)
    ckpt = tmp_path / "tiny.pt"
    torch.save(src.clip.state_dict(), ckpt)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model_cfg": __import__("nearl_model").TINY_CLIP_CONFIG}))
    torch.manual_seed(99)
    loaded = NearlCLIP.from_pretrained(str(cfg), pretrained=str(ckpt), config=NearlConfig())
    for k, v in src.clip.state_dict().items():
        assert torch.equal(v, loaded.clip.state_dict()[k]), k
