import json
import os

import pytest
import torch
from torch import nn

import segformer_fast as sf
from segformer_fast.tools.cli import main
from segformer_fast.testing import tiny_train_config
from segformer_fast.train import SyntheticSegmentation, TrainConfig, evaluate, read_checkpoint, train
from segformer_fast.train.trainer import PolyWithWarmup, StepBatches

_tiny = tiny_train_config


def _weights(result):
    return {k: v.clone() for k, v in result["model"].state_dict().items()}


def test_resume_continues_exactly(tmp_path):
    torch.set_num_threads(1)
    straight = _weights(train(_tiny(tmp_path / "a", steps=5)))
    first = train(_tiny(tmp_path / "b", steps=5), stop_at=2)
    assert first["step"] == 2 and read_checkpoint(str(tmp_path / "b"))[1]["step"] == 2
    assert not (tmp_path / "b" / "model.safetensors").exists()
    resumed = train(_tiny(tmp_path / "b", steps=5, seed=123), resume=str(tmp_path / "b"))  # saved seed wins
    assert resumed["step"] == 5 and resumed["config"].seed == 0
    after = _weights(resumed)
    assert straight.keys() == after.keys()
    for k in straight:
        assert torch.equal(straight[k], after[k]), k
    # the same two steps without restoring the checkpoint's state would not match
    other = _weights(train(_tiny(tmp_path / "c", steps=5, seed=1)))
    assert any(not torch.equal(straight[k], other[k]) for k in straight)


def test_resume_restores_optimizer_and_schedule(tmp_path):
    cfg = _tiny(tmp_path, steps=6, batch=1, accum=2, warmup=2, amp="fp16")
    train(cfg, stop_at=3)
    tensors, meta = read_checkpoint(str(tmp_path))
    assert meta["scaler"]["scale"] > 0 and meta["config"]["amp"] == "fp16"  # GradScaler state saved
    assert meta["scheduler"]["last_epoch"] == 3 and meta["step"] == 3
    assert any(k.startswith("optim.state.") and k.endswith("exp_avg_sq") for k in tensors)
    assert len(meta["rng"]) == 1 and meta["config"]["accum"] == 2
    lrs = [g["lr"] for g in meta["optimizer"]["param_groups"]]
    assert max(lrs) == pytest.approx(10 * min(lrs))  # decoder x10
    assert min(lrs) == pytest.approx(cfg.resolved_lr() * PolyWithWarmup(6, 2)(3))


def test_schedule_warmup_then_poly():
    f = PolyWithWarmup(total=100, warmup=10, warmup_ratio=0.0)
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5 * 0.95) and f(10) == pytest.approx(0.9)
    assert f(50) == pytest.approx(0.5) and f(100) == 0.0


def test_step_batches_shard_ranks_and_cover_epochs():
    ranks = [list(StepBatches(10, 2, 1, r, 2, seed=0, start=0, total=5)) for r in range(2)]
    flat = [i for step in zip(*ranks) for batch in step for i, _ in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != list(range(10))  # shuffled
    positions = [p for step in zip(*ranks) for batch in step for _, p in batch]
    assert positions == list(range(20))
    later = list(StepBatches(10, 2, 1, 1, 2, seed=0, start=3, total=5))
    assert later == ranks[1][3:]


def test_short_synthetic_run_beats_chance(tmp_path):
    torch.set_num_threads(2)  # CPU training is deterministic for a fixed thread count
    cfg = TrainConfig(data="synthetic", synthetic_size=64, synthetic_val=16, crop=64, batch=8, steps=100, lr=1e-3,
                      val_every=20, workers=0, out=str(tmp_path), progress=False)
    result = train(cfg, stop_at=60)  # the first 60 steps of a 100-step schedule
    m = result["metrics"]
    untrained = sf.segformer("b0", num_classes=6).eval()
    nn.init.normal_(untrained.decoder.classifier.weight, 0.0, 0.01)
    before = evaluate(untrained, SyntheticSegmentation("val", 16, (64, 64)))
    # chance here: background everywhere gives mIoU ~0.12 (background IoU ~0.7, the others 0)
    assert m["miou"] > max(0.15, before["miou"] + 0.04), (m, before)
    assert max(m["per_class_iou"][1:]) > 0.2, m
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["step"] for h in saved["history"]] == [20, 40, 60] and saved["history"][-1]["miou"] == m["miou"]


