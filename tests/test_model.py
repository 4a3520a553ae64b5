"""NearlCLIP over open_clip: exactness at init, parameter budget, modes, freezing, errors."""

import open_clip
import pytest
import torch

from helpers import CLASSES, images_for, make_model, perturb_adapters
from nearl_kernels.oca.reference import oca_reference
from nearl_model import NearlCLIP, NearlConfig, class_prompts, tokenize_prompts


def _openclip_features(model, images, prompts):
    full_tokens = open_clip.tokenize(prompts)  # the backbone's own 77-token path
    with torch.no_grad():
        return model.clip.encode_image(images, normalize=True), model.clip.encode_text(full_tokens, normalize=True)


@pytest.mark.parametrize("mode", ["paired", "shared"])
@pytest.mark.parametrize("backbone", ["nearl-tiny", "ViT-B-32"])
def test_init_reproduces_frozen_clip(backbone, mode):
    torch.manual_seed(0)
    model = NearlCLIP.from_pretrained(backbone, config=NearlConfig(mode=mode), fused=False)
    prompts = class_prompts(CLASSES, "a chest X-ray showing {}.")
    texts = tokenize_prompts(prompts)
    images = images_for(model, batch=2)
    with torch.no_grad():
        img_f, txt_f = model.encode(images, texts)
    ref_img, ref_txt = _openclip_features(model, images, prompts)
    assert (img_f - ref_img).abs().max() <= 1e-5
    if mode == "paired":
        assert txt_f.shape == (2, len(CLASSES), ref_txt.shape[-1])
        assert (txt_f - ref_txt.unsqueeze(0)).abs().max() <= 1e-5
    else:
        assert txt_f.shape == ref_txt.shape
        assert (txt_f - ref_txt).abs().max() <= 1e-5


def test_fused_is_the_default_as_in_the_clis():
    assert NearlCLIP.from_pretrained("nearl-tiny").fused is True
    assert NearlCLIP(make_model().clip).fused is True


def test_default_budget_on_vit_b16():
    model = NearlCLIP.from_pretrained("ViT-B-16")
    n = model.num_trainable_parameters()
    assert abs(n - 1.46e6) <= 0.05 * 1.46e6, n
    assert n == sum(p.numel() for p in model.adapters.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in model.clip.parameters())


def test_vit_l14_block_mapping():
    model = NearlCLIP.from_pretrained("ViT-L-14")
    assert model.n_layers == 12
    assert model.image_schedule == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    assert model.text_schedule == list(range(12))


