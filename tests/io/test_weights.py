import json
import os
import warnings

import pytest
import torch

import segformer_fast as sf
from segformer_fast.io.weights import LAYOUTS, BackboneOnlyWarning, export_state_dict

SMALL = dict(depths=(1, 2, 1, 1))


def _model(num_classes=5, **kw):
    return sf.segformer("b0", num_classes=num_classes, backend="torch", **{**SMALL, **kw}).eval()


def _randomise_bn(model):
    with torch.no_grad():
        model.decoder.bn.running_mean.normal_()
        model.decoder.bn.running_var.uniform_(0.5, 2)
        model.decoder.bn.weight.normal_()


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("layout, suffix", [("nvlabs", ".pth"), ("hf4", ".bin"), ("hf5", ".safetensors"),
                                            ("native", ".safetensors")])
def test_round_trip_through_file(tmp_path, layout, suffix):
    src = _model()
    _randomise_bn(src)
    sd = export_state_dict(src, layout)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    elif layout == "nvlabs":  # the original training scripts wrap weights in {"state_dict": ...}, prefixed
        torch.save({"meta": {"epoch": 1}, "state_dict": {("backbone." + k if not k.startswith("decode_head") else k): v
                                                          for k, v in sd.items()}}, path)
    else:
        torch.save(sd, path)
    dst = _model()
    report = sf.load_weights(dst, str(path))
    assert report.layout == layout and report.decoder_loaded
    assert report.loaded == len(dst.state_dict())
    x = torch.randn(1, 3, 64, 96)
    dst.set_layer_norm_eps(src.config.ln_eps)  # compare the weights, not the eps convention
    torch.testing.assert_close(_outputs(dst, x), _outputs(src, x), rtol=0, atol=0)


def test_nvlabs_kv_is_packed_k_then_v():
    src = _model()
    sd = export_state_dict(src, "nvlabs")
    kv = sd["block1.0.attn.kv.weight"]
    c = src.config.hidden_sizes[0]
    attn = src.encoder.stages[0].blocks[0].attn
    assert kv.shape == (2 * c, c)
    torch.testing.assert_close(kv[:c], attn.k.weight)
    torch.testing.assert_close(kv[c:], attn.v.weight)


def test_mmseg_backbone_layout(tmp_path):
    src = _model()
    sd = {"backbone." + k: v for k, v in export_state_dict(src, "mmseg").items()}
    w = sd["backbone.layers.0.1.0.attn.attn.in_proj_weight"]
    assert w.shape == (96, 32)
    assert sd["backbone.layers.0.1.0.ffn.layers.0.weight"].shape == (128, 32, 1, 1)
    torch.save({"state_dict": sd}, tmp_path / "mmseg.pth")
    dst = _model()
    dec_before = {k: v.clone() for k, v in dst.decoder.state_dict().items()}
    with pytest.warns(BackboneOnlyWarning, match="decoder keeps its initialisation"):
        report = sf.load_weights(dst, tmp_path / "mmseg.pth")
    assert report.layout == "mmseg" and not report.decoder_loaded
    assert report.ln_eps == sf.LayerNormEps(1e-6, 1e-6, 1e-6, 1e-6)
    assert dst.encoder.stages[0].patch_embed.norm.eps == 1e-6
    for k, v in dst.encoder.state_dict().items():
        torch.testing.assert_close(v, src.encoder.state_dict()[k])
    for k, v in dst.decoder.state_dict().items():
        torch.testing.assert_close(v, dec_before[k])


def test_mmseg_full_segmentor_head_is_refused_in_strict_mode():
    src = _model()
    sd = {"backbone." + k: v for k, v in export_state_dict(src, "mmseg").items()}
    sd["decode_head.fusion_conv.conv.weight"] = torch.zeros(256, 1024, 1, 1)
    with pytest.raises(sf.CheckpointMismatchError, match="different\\s+function"):
        sf.load_weights(_model(), sd)
    with pytest.warns(BackboneOnlyWarning):
        report = sf.load_weights(_model(), sd, strict=False)
    assert report.unexpected == ["decode_head.fusion_conv.conv.weight"]


@pytest.mark.parametrize("layout", ["hf4", "hf5", "nvlabs"])
def test_backbone_only_checkpoint(layout):
    src = _model()
    sd = export_state_dict(src, layout, backbone_only=True)
    if layout.startswith("hf"):  # nvidia/mit-b0 carries an ImageNet classifier
        sd["classifier.weight"] = torch.zeros(1000, 256)
        sd["classifier.bias"] = torch.zeros(1000)
    dst = _model()
    with pytest.warns(BackboneOnlyWarning):
        report = sf.load_weights(dst, sd)
    assert not report.decoder_loaded
    assert "classifier.weight" in report.ignored or layout == "nvlabs"
    assert "encoder only" in str(report)


def test_layer_norm_eps_follows_the_source():
    src = _model()
    dst = _model()
    sf.load_weights(dst, export_state_dict(src, "hf4"))
    blk = dst.encoder.stages[0].blocks[0]
    assert blk.norm1.eps == 1e-5 and dst.encoder.stages[3].norm.eps == 1e-5
    assert dst.config.ln_eps.block == 1e-5
    sf.load_weights(dst, export_state_dict(src, "nvlabs"))
    assert blk.norm1.eps == 1e-6 and blk.attn.sr_norm.eps == 1e-5
    assert dst.encoder.stages[0].patch_embed.norm.eps == 1e-5 and dst.encoder.stages[0].norm.eps == 1e-6


