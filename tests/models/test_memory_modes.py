"""Memory modes (save / recompute / checkpoint), the fused loss in SegFormer.loss, and `segformer-fast memory`."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import segformer_fast as sf
from segformer_fast.tools import cli
from segformer_fast.tools.memory_report import (
    COMPONENTS,
    MemoryRow,
    largest_square_size,
    measure_saved_bytes,
    parse_bytes,
)
from segformer_fast.utils.memory import SavedTensorRecorder

segformer_module = importlib.import_module("segformer_fast.models.segformer")  # the name is shadowed by the function

TINY = dict(num_classes=5, depths=(1, 2, 1, 1))  # dropout and drop path left on: checkpointing must replay them


def _models(**kw):
    models = {}
    for mode in sf.configs.MEMORY_MODES:
        torch.manual_seed(0)
        models[mode] = sf.segformer("b0", memory=mode, **TINY, **kw)
    for m in models.values():
        m.load_state_dict(models["save"].state_dict())
    return models


def _train_step(model, x, labels):
    torch.manual_seed(1)  # the same dropout / drop-path draws in every mode
    with SavedTensorRecorder(list(model.parameters()) + list(model.buffers())) as rec:
        loss = model.loss(model(x), labels)
    loss.backward()
    return loss.detach(), rec.bytes


def test_checkpoint_gradients_equal_save_and_saved_bytes_shrink():
    models = _models()
    x = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, 5, (2, 64, 96))
    labels[0, :8] = 255
    results = {mode: _train_step(m, x, labels) for mode, m in models.items()}
    saved = {mode: b for mode, (_, b) in results.items()}
    assert saved["save"] > saved["recompute"] > saved["checkpoint"] > 0, saved
    assert saved["checkpoint"] < 0.5 * saved["save"], saved
    for mode in ("recompute", "checkpoint"):
        torch.testing.assert_close(results[mode][0], results["save"][0], rtol=1e-6, atol=1e-6)
        for (name, a), b in zip(models["save"].named_parameters(), models[mode].parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=f"{mode}: {name}")
        # the decoder's forward reruns in backward; BatchNorm must still count the batch once
        for name, a in models["save"].named_buffers():
            torch.testing.assert_close(dict(models[mode].named_buffers())[name], a, msg=f"{mode}: {name}")


def test_checkpoint_only_while_training_with_grad(monkeypatch):
    models = _models()
    x = torch.randn(1, 3, 64, 64)

    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoint used outside training")

    monkeypatch.setattr(segformer_module, "checkpoint", forbidden)
    ckpt, save = models["checkpoint"], models["save"]
    ckpt.eval()
    save.eval()
    torch.testing.assert_close(ckpt(x), save(x))
    ckpt.train()
    with torch.no_grad():
        ckpt(x)
    with pytest.raises(AssertionError, match="outside training"):
        ckpt(x)  # training with grad: checkpointing is on


def test_checkpoint_mode_works_for_the_reference_backend():
    torch.manual_seed(0)
    save = sf.segformer("b0", backend="torch", **TINY)
    ckpt = sf.segformer("b0", backend="torch", memory="checkpoint", **TINY)
    ckpt.load_state_dict(save.state_dict())
    x, labels = torch.randn(1, 3, 64, 64), torch.randint(0, 5, (1, 64, 64))
    (_, b_save), (_, b_ckpt) = _train_step(save, x, labels), _train_step(ckpt, x, labels)
    assert b_ckpt < b_save
    for (name, a), b in zip(save.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_memory_mode_parse_and_layer_mode():
    from segformer_fast.configs import LAYER_MEMORY_MODES, MEMORY_MODES, MemoryMode

    assert MEMORY_MODES == ("save", "recompute", "checkpoint") and LAYER_MEMORY_MODES == ("save", "recompute")
    assert MemoryMode.parse("checkpoint") is MemoryMode.CHECKPOINT == "checkpoint"
    assert MemoryMode.parse(MemoryMode.SAVE, allowed=LAYER_MEMORY_MODES) is MemoryMode.SAVE
    assert [MemoryMode(m).layer for m in MEMORY_MODES] == ["save", "recompute", "recompute"]
    with pytest.raises(ValueError, match=r"memory must be one of \('save', 'recompute', 'checkpoint'\), got 'lean'"):
        sf.segformer("b0", memory="lean", **TINY)
    with pytest.raises(ValueError, match=r"memory must be one of \('save', 'recompute'\), got 'checkpoint'"):
        MemoryMode.parse("checkpoint", allowed=LAYER_MEMORY_MODES)
    model = sf.segformer("b0", backend="auto", memory=MemoryMode.CHECKPOINT, **TINY)
    assert model.memory == "checkpoint" and "memory='checkpoint'" in repr(model)
    block = model.encoder.stages[0].blocks[0]
    assert model.encoder.stages[0].checkpoint and block.mlp.memory == block.attn.memory == "recompute"


def test_model_loss_is_fused_except_for_the_reference_backend():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 9, 7, requires_grad=True)
    labels = torch.randint(0, 5, (2, 33, 27))
    labels[0, :5] = 255
    literal = F.cross_entropy(F.interpolate(logits, size=(33, 27), mode="bilinear", align_corners=False), labels,
                              ignore_index=255)
    reference = sf.segformer("b0", backend="torch", **TINY)
    assert torch.equal(reference.loss(logits, labels), literal)
    assert torch.equal(sf.segformer_loss_reference(logits, labels), literal)
    fast = sf.segformer("b0", backend="auto", **TINY)
    with SavedTensorRecorder() as rec:
        loss = fast.loss(logits, labels)
    torch.testing.assert_close(loss, literal, rtol=1e-5, atol=1e-6)
    assert (2, 5, 33, 27) not in rec.shapes  # no upsampled logits kept
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(literal, logits)[0],
                               rtol=1e-4, atol=1e-7)
    weight = torch.rand(5) + 0.5
    torch.testing.assert_close(fast.loss(logits, labels, weight=weight), reference.loss(logits, labels, weight=weight),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="integer"):
        fast.loss(logits, labels.float())
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        fast.loss(logits, labels[0])


def test_component_bytes_add_up_to_the_recorder_total():
    torch.manual_seed(0)
    model = sf.segformer("b0", **TINY)
    x, labels = torch.randn(1, 3, 64, 64), torch.randint(0, 5, (1, 64, 64))
    comps = measure_saved_bytes(model, model, model.loss, x, labels)
    assert set(comps) == set(COMPONENTS)
    assert all(comps[c] > 0 for c in ("patch embed", "attention", "Mix-FFN", "decoder", "loss")), comps
    with SavedTensorRecorder(list(model.parameters()) + list(model.buffers())) as rec:
        model.loss(model(x), labels)
    assert sum(comps.values()) == rec.bytes


def test_parse_bytes_and_size_fit():
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("16 GB") == 16e9
    assert parse_bytes("1.5mib") == 1.5 * 2**20
    assert parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes("lots")
    # 100 bytes per pixel, no parameters: 100 MiB holds 1024 x 1024 pixels
    comps = dict.fromkeys(COMPONENTS, 0)
    linear = MemoryRow("x", {**comps, "other": 100 * 256 * 256}, 100 * 128 * 128, 0, (256, 128), 1)
    assert linear.fit() == pytest.approx((100.0, 0.0))
    assert largest_square_size(linear, 100 * 2**20) == 1024
    assert largest_square_size(linear, 100 * 2**20 - 1) == 992  # rounded down to a multiple of 32
    # a quadratic term (attention matrices) makes the estimate smaller than the line through the first point
    quad = MemoryRow("y", {**comps, "other": 100 * 256**2 + 256**4 // 1000}, 100 * 128**2 + 128**4 // 1000, 0,
                     (256, 128), 1)
    a, q = quad.fit()
    assert a == pytest.approx(100.0, rel=1e-3) and q == pytest.approx(1e-3, rel=1e-2)
    assert largest_square_size(quad, 100 * 2**20) < 1024
    with_params = MemoryRow("z", linear.components, linear.total_small, 2**20, (256, 128), 1)
    assert largest_square_size(with_params, 16 * 2**20) == 0  # the optimizer state alone fills the budget


def test_memory_command_on_a_tiny_size(capsys):
    assert cli.main(["memory", "--model", "b0", "--size", "64", "--no-hf", "--budget", "2GiB"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(line for line in lines if line.startswith("component"))
    assert head.split()[1:] == ["save", "recompute", "checkpoint", "reference"]
    for comp in ("patch embed", "attention", "Mix-FFN", "decoder", "loss"):
        assert any(line.startswith(comp) for line in lines), comp
    total = [float(v) for v in next(line for line in lines if line.startswith("total")).split()[1:]]
    assert total[0] > total[1] > total[2] and total[3] > total[0]
    estimates = [line.split() for line in lines[lines.index(next(l for l in lines if l.startswith("Largest"))) + 1:]]
    side = {f[0]: int(f[1].split("x")[0]) for f in estimates if len(f) > 1 and f[1][0].isdigit()}
    assert side["checkpoint"] > side["save"] > side["reference"] > 0
    assert "Method: saved bytes measured" in out


def test_memory_command_on_a_setr(capsys):
    assert cli.main(["memory", "--model", "setr-mla-b16", "--size", "64", "--num-classes", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.startswith("component"))
    assert head.split()[1:] == ["save", "recompute", "checkpoint", "reference"]
    rows = {line[:14].strip(): [float(v) for v in line[14:].split()] for line in lines
            if line[:14].strip() in COMPONENTS + ("total",)}
    assert "Mix-FFN" not in rows and {"patch embed", "attention", "MLP", "decoder", "loss", "other"} <= set(rows)
    save, recompute, checkpoint, reference = rows["total"]
    assert checkpoint < recompute < save < reference
    assert rows["MLP"][1] < rows["MLP"][0] and rows["attention"][2] == 0.0  # checkpointed blocks keep their input only
