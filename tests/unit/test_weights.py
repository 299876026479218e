"""Foreign weights (timm, official JAX .npz, Hugging Face) and our safetensors checkpoint format.

Parity is checked against real timm models (random init): same logits from our model on converted weights. The
npz layout is checked independently through timm's own official-checkpoint loader; the HF layout through a key
mapping written out by hand here from the `transformers` ViT naming."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.cli import main as cli
from pipeline.model import ModelConfig, build_model
from pipeline.model.checkpoint import load_checkpoint, load_model, save_checkpoint
from pipeline.model.weights import (
    adapt_state_dict,
    convert_state_dict,
    export_state_dict,
    infer_config,
    read_weights,
    save_npz,
)

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from timm.models.vision_transformer import _load_weights

PICO = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)


def _timm_pico(**kw) -> TimmViT:
    torch.manual_seed(1)
    return TimmViT(**{**PICO, **kw}).eval()


def _pico_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"name": "vit_pico4", "image_size": 32, "num_classes": 10, **kw})


def _ours_from(sd, source, cfg):
    with torch.device("meta"):  # no point initialising weights that are about to be replaced
        model = build_model(cfg).eval()
    model.load_state_dict(convert_state_dict(sd, source, cfg), assign=True)
    return model


def _assert_same_logits(a, b, x):
    with torch.no_grad():
        la, lb = a(x), b(x)
    assert la.shape == lb.shape
    assert (la - lb).abs().max().item() < 1e-4


@pytest.mark.parametrize("timm_name,kwargs,cfg", [
    ("vit_small_patch16_224", {}, ModelConfig(name="vit_s16")),
    ("vit_base_patch16_224", {}, ModelConfig(name="vit_b16")),
    # our "gap" = the original JAX gap: no [class] token, final LayerNorm, then mean over patches
    ("vit_small_patch16_224", dict(class_token=False, global_pool="avg", fc_norm=False),
     ModelConfig(name="vit_s16", classifier="gap")),
])
def test_timm_parity(timm_name, kwargs, cfg):
    torch.manual_seed(0)
    theirs = timm.create_model(timm_name, num_classes=1000, **kwargs).eval()
    ours = _ours_from(theirs.state_dict(), "timm", cfg)
    x = torch.randn(2, 3, 224, 224)
    _assert_same_logits(ours, theirs, x)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_head(theirs.forward_features(x),
                                                                                   pre_logits=True))


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_npz_official_layout_loads_in_timm_and_round_trips(tmp_path, classifier):
    kw = dict(class_token=False, global_pool="avg", fc_norm=False) if classifier == "gap" else {}
    reference = _timm_pico(**kw)
    cfg = _pico_cfg(classifier=classifier)
    ours = _ours_from(reference.state_dict(), "timm", cfg)
    path = tmp_path / "official.npz"
    save_npz(ours.state_dict(), path, cfg)

    with np.load(path) as z:
        keys = set(z.files)
        assert z["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].shape == (64, 2, 32)
        assert z["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"].shape == (2, 32, 64)
        assert z["embedding/kernel"].shape == (4, 4, 3, 64) and z["head/kernel"].shape == (64, 10)
    assert ("cls" in keys) == (classifier == "token")
    assert "Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias" in keys and "Transformer/encoder_norm/scale" in keys

    # timm's own loader for official checkpoints reads our file into a fresh model: same logits
    fresh = TimmViT(**{**PICO, **kw}).eval()
    _load_weights(fresh, str(path))
    x = torch.randn(2, 3, 32, 32)
    _assert_same_logits(fresh, reference, x)
    # and back: npz -> ours, exactly
    back = convert_state_dict(read_weights(path), "npz", cfg)
    for k, t in ours.state_dict().items():
        torch.testing.assert_close(back[k], t, rtol=0, atol=0, msg=k)


def test_npz_with_pre_logits_and_prefix_round_trips():
    cfg = _pico_cfg(pre_logits=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    exported = export_state_dict(model.state_dict(), "npz", cfg)
    assert exported["pre_logits/kernel"].shape == (64, 32) and exported["head/kernel"].shape == (32, 10)
    wrapped = {f"opt/target/{k}": t.numpy() for k, t in exported.items()}  # as some official files nest them
    back = convert_state_dict(wrapped, "npz", cfg)
    for k, t in model.state_dict().items():
        torch.testing.assert_close(back[k], t, rtol=0, atol=0, msg=k)
    assert infer_config(wrapped, "npz") == cfg


def _hf_by_hand(timm_sd: dict, depth: int) -> dict:
    """The `transformers` ViTForImageClassification layout, written from its module names."""
    out = {
        "vit.embeddings.cls_token": timm_sd["cls_token"],
        "vit.embeddings.position_embeddings": timm_sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": timm_sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": timm_sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": timm_sd["norm.weight"],
        "vit.layernorm.bias": timm_sd["norm.bias"],
        "classifier.weight": timm_sd["head.weight"],
        "classifier.bias": timm_sd["head.bias"],
    }
    for i in range(depth):
        t, h = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = timm_sd[f"{t}attn.qkv.{kind}"].chunk(3)
            out |= {
                f"{h}attention.attention.query.{kind}": q, f"{h}attention.attention.key.{kind}": k,
                f"{h}attention.attention.value.{kind}": v,
                f"{h}attention.output.dense.{kind}": timm_sd[f"{t}attn.proj.{kind}"],
                f"{h}intermediate.dense.{kind}": timm_sd[f"{t}mlp.fc1.{kind}"],
                f"{h}output.dense.{kind}": timm_sd[f"{t}mlp.fc2.{kind}"],
                f"{h}layernorm_before.{kind}": timm_sd[f"{t}norm1.{kind}"],
                f"{h}layernorm_after.{kind}": timm_sd[f"{t}norm2.{kind}"],
            }
    return out


def test_hf_layout_parity_and_round_trip():
    reference = _timm_pico()
    hf = _hf_by_hand(reference.state_dict(), depth=2)
    cfg = infer_config(hf, "hf")
    assert cfg == _pico_cfg()
    ours = _ours_from(hf, "hf", cfg)
    _assert_same_logits(ours, reference, torch.randn(2, 3, 32, 32))
    exported = export_state_dict(ours.state_dict(), "hf", cfg)
    assert exported.keys() == hf.keys()
    for k in hf:
        torch.testing.assert_close(exported[k], hf[k], rtol=0, atol=0, msg=k)
    # a bare ViTModel state dict (no `vit.` prefix, no classifier) imports as a headless model
    bare = {k.removeprefix("vit."): t for k, t in hf.items() if not k.startswith("classifier.")}
    headless = infer_config(bare, "hf")
    assert headless.num_classes == 0
    assert convert_state_dict(bare, "hf", headless).keys() == build_model(headless).state_dict().keys()


def test_mismatches_are_errors_naming_the_key():
    reference = _timm_pico()
    cfg = _pico_cfg()
    sd = reference.state_dict()
    missing = {k: t for k, t in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias"):
        convert_state_dict(missing, "timm", cfg)
    bad = dict(sd, **{"blocks.0.attn.qkv.weight": torch.zeros(190, 64)})
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv\.weight' has shape \[190, 64\], vit_pico4 needs \[192, 64\]"):
        convert_state_dict(bad, "timm", cfg)
    with pytest.raises(ValueError, match=r"unexpected key 'fc_norm.weight' \(timm model pools with fc_norm"):
        convert_state_dict(dict(sd, **{"fc_norm.weight": torch.ones(64)}), "timm", cfg)
    with pytest.raises(ValueError, match="unexpected key 'cls_token'"):
        convert_state_dict(sd, "timm", _pico_cfg(classifier="gap"))
    npz = export_state_dict(convert_state_dict(sd, "timm", cfg), "npz", cfg)
    npz["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel"] = torch.zeros(64, 4, 16)
    with pytest.raises(ValueError, match=r"MultiHeadDotProductAttention_1/key/kernel' has shape \[64, 4, 16\]"):
        convert_state_dict(npz, "npz", cfg)
    with pytest.raises(ValueError, match="unknown weights source 'keras'"):
        convert_state_dict(sd, "keras", cfg)
    with pytest.raises(ValueError, match="classifier='gap' has no hf layout"):
        export_state_dict(build_model(_pico_cfg(classifier="gap")).state_dict(), "hf", _pico_cfg(classifier="gap"))


def test_infer_config_from_every_source():
    cfg = _pico_cfg(pre_logits=32)
    sd = build_model(cfg).state_dict()
    assert infer_config(sd, "timm") == cfg
    assert infer_config(export_state_dict(sd, "npz", cfg), "npz") == cfg
    assert infer_config(export_state_dict(sd, "hf", cfg), "hf") == cfg
    gap = _pico_cfg(classifier="gap", image_size=48)
    assert infer_config(build_model(gap).state_dict(), "timm") == gap
    weird = dict(sd, **{"blocks.0.mlp.fc1.weight": torch.zeros(100, 64)})
    with pytest.raises(ValueError, match="no registered variant has width 64, depth 2, MLP 100, patch 4"):
        infer_config(weird, "timm")


def test_adapt_state_dict_for_fine_tuning():
    cfg = _pico_cfg(pre_logits=32)
    sd = build_model(cfg).state_dict()
    new = ModelConfig(name="vit_pico4", image_size=48, num_classes=3)
    out = adapt_state_dict(sd, cfg, new)
    assert out["pos_embed"].shape == (1, 1 + 144, 64) and "pre_logits.fc.weight" not in out
    assert out["head.weight"].shape == (3, 64) and torch.count_nonzero(out["head.weight"]) == 0
    with pytest.raises(ValueError, match="cannot adapt vit_pico4/token"):
        adapt_state_dict(sd, cfg, new.model_copy(update={"classifier": "gap"}))


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    torch.manual_seed(0)
    model = build_model(_pico_cfg(classifier="gap", pre_logits=16, head_bias_init=-10.0)).eval()
    model.head.weight.data.normal_()
    save_checkpoint(tmp_path / "ck", model, extra={"classes": ["a", "b"]})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["model.json", "model.safetensors"]
    meta = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert meta["model"]["classifier"] == "gap" and meta["model"]["pre_logits"] == 16
    sd, cfg, extra = load_checkpoint(tmp_path / "ck")
    assert cfg == model.cfg and extra == {"classes": ["a", "b"]}
    loaded = load_model(tmp_path / "ck", drop_path_rate=0.1).eval()
    assert loaded.cfg.drop_path_rate == 0.1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # an uncommitted checkpoint (no model.json) and a mismatched one are refused clearly
    (tmp_path / "ck" / "model.json").rename(tmp_path / "model.json")
    with pytest.raises(FileNotFoundError, match="model.json is missing"):
        load_checkpoint(tmp_path / "ck")
    meta["model"]["num_classes"] = 11
    (tmp_path / "ck" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'head.weight' has shape \[10, 16\], vit_pico4 needs \[11, 16\]"):
        load_checkpoint(tmp_path / "ck")


def test_cli_convert_timm_pth_and_npz(tmp_path, capsys):
    reference = _timm_pico()
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "timm.pth")
    assert cli(["model", "convert", "--source", "timm", str(tmp_path / "timm.pth"), str(tmp_path / "a")]) == 0
    assert "wrote" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    _assert_same_logits(load_model(tmp_path / "a").eval(), reference, x)

    cfg = _pico_cfg()
    save_npz(convert_state_dict(reference.state_dict(), "timm", cfg), tmp_path / "w.npz", cfg)
    rc = cli(["model", "convert", "--source", "npz", str(tmp_path / "w.npz"), str(tmp_path / "b"),
              "--name", "vit_pico4", "--image-size", "48", "--num-classes", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "position embedding resampled 32->48 px" in out and "head replaced (10->3 classes" in out
    sd, cfg_b, extra = load_checkpoint(tmp_path / "b")
    assert (cfg_b.image_size, cfg_b.num_classes) == (48, 3) and extra["converted_from"]["source"] == "npz"

    # wrong source: a clear error, exit code 2
    assert cli(["model", "convert", "--source", "hf", str(tmp_path / "timm.pth"), str(tmp_path / "c")]) == 2
    assert "cannot infer the variant" in capsys.readouterr().err


def test_cli_list_and_info(capsys):
    assert cli(["model", "list"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("vit_b16 "))
    assert "86.57M" in row and "35.13" in row and "vit_base_patch16_224" in row
    assert cli(["model", "info", "vit_l16", "--image-size", "384", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "24x24" in out and "577" in out
    assert cli(["model", "info", "vit_l16", "--image-size", "100"]) == 2