def test_mismatch_lists_missing_unexpected_and_shapes():
    src = sf.segformer("b0", num_classes=5, backend="torch", depths=(1, 1, 1, 1))
    dst = sf.segformer("b0", num_classes=7, backend="torch", depths=(2, 1, 1, 1))
    with pytest.raises(sf.CheckpointMismatchError) as info:
        sf.load_weights(dst, export_state_dict(src, "hf5"))
    err = info.value
    msg = str(err)
    assert "segformer.stages.0.blocks.1.layernorm_before.weight" in err.missing
    assert any("decoder.classifier.weight: checkpoint (5, 256, 1, 1) vs model (7, 256, 1, 1)" in s
               for s in err.shape_conflicts)
    assert "missing keys" in msg and "shape conflicts" in msg

    extra = export_state_dict(src, "hf5")
    extra["segformer.stages.0.blocks.7.mlp.fc1.weight"] = torch.zeros(1)
    with pytest.raises(sf.CheckpointMismatchError, match="unexpected keys") as info:
        sf.load_weights(_model(num_classes=5, depths=(1, 1, 1, 1)), extra)
    assert info.value.unexpected == ["segformer.stages.0.blocks.7.mlp.fc1.weight"]


def test_non_strict_loads_what_fits():
    src = sf.segformer("b0", num_classes=5, backend="torch", depths=(1, 1, 1, 1))
    dst = sf.segformer("b0", num_classes=7, backend="torch", depths=(1, 1, 1, 1))
    report = sf.load_weights(dst, export_state_dict(src, "hf4"), strict=False)
    assert len(report.shape_conflicts) == 2  # classifier weight and bias
    torch.testing.assert_close(dst.decoder.fuse.weight, src.decoder.fuse.weight)


def test_bad_sources():
    model = _model()
    with pytest.raises(FileNotFoundError):
        sf.load_weights(model, "/nonexistent/weights.safetensors")
    with pytest.raises(TypeError, match="cannot read weights from a int"):
        sf.load_weights(model, 3)
    with pytest.raises(ValueError, match="cannot tell the checkpoint's layout"):
        sf.load_weights(model, {"foo.weight": torch.zeros(1)})
    sd = export_state_dict(model, "hf5")
    sd["segformer.stages.0.layer_norm.weight"] = sd["segformer.stages.0.layer_norm.weight"].long()
    with pytest.raises(TypeError, match="non-float dtype torch.int64"):
        sf.load_weights(model, sd)
    with pytest.raises(TypeError, match="needs a segformer_fast.SegFormer"):
        sf.load_weights(torch.nn.Linear(2, 2), sd)


def test_save_weights_atomic_and_from_pretrained(tmp_path, monkeypatch):
    src = _model(ln_eps={"block": 1e-5})
    _randomise_bn(src)
    path = tmp_path / "model.safetensors"
    sf.save_weights(src, path)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    loaded = sf.from_pretrained(path, backend="torch")
    assert loaded.config == src.config and not loaded.training
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(src, x), rtol=0, atol=0)

    # a failure while writing leaves the previous file intact and no temp file behind
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        sf.save_weights(_model(), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    with pytest.raises(ValueError, match=".safetensors"):
        sf.save_weights(src, tmp_path / "model.pt")


def test_from_pretrained_hf_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from segformer_fast.io.hf import hf_config

    cfg = hf_config(_model(num_classes=4).config)
    cfg.id2label = {i: f"class{i}" for i in range(4)}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    torch.manual_seed(1)
    hf = transformers.SegformerForSemanticSegmentation(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = sf.from_pretrained(tmp_path / "hf")
    assert model.config.num_classes == 4 and model.config.depths == (1, 2, 1, 1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - hf(pixel_values=x).logits).abs().max() <= 1e-5


def test_from_pretrained_hand_written_hf4_directory(tmp_path):
    """A 4.x hub directory: config.json and pytorch_model.bin with 4.x key names, sharded."""
    src = _model(num_classes=3)
    _randomise_bn(src)
    sd = export_state_dict(src, "hf4")
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    weight_map = {}
    for name, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, tmp_path / name)
        weight_map.update({k: name for k in ks})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"model_type": "segformer", "hidden_sizes": [32, 64, 160, 256], "depths": [1, 2, 1, 1],
              "num_attention_heads": [1, 2, 5, 8], "sr_ratios": [8, 4, 2, 1], "decoder_hidden_size": 256,
              "id2label": {"0": "a", "1": "b", "2": "c"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = sf.from_pretrained(tmp_path, backend="torch")
    assert model.config.ln_eps.block == 1e-5
    src.set_layer_norm_eps(model.config.ln_eps)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_outputs(model, x), _outputs(src, x), rtol=0, atol=0)


def test_from_pretrained_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "segformer"}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        sf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="not a segformer"):
        sf.from_pretrained(tmp_path)


def test_every_layout_is_detected():
    model = _model()
    from segformer_fast.io.weights import detect_layout

    for layout in LAYOUTS:
        assert detect_layout(export_state_dict(model, layout).keys()) == layout
