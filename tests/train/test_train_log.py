"""What a run shows while it trains: log.jsonl, curves.png, TensorBoard, Ctrl-C, the LR schedule."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from segformer_fast.testing import tiny_train_config
from segformer_fast.tools.cli import main
from segformer_fast.train import read_checkpoint, train
from segformer_fast.train.log import TENSORBOARD_MISSING, read_log, write_curves
from segformer_fast.train.trainer import PolyWithWarmup

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LR = tiny_train_config("unused").resolved_lr()  # the synthetic data's default rate


def _tiny(out, **kw):
    return tiny_train_config(out, **{**dict(synthetic_train=8, synthetic_val=2, batch=1, steps=5, log_every=1), **kw})


def _old_factor(t, total, warmup, power=1.0, ratio=1e-6):
    # the schedule as first written: (1 - t / total) ** power, times the linear warmup factor
    poly = max(0.0, 1.0 - t / total) ** power
    return poly * (ratio + (1.0 - ratio) * t / warmup) if t < warmup else poly


def test_log_jsonl_has_one_line_per_logged_step(tmp_path):
    torch.set_num_threads(1)
    train(_tiny(tmp_path, steps=6, log_every=2, warmup=2, val_every=6))
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert set(r) == {"step", "epoch", "loss", "loss_avg", "lr", "lr_groups", "images_per_s", "memory", "time"}
        assert r["epoch"] == pytest.approx(r["step"] / 8)  # batch 1, 8 images
        assert r["loss"] > 0 and r["images_per_s"] > 0 and r["memory"] > 2**20
        # the rate step `step` trained with (index step - 1), and the decoder's x10
        assert r["lr"] == pytest.approx(LR * _old_factor(r["step"] - 1, 6, 2))
        assert min(r["lr_groups"]) == pytest.approx(r["lr"]) and max(r["lr_groups"]) == pytest.approx(10 * r["lr"])
    assert records[0]["loss_avg"] == records[0]["loss"]
    assert records[1]["loss_avg"] == pytest.approx(0.9 * records[0]["loss"] + 0.1 * records[1]["loss"])
    assert records[0]["time"] < records[1]["time"] < records[2]["time"]
    final = json.loads((tmp_path / "metrics.json").read_text())["history"][-1]
    assert final["loss"] == pytest.approx(records[-1]["loss_avg"])


def test_resume_truncates_the_log_after_its_checkpoint(tmp_path):
    torch.set_num_threads(1)
    train(_tiny(tmp_path / "a"))
    train(_tiny(tmp_path / "b"), stop_at=3)
    log = tmp_path / "b" / "log.jsonl"
    with open(log, "a") as f:  # what a crash after the checkpoint leaves: later steps and a cut-short line
        f.write(json.dumps({"step": 4, "loss": -1.0}) + "\n" + '{"step": 5, "lo')
    assert [r["step"] for r in read_log(log)] == [1, 2, 3, 4]  # the partial line is dropped
    train(_tiny(tmp_path / "b"), resume=str(tmp_path / "b"))
    a, b = read_log(tmp_path / "a" / "log.jsonl"), read_log(log)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]  # no step twice, nothing of the crashed lines
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # as if never stopped
    assert [r["loss_avg"] for r in b] == [r["loss_avg"] for r in a]
    assert log.read_text().endswith("}\n")
    # resuming into another folder carries the log over
    train(_tiny(tmp_path / "c", steps=3), stop_at=2)
    train(_tiny(tmp_path / "d", steps=3), resume=str(tmp_path / "c"))
    assert [r["step"] for r in read_log(tmp_path / "d" / "log.jsonl")] == [1, 2, 3]


def _png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


def test_curves_png_is_redrawn_at_each_validation(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from segformer_fast.train import trainer

    drawn = []

    def counting(path, records, history):
        drawn.append(([r["step"] for r in records], [h["step"] for h in history]))
        return write_curves(path, records, history)

    monkeypatch.setattr(trainer, "write_curves", counting)
    torch.set_num_threads(1)
    train(_tiny(tmp_path, steps=4, val_every=2))
    assert drawn == [([1, 2], [2]), ([1, 2, 3, 4], [2, 4])]
    (width, height), size = _png_size(tmp_path / "curves.png")
    assert (width, height) == (1200, 360) and size > 10_000
    with Image.open(tmp_path / "curves.png") as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # axes, text and three coloured curves, not a blank canvas
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".sftmp-")]  # written through a temp file
    records = [{"step": s, "loss": 2.0 / s, "loss_avg": 2.5 / s, "lr": 1e-3 * (1 - s / 50)} for s in range(1, 50)]
    history = [{"step": 10, "miou": 0.2}, {"step": 20, "miou": None}, {"step": 40, "miou": float("nan")}]
    assert write_curves(str(tmp_path / "c.png"), records, history)  # NaN and missing values are skipped
    assert _png_size(tmp_path / "c.png")[0] == (1200, 360)


def test_tensorboard_flag_without_the_package_is_one_error_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        train(_tiny(tmp_path / "api", tensorboard=True))
    assert not (tmp_path / "api").exists()
    out = tmp_path / "cli"
    rc = main(["train", "--tensorboard", "--synthetic-size", "64", "--crop", "64", "--steps", "2", "--workers", "0",
               "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"segformer-fast train: error: {TENSORBOARD_MISSING}\n"
    assert not out.exists()


def test_tensorboard_writes_the_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.set_num_threads(1)
    train(_tiny(tmp_path, steps=4, val_every=2, log_every=2, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_avg", "train/lr", "train/images_per_s", "val/miou"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    logged = read_log(tmp_path / "log.jsonl")
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in logged])
    assert [e.step for e in events.Scalars("val/miou")] == [2, 4]


def test_sigint_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--synthetic-size", "64", "--synthetic-train", "8", "--synthetic-val", "2", "--crop", "64",
            "--batch", "1", "--steps", "400", "--val-every", "400", "--log-every", "1", "--workers", "0",
            "--threads", "1", "--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "segformer_fast.tools.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(read_log(out / "log.jsonl")) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no training step logged"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "final:" not in stdout
    line = stderr.strip().splitlines()[-1]
    step = read_checkpoint(str(out))[1]["step"]
    assert 2 <= step < 400
    assert line == (f"interrupted at step {step}: checkpoint saved to {out}; "
                    f"continue with: segformer-fast train --resume {out}")
    assert not (out / "model.safetensors").exists()

    torch.set_num_threads(1)
    end = step + 2  # the same 400-step schedule, stopped at `end`, uninterrupted and interrupted + resumed
    assert main(["train", "--resume", str(out), "--stop-at", str(end), "--threads", "1"]) == 0
    assert [r["step"] for r in read_log(out / "log.jsonl")] == list(range(1, end + 1))
    train(tiny_train_config(tmp_path / "straight", synthetic_train=8, synthetic_val=2, batch=1, steps=400,
                            val_every=400, log_every=1), stop_at=end)
    (resumed, meta), (straight, _) = read_checkpoint(str(out)), read_checkpoint(str(tmp_path / "straight"))
    assert meta["step"] == end
    weights = [k for k in straight if k.startswith("model.")]
    assert weights and all(torch.equal(resumed[k], straight[k]) for k in weights)



def test_sigint_while_validating_stops_at_once_and_checkpoints_that_step(tmp_path, monkeypatch):
    from segformer_fast.train import inference
    from segformer_fast.train.trainer import TrainingInterrupted

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT has a handler other than Python's default in this test process")

    def interrupted_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the handler raises KeyboardInterrupt first
        pytest.fail("the validation was not interrupted")

    monkeypatch.setattr(inference, "evaluate_dataset", interrupted_evaluation)
    torch.set_num_threads(1)
    with pytest.raises(TrainingInterrupted) as info:
        train(_tiny(tmp_path, steps=6, val_every=3))
    assert (info.value.step, info.value.checkpoint) == (3, 3)
    assert str(info.value) == f"interrupted at step 3: checkpoint saved to {tmp_path}"
    assert read_checkpoint(str(tmp_path))[1]["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def _lrs(optimizer, scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedule_is_the_closed_form_and_a_resume_may_extend_it():
    from torch.optim.lr_scheduler import LambdaLR, LinearLR, PolynomialLR, SequentialLR

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)

    opt = optimizer()
    sched = LambdaLR(opt, PolyWithWarmup(10, 3, power=0.9))
    assert _lrs(opt, sched, 6) == pytest.approx([LR * _old_factor(t, 10, 3, 0.9) for t in range(6)], rel=1e-12)
    # torch's SequentialLR(LinearLR, PolynomialLR) starts the poly decay after the warmup: other rates
    opt4 = optimizer()
    seq = SequentialLR(opt4, [LinearLR(opt4, 1e-6, 1.0, total_iters=3), PolynomialLR(opt4, total_iters=7, power=0.9)],
                       milestones=[3])
    ours, theirs = [LR * _old_factor(t, 10, 3, 0.9) for t in range(10)], _lrs(opt4, seq, 10)
    assert theirs[:3] != pytest.approx(ours[:3]) and theirs[4:] != pytest.approx(ours[4:])


def test_a_resumed_run_extending_steps_decays_towards_the_new_end(tmp_path):
    torch.set_num_threads(1)
    train(_tiny(tmp_path, steps=4, warmup=2), stop_at=2)
    train(_tiny(tmp_path, steps=6), resume=str(tmp_path))  # the saved warmup (2) stays
    records = read_log(tmp_path / "log.jsonl")
    expected = [_old_factor(t, 4, 2) for t in range(2)] + [_old_factor(t, 6, 2) for t in range(2, 6)]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in records] == pytest.approx([LR * f for f in expected], rel=1e-12)
    assert [min(r["lr_groups"]) for r in records] == pytest.approx([LR * f for f in expected], rel=1e-12)