def test_cli_train_then_evaluate_and_predict(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--synthetic-size", "64", "--crop", "64", "--batch", "2", "--steps", "2", "--val-every", "2",
               "--workers", "0", "--out", str(out), "--no-progress", "--amp", "bf16"])
    assert rc == 0
    assert "final: mIoU" in capsys.readouterr().out
    assert {"checkpoint.json", "model.safetensors", "metrics.json"} <= set(os.listdir(out))
    rc = main(["evaluate", "--data", "synthetic", "--synthetic-size", "64", "--synthetic-val", "4", "--weights",
               str(out), "--no-progress", "--json", str(tmp_path / "m.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mIoU" in text and "h-stripes" in text
    assert set(json.loads((tmp_path / "m.json").read_text())) >= {"miou", "per_class_iou", "pixel_accuracy"}
    rc = main(["train", "--resume", str(out), "--steps", "3", "--no-progress", "--workers", "0"])
    assert rc == 0 and read_checkpoint(str(out))[1]["step"] == 3  # written back to the resumed folder
    with pytest.raises(SystemExit):
        main(["train", "--memory", "nonsense"])


def _all_finite(tensors):
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_diverged_run_stops_at_the_first_nonfinite_loss_and_keeps_the_last_good_checkpoint(tmp_path):
    from segformer_fast.train import NonFiniteLossError

    torch.set_num_threads(1)
    cfg = _tiny(tmp_path, steps=6, lr=1e6, save_every=1, val_every=6)  # the loss is NaN from step 3 on
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    message = str(info.value)
    assert "loss is nan at step 3" in message and "--lr" in message and "--amp bf16" in message
    assert len(message.splitlines()) == 1
    tensors, meta = read_checkpoint(str(tmp_path))
    assert meta["step"] == 2 and _all_finite(tensors)  # step 3's weights were never written
    assert "checkpoint of step 2" in message
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "metrics.json").exists()


def test_cli_diverged_run_prints_one_error_line(tmp_path, capsys):
    rc = main(["train", "--synthetic-size", "64", "--synthetic-train", "16", "--synthetic-val", "4", "--crop", "64",
               "--batch", "2", "--steps", "6", "--val-every", "6", "--workers", "0", "--out", str(tmp_path),
               "--no-progress", "--lr", "1e6", "--threads", "1"])
    captured = capsys.readouterr()
    assert rc == 1 and "final:" not in captured.out and "Traceback" not in captured.err
    assert captured.err.startswith("segformer-fast train: error: training diverged: the loss is nan at step 3")


def test_fp16_gradscaler_skipped_steps_do_not_stop_the_run(tmp_path, monkeypatch):
    # an initial scale that overflows every scaled gradient: the scaler skips steps and halves the
    # scale, which is normal fp16 training, not a non-finite (unscaled) loss
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **kw: real(*a, **{**kw, "init_scale": 2.0**127}))
    torch.set_num_threads(1)
    result = train(_tiny(tmp_path, steps=3, amp="fp16", val_every=3))
    assert result["step"] == 3
    _, meta = read_checkpoint(str(tmp_path))
    assert meta["scaler"]["scale"] < 2.0**127  # steps were skipped on inf gradients
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert history[-1]["loss"] is not None and history[-1]["loss"] > 0


def test_cli_resume_takes_the_saved_runs_settings(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    train(_tiny(tmp_path, steps=4, val_every=2, save_every=1, log_every=3), stop_at=1)
    seen = {}

    def fake_train(cfg, resume=None, stop_at=None, overwrite=False, device=None):
        seen.update(cfg=cfg, resume=resume)
        return {"metrics": None, "step": 4, "out": cfg.out}

    monkeypatch.setattr("segformer_fast.train.trainer.train", fake_train)
    assert main(["train", "--resume", str(tmp_path)]) == 0
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.val_every, cfg.save_every, cfg.log_every, cfg.workers) == (4, 2, 1, 3, 0)
    assert cfg.out == str(tmp_path) and not cfg.progress and cfg.crop == 64
    assert main(["train", "--resume", str(tmp_path), "--steps", "9", "--val-every", "3"]) == 0
    assert (seen["cfg"].steps, seen["cfg"].val_every, seen["cfg"].save_every) == (9, 3, 1)  # the flags given win


def test_cli_resume_refuses_to_change_the_runs_recipe(tmp_path, capsys):
    torch.set_num_threads(1)
    train(_tiny(tmp_path, steps=3), stop_at=1)
    assert main(["train", "--resume", str(tmp_path), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--lr cannot change" in err and "Traceback" not in err


def test_resume_with_nothing_left_to_train_is_an_error(tmp_path, capsys):
    torch.set_num_threads(1)
    train(_tiny(tmp_path, steps=2, val_every=2))
    with pytest.raises(ValueError, match="already trained 2 of its 2 steps: nothing left to train"):
        train(_tiny(tmp_path, steps=2), resume=str(tmp_path))
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "nothing left to train" in capsys.readouterr().err


def test_resumed_metrics_loss_equals_an_uninterrupted_runs(tmp_path):
    torch.set_num_threads(1)
    kw = dict(steps=4, val_every=4, log_every=2)
    train(_tiny(tmp_path / "a", **kw))
    train(_tiny(tmp_path / "b", **kw), stop_at=3)  # step 3: not a logging step; the running average is checkpointed
    train(_tiny(tmp_path / "b", **kw), resume=str(tmp_path / "b"))
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text())["history"] for d in "ab")
    assert [h["step"] for h in a] == [h["step"] for h in b] == [4]
    assert a[0]["loss"] == b[0]["loss"] and a[0]["miou"] == b[0]["miou"]


def test_metrics_json_is_strict_json_with_null_for_nan(tmp_path):
    torch.set_num_threads(1)
    train(_tiny(tmp_path, steps=2, val_every=1, log_every=2))  # step 1 validates before any loss is logged: NaN
    text = (tmp_path / "metrics.json").read_text()
    history = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.json"))["history"]
    assert history[0]["loss"] is None
    json.loads((tmp_path / "checkpoint.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