def test_backbone_stays_eval_and_one_step_changes_only_adapters(texts):
    model = perturb_adapters(make_model())
    model.train()
    assert model.training and not model.clip.training
    assert all(not m.training for m in model.clip.modules())
    before_clip = {k: v.clone() for k, v in model.clip.state_dict().items()}
    before_ad = {k: v.clone() for k, v in model.adapters.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = model.loss(images_for(model), texts, torch.tensor([0, 2]))
    loss.backward()
    opt.step()
    assert all(torch.equal(v, model.clip.state_dict()[k]) for k, v in before_clip.items())
    changed = [k for k, v in before_ad.items() if not torch.equal(v, model.adapters.state_dict()[k])]
    frozen = {k for k in before_ad if k.endswith("s_incr")}
    assert set(changed) == set(before_ad) - frozen


@pytest.mark.parametrize("mode", ["paired", "shared"])
def test_gradients_reach_every_adapter_parameter(texts, mode):
    model = perturb_adapters(make_model(mode=mode, train_incremental=True))
    loss, _ = model.loss(images_for(model), texts, torch.tensor([1, 0]))
    loss.backward()
    for name, p in model.adapters.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_paired_text_depends_on_image_shared_does_not(texts):
    paired = perturb_adapters(make_model("paired"))
    shared = perturb_adapters(make_model("shared"))
    a, b = images_for(paired, seed=1), images_for(paired, seed=2)
    with torch.no_grad():
        _, tp_a = paired.encode(a, texts)
        _, tp_b = paired.encode(b, texts)
        _, ts_a = shared.encode(a, texts)
        _, ts_b = shared.encode(b, texts)
    assert tp_a.shape == (2, len(CLASSES), 64) and ts_a.shape == (len(CLASSES), 64)
    assert (tp_a - tp_b).abs().max() > 1e-4
    assert torch.equal(ts_a, ts_b)
    # A text feature in paired mode depends on its own image only.
    with torch.no_grad():
        _, mixed = paired.encode(torch.cat([a[:1], b[1:]]), texts)
    assert torch.allclose(mixed[0], tp_a[0], atol=1e-6) and torch.allclose(mixed[1], tp_b[1], atol=1e-6)


@pytest.mark.parametrize("constraint", ["project", "penalty"])
def test_shared_text_computed_once_gives_the_models_features(texts, constraint):
    # Shared mode splits into what depends on the prompts alone (computed once, an exported package's
    # constants) and the image path; together they are the model. In float64 the two orders of the same
    # sums agree to rounding (~1e-16 per operation); 1e-10 leaves every depth of this model room.
    model = perturb_adapters(make_model("shared", oca_constraint=constraint)).double()
    images = images_for(model, batch=3).double()
    with torch.no_grad():
        img_f, txt_f, _ = model._features(images, texts)
        ctx, valid, txt_once = model.shared_text(texts)
        img_once = model.image_features(images, ctx, valid)
    K, n = texts.shape
    assert ctx.shape == (model.n_layers, K * n, model.config.r) and valid.shape == (K * n,)
    assert valid.dtype == torch.bool
    torch.testing.assert_close(txt_once, txt_f, rtol=0, atol=1e-10)
    torch.testing.assert_close(img_once, img_f, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="mode='shared'"):
        make_model("paired").shared_text(texts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_oca_update_is_orthogonal_to_input(dtype):
    torch.manual_seed(0)
    G, L, d, r, M = 3, 50, 96, 32, 16
    x = (torch.randn(G, L, d) * 3).to(dtype)
    h = torch.randn(G, L, r).to(dtype)
    z = torch.randn(G, M, r)
    w = dict(w_k=torch.randn(r, r), w_v=torch.randn(r, r), w_up=torch.randn(r, d), b_up=torch.randn(d))
    y = oca_reference(x, h, z, **w, s_novel=torch.tensor(0.7), s_incr=torch.tensor(0.0))
    assert y.dtype == dtype
    upd = y.float() - x.float()
    cos = (upd * x.float()).sum(-1) / (upd.norm(dim=-1) * x.float().norm(dim=-1))
    # bf16 output rounding of y leaves at most ~2^-8 of |x| in any direction.
    assert cos.abs().max() < (1e-5 if dtype == torch.float32 else 0.05)
    assert upd.norm(dim=-1).min() > 0


def test_penalty_mode_trains_with_its_term(texts):
    model = perturb_adapters(make_model(oca_constraint="penalty"))
    loss, logits = model.loss(images_for(model), texts, torch.tensor([0, 1]))
    plain = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    assert loss > plain
    loss.backward()
    assert model.adapters.oca_image[0].w_down.grad.abs().sum() > 0


def test_bad_inputs_get_clear_errors(texts):
    model = make_model()
    good = images_for(model)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 64, 64\); got \(2, 3, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32), texts)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 64, 64\); got \(2, 1, 64, 64\)"):
        model(torch.randn(2, 1, 64, 64), texts)
    with pytest.raises(TypeError, match="images must be a float tensor"):
        model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), texts)
    with pytest.raises(TypeError, match="texts must be token ids"):
        model(good, texts.float())
    with pytest.raises(ValueError, match="context is 77"):
        model(good, torch.ones(2, 80, dtype=torch.long))
    with pytest.raises(ValueError, match="K >= 1"):
        model(good, torch.ones(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty list"):
        tokenize_prompts([])
    with pytest.raises(ValueError, match="non-empty list"):
        class_prompts([])
    with pytest.raises(ValueError, match="positions \\[1\\]"):
        tokenize_prompts(["a chest X-ray", "  "])
    with pytest.raises(TypeError, match="unsupported image tower"):
        NearlCLIP(torch.nn.Linear(2, 2))


def test_config_json_round_trip_and_validation():
    cfg = NearlConfig(r=16, n_heads=4, mode="shared", oca_constraint="penalty", ffn_ratio=2)
    assert NearlConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="multiple of n_heads"):
        NearlConfig(r=30, n_heads=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        NearlConfig(mode="both")
    with pytest.raises(ValueError, match="unknown NearlConfig fields"):
        NearlConfig.from_dict({"rank": 4})


def test_tokenize_truncates_to_longest_prompt_exactly(texts):
    full = open_clip.tokenize(class_prompts(CLASSES, "a chest X-ray showing {}."))
    n = texts.shape[1]
    assert torch.equal(full[:, :n], texts) and (full[:, n:] == 0).all()
    assert (texts[:, -1] != 0).any()
