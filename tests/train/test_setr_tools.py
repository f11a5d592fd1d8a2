import json
import math
import textwrap

import numpy as np
import pytest
import torch

import segformer_fast as sf
from segformer_fast.tools.cli import main
from segformer_fast.configs import get_setr_config
from segformer_fast.io.weights import CheckpointMismatchError
from segformer_fast.train import SyntheticSegmentation, TrainConfig, evaluate, load_model, read_checkpoint, train
from segformer_fast.train.build import build_model, classifier_names, model_record
from segformer_fast.train.checkpoint import write_checkpoint
from segformer_fast.train.imageio import read_image, read_mask, write_png
from segformer_fast.train.inference import predict_probs
from segformer_fast.train.transforms import normalize

# ViT with 4 blocks: auxiliary heads on blocks (1, 1, 2), MLA taps on (0, 1, 2, 3)
TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2, "head_channels": 16, "mla_head_channels": 8}
TINY_FLAGS = [a for k, v in TINY.items() for a in ("--model-override", f"{k}={v}")]


@pytest.fixture(autouse=True)
def one_thread():
    # CPU training is deterministic for a fixed thread count; one thread also avoids oversubscription
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(out, model="setr-pup", **kw):
    base = dict(model=model, model_overrides=TINY, data="synthetic", synthetic_size=64, synthetic_train=16,
                synthetic_val=4, crop=64, batch=2, steps=4, val_every=100, workers=0, out=str(out), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _fixed_batch(n=4):
    data = SyntheticSegmentation("val", n, (64, 64), seed=7)
    images = torch.stack([normalize(torch.from_numpy(data[i][0]).permute(2, 0, 1).float()) for i in range(n)])
    labels = torch.stack([torch.from_numpy(data[i][1]) for i in range(n)])
    return images, labels


def _initial_model(cfg):
    """The weights ``train(cfg)`` starts from: same seed, same build, same classifier init."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, 6, cfg.backend, overrides={"drop_path_rate": cfg.resolved_drop_path(), **TINY},
                        img_size=cfg.crop)
    for name in classifier_names(model):
        torch.nn.init.normal_(model.get_submodule(name).weight, 0.0, 0.01)
        torch.nn.init.zeros_(model.get_submodule(name).bias)
    return model


def test_tiny_config_taps_are_valid():
    cfg = get_setr_config(decoder="mla", **TINY)
    assert cfg.mla_indices == (0, 1, 2, 3) and cfg.aux_indices == (1, 1, 2)


@pytest.mark.parametrize("model,amp,accum,backend", [("setr-naive", "none", 2, None), ("setr-pup", "bf16", 1, None),
                                                     ("setr-mla-b16", "fp16", 2, "torch"), ("setr-mla", "bf16", 2, None)])
def test_train_each_decoder_updates_every_head(tmp_path, model, amp, accum, backend):
    cfg = _cfg(tmp_path, model, amp=amp, accum=accum, batch=4 // accum, steps=8, val_every=8, lr=2e-3,
               backend=backend)
    initial = _initial_model(cfg)
    images, labels = _fixed_batch()
    with torch.no_grad():
        before = float(initial.eval()(images, labels=labels).loss)
    result = train(cfg)
    trained = result["model"]
    assert isinstance(trained, sf.SETR) and trained.config.decoder == model.split("-")[1]
    assert result["config"].resolved_drop_path() == 0.0 and trained.config.img_size == 64
    assert math.isfinite(result["history"][-1]["loss"])
    with torch.no_grad():
        after = float(trained.eval()(images, labels=labels).loss)
    assert after < before, (before, after)
    start = dict(initial.named_parameters())
    changed = {n: not torch.equal(p, start[n]) for n, p in trained.named_parameters()}
    frozen = {"encoder.cls_token"} if model.startswith("setr-mla") else set()  # MLA never reads it
    # The attention key bias adds q . b_k to a whole row of scores, which softmax ignores: its true
    # gradient is zero. The fused op returns exactly 0 (so AdamW leaves it); the reference returns
    # rounding noise, which Adam's normalisation turns into full-size steps. Neither is required to move.
    key_biases = {n for n in changed if n.endswith("attn.k.bias")}
    assert all(changed[n] for n in changed if n not in frozen | key_biases), [n for n, c in changed.items() if not c]
    assert not any(changed[n] for n in frozen)
    assert any(n.startswith("aux_heads.") for n in changed)  # the auxiliary losses train the aux heads


def test_checkpoint_rebuilds_the_trained_setr(tmp_path, capsys):
    result = train(_cfg(tmp_path / "run", steps=2, val_every=2))
    model = result["model"].eval()
    x = torch.randn(2, 3, 48, 72)
    with torch.no_grad():
        expected = model(x)
    _, meta = read_checkpoint(str(tmp_path / "run"))
    assert meta["model"]["architecture"] == "setr" and meta["model"]["config"]["decoder"] == "pup"
    for weights in (tmp_path / "run", tmp_path / "run" / "model.safetensors"):
        loaded = load_model(str(weights))
        assert isinstance(loaded, sf.SETR) and loaded.config == model.config and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(x), expected)

    rng = np.random.default_rng(0)
    write_png(tmp_path / "in" / "a.png", rng.integers(0, 256, (37, 61, 3), dtype=np.uint8))
    rc = main(["predict", str(tmp_path / "in"), "--weights", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
               "--window", "32", "--stride", "24", "--no-progress"])
    assert rc == 0
    image = normalize(torch.from_numpy(read_image(tmp_path / "in" / "a.png")).permute(2, 0, 1).float())[None]
    labels = predict_probs(model, image, window=32, stride=24).argmax(1)[0].numpy()
    np.testing.assert_array_equal(read_mask(tmp_path / "out" / "a_label.png"), labels)

    rc = main(["evaluate", "--data", "synthetic", "--synthetic-size", "64", "--synthetic-val", "4", "--weights",
               str(tmp_path / "run"), "--no-progress", "--json", str(tmp_path / "m.json")])
    assert rc == 0 and "mIoU" in capsys.readouterr().out
    saved = json.loads((tmp_path / "m.json").read_text())
    direct = evaluate(model, SyntheticSegmentation("val", 4, (64, 64)))
    assert saved["miou"] == pytest.approx(direct["miou"]) and saved["pixels"] == direct["pixels"]


def test_cli_train_setr_resume_and_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", "setr-mla", *TINY_FLAGS, "--synthetic-size", "64", "--synthetic-train", "16",
               "--crop", "48", "--batch", "2", "--steps", "2", "--val-every", "2", "--workers", "0",
               "--memory", "recompute", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "SETR-MLA" in text and "final: mIoU" in text
    _, meta = read_checkpoint(str(out))
    assert meta["config"]["model_overrides"] == TINY and meta["model"]["config"]["img_size"] == 48
    rc = main(["train", "--resume", str(out), "--steps", "3", "--no-progress", "--workers", "0"])
    assert rc == 0 and read_checkpoint(str(out))[1]["step"] == 3
    rc = main(["evaluate", "--data", "synthetic", "--synthetic-size", "40", "--synthetic-val", "2", "--weights",
               str(out), "--scales", "0.3,1.0", "--flip", "--no-progress"])  # 0.3 x 40 = 12 < 16 pixels: padded
    assert rc == 0 and "h-stripes" in capsys.readouterr().out
    with pytest.raises(ValueError, match="save.*recompute.*checkpoint.*bogus"):
        train(_cfg(tmp_path / "bad", memory="bogus"))
    with pytest.raises(ValueError, match="setr-pup-b16"):
        train(_cfg(tmp_path / "bad", model="setr-up"))


def test_model_option_loads_setr_weights_and_mismatch_is_clear(tmp_path):
    torch.manual_seed(0)
    model = sf.setr("naive", num_classes=3, img_size=64, **TINY).eval()
    torch.save(model.state_dict(), tmp_path / "naive.pth")
    rng = np.random.default_rng(1)
    write_png(tmp_path / "a.png", rng.integers(0, 256, (50, 41, 3), dtype=np.uint8))
    rc = main(["predict", str(tmp_path / "a.png"), "--weights", str(tmp_path / "naive.pth"), "--model", "setr-naive",
               "--num-classes", "3", *TINY_FLAGS, "--model-override", "img_size=64", "--out", str(tmp_path / "out"),
               "--scales", "0.75,1.0", "--no-progress"])
    assert rc == 0
    image = normalize(torch.from_numpy(read_image(tmp_path / "a.png")).permute(2, 0, 1).float())[None]
    expected = predict_probs(model, image, scales=(0.75, 1.0)).argmax(1)[0].numpy()
    np.testing.assert_array_equal(read_mask(tmp_path / "out" / "a_label.png"), expected)

    with pytest.raises(CheckpointMismatchError, match="up_convs"):  # a Naive head's weights into a PUP model
        load_model(str(tmp_path / "naive.pth"), "setr-pup", 3, overrides={**TINY, "img_size": 64})
    pup = sf.setr("pup", num_classes=3, img_size=64, **TINY)
    write_checkpoint(str(tmp_path / "ckpt"), 1, {f"model.{k}": v for k, v in model.state_dict().items()},
                     {"config": {"model": "setr-pup", "num_classes": 3}, "model": model_record(pup)})
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_model(str(tmp_path / "ckpt"))


def test_predict_probs_on_setr_any_size():
    torch.manual_seed(0)
    model = sf.setr("pup", num_classes=4, img_size=32, **TINY).eval()
    x = torch.randn(1, 3, 45, 70)  # not multiples of 16; scale 0.25 gives 11 x 18, below SETR's 16-pixel minimum
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 11, 18))
    whole = predict_probs(model, x)
    assert torch.equal(predict_probs(model, x, window=80, stride=60), whole)  # one window covering the image
    for kw in ({"scales": (0.25, 0.75, 1.0, 1.25), "flip": True}, {"window": 40, "stride": 30},
               {"scales": (0.25, 1.0, 1.5), "flip": True, "window": 36, "stride": 20}):
        probs = predict_probs(model, x, **kw)
        assert probs.shape == (1, 4, 45, 70) and torch.isfinite(probs).all()
        torch.testing.assert_close(probs.sum(1), torch.ones(1, 45, 70))
        assert not torch.allclose(probs, whole)  # tiles, scales and flips each see other context


def test_resume_continues_exactly(tmp_path):
    kw = dict(model="setr-mla", drop_path=0.1, steps=4, accum=2, batch=1)  # drop path: the RNG state matters
    straight = train(_cfg(tmp_path / "a", **kw))["model"].state_dict()
    train(_cfg(tmp_path / "b", **kw), stop_at=2)
    resumed = train(_cfg(tmp_path / "b", **kw), resume=str(tmp_path / "b"))
    assert resumed["step"] == 4
    after = resumed["model"].state_dict()
    assert straight.keys() == after.keys()
    for k in straight:
        assert torch.equal(straight[k], after[k]), k
    other = train(_cfg(tmp_path / "c", **{**kw, "seed": 1}))["model"].state_dict()
    assert any(not torch.equal(straight[k], other[k]) for k in straight)


DDP_DRIVER = textwrap.dedent("""
    import os, sys, torch
    from segformer_fast.train import TrainConfig, train

    out = sys.argv[1]
    torch.set_num_threads(1)
    cfg = TrainConfig(model="setr-mla", model_overrides={"embed_dim": 32, "depth": 4, "num_heads": 2,
                      "head_channels": 16, "mla_head_channels": 8}, data="synthetic", synthetic_size=64,
                      synthetic_train=16, synthetic_val=4, crop=64, batch=2, steps=2, val_every=2, workers=0,
                      out=os.path.join(out, "run"), progress=False)
    model = train(cfg)["model"]
    torch.save({k: v.clone() for k, v in model.named_parameters()}, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
""")


def test_ddp_trains_setr_mla_in_step(tmp_path, torchrun):
    torchrun(DDP_DRIVER)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys() and "encoder.cls_token" in a
    for k in a:  # DDP all-reduces every gradient, the auxiliary heads' included
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "run" / "model.safetensors").exists()
