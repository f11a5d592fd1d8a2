"""benchmarks/roofline.py and the per-op cost models (segformer_fast/ops/<op>/cost.py).

The committed report must be what the models give now; one op's arithmetic is redone here by hand;
every op with Triton kernels has a model; the shapes come from the config registry; a model whose
kernel file changed is named; measure() produces its measured columns (in the interpreter, toy shapes).
"""

import importlib
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import roofline  # noqa: E402

from segformer_fast.configs import get_config  # noqa: E402
from segformer_fast.dispatch import specs  # noqa: E402


@pytest.fixture(scope="module")
def b2():
    return roofline.report("b2", 1024, 8)


def _row(data, op, direction):
    (r,) = [r for r in data["rows"] if r["op"] == op and r["direction"] == direction]
    return r


def test_committed_report_is_current(b2):
    json_text, md_text = roofline.render(b2)
    json_path, md_path = roofline.paths("b2", 1024)
    for path, text in ((json_path, json_text), (md_path, md_text)):
        assert os.path.exists(path), f"{path} missing: run python benchmarks/roofline.py"
        with open(path) as f:
            assert f.read() == text, f"{path} is not current: run python benchmarks/roofline.py"
    assert roofline.main(["--check"]) == 0


def test_cross_entropy_arithmetic_by_hand(b2):
    # B2 at 1024, batch 8: (8, 256, 256, 150) bf16 logits, (8, 1024, 1024) int64 labels
    B, h, K, H = 8, 256, 150, 1024
    P, L = B * H * H, B * h * h * K
    fwd, bwd = _row(b2, "upsample_cross_entropy", "forward"), _row(b2, "upsample_cross_entropy", "backward")
    assert fwd["min_bytes"] == pytest.approx(L * 2 + P * 8 + P * 4, rel=1e-5)  # logits, labels in; lse out
    assert bwd["min_bytes"] == pytest.approx(L * 2 + P * 8 + P * 4 + L * 2, rel=1e-5)  # + grad logits out
    # forward minimum: per upsampled logit a separable sample (4), max/subtract/add (3), an exp (16)
    assert fwd["other_flops"] == pytest.approx(P * K * (4 + 3 + 16), rel=1e-5)
    assert fwd["exps"] == pytest.approx(P * K, rel=1e-5) and fwd["gemm_flops"] == 0
    bound = max(fwd["min_bytes"] / 4.8e12, fwd["other_flops"] / 67e12) * 1e3
    assert fwd["bound_ms"] == pytest.approx(bound, rel=1e-3) and fwd["bound_by"] == "fp32"
    from segformer_fast.ops.upsample_cross_entropy import cost

    if cost.MODELLED["triton_kernels.py"].startswith("3b6c51d65a"):  # the kernels these figures describe
        # backward as written: every input pixel recomputes a 12x12 window of outputs over 3 class blocks of 64
        lanes = B * h * h * (3 * 64) * 12 * 12
        kernel = next(p for p in bwd["parts"] if p["name"] == "_upsample_cross_entropy_bwd_kernel")
        assert kernel["other_flops"] == pytest.approx(lanes * (11 + 1 + 16 + 2 + 1 + 1 + 2), rel=1e-5)
        # coef + lse (fp32) and labels (int64) re-read by each of the 3 class-block passes (134 MB > L2)
        assert kernel["bytes"] == pytest.approx(3 * P * 16 + L * 2 + L * 4, rel=1e-5)
    pred = max(bwd["kernel_bytes"] / 4.8e12, bwd["kernel_other_flops"] / 67e12) * 1e3
    assert bwd["predicted_ms"] == pytest.approx(pred, rel=1e-3)
    assert bwd["ratio"] == pytest.approx(bwd["predicted_ms"] / bwd["bound_ms"], rel=1e-3) and bwd["flag"]


def test_attention_counts_its_matmuls(b2):
    cfg = get_config("b2")
    r = [r for r in b2["rows"] if r["op"] == "sr_attention" and r["direction"] == "backward"]
    assert [x["calls"] for x in r] == list(cfg.depths)
    # stage 1: N = 256^2 queries, M = 32^2 keys, C = 64, 3 layers; flash backward 5 matmuls, as written 9
    mm = 2 * 8 * 256**2 * 32**2 * 64 * 3
    assert r[0]["gemm_flops"] == pytest.approx(5 * mm, rel=1e-5)
    assert r[0]["kernel_gemm_flops"] == pytest.approx(9 * mm, rel=1e-5)
    # q, o, dO, dQ (8, 65536, 64) and k, v, dK, dV (8, 1024, 64) bf16, lse (8, 1, 65536) fp32, per layer
    q, kv, lse = 8 * 256**2 * 64 * 2, 8 * 32**2 * 64 * 2, 8 * 256**2 * 4
    assert r[0]["min_bytes"] == pytest.approx(3 * (4 * q + 4 * kv + lse), rel=1e-5)
    fwd = [x for x in b2["rows"] if x["op"] == "sr_attention" and x["direction"] == "forward"][0]
    assert fwd["min_bytes"] == pytest.approx(3 * (2 * q + 2 * kv + lse), rel=1e-5)


def test_attention_splits_as_the_launcher():
    # the cost model's copy of the dK/dV kernel's query splits (bf16 tiles) against the launcher's own
    pytest.importorskip("triton")
    from segformer_fast.ops.sr_attention import cost, triton_kernels as tk

    shapes = ((65536, 1024, 8), (16384, 1024, 16), (4096, 1024, 40), (1024, 1024, 64), (300, 7, 3), (5000, 64, 1))
    for n, m, bh in shapes:
        s = tk.dkdv_splits(n, m, bh, 132)
        rows = -(-(-(-n // tk.BLOCK_Q)) // s) * tk.BLOCK_Q  # the launcher's rows per split, then no empty split
        assert cost.dkdv_splits(n, m, bh) == -(-n // rows), (
            f"sr_attention/cost.py's dkdv_splits disagrees with the launcher's at {(n, m, bh)}: update the model")


def test_every_triton_op_has_a_cost_model(b2):
    with_triton = {name.split(".")[0] for name, spec in specs().items() if "triton" in spec.impls}
    assert with_triton, "no op with Triton kernels registered"
    assert with_triton <= set(roofline.MODELLED_OPS), sorted(with_triton - set(roofline.MODELLED_OPS))
    for op in roofline.MODELLED_OPS:
        mod = importlib.import_module(f"segformer_fast.ops.{op}.cost")
        assert callable(mod.roofline) and mod.MODELLED, op
        rows = [r for r in b2["rows"] if r["op"] == op]
        assert {r["direction"] for r in rows} == {"forward", "backward"}, op
        for r in rows:
            assert r["min_bytes"] > 0 and r["bound_ms"] > 0 and r["predicted_ms"] > 0 and r["parts"], r
    assert {r["op"] for r in b2["rows"]} == set(roofline.MODELLED_OPS)


def test_shapes_come_from_the_registry():
    cfg = get_config("b0")
    calls = roofline.segformer_calls("b0", 512, 2)
    attn = [c for c in calls if c.op == "sr_attention"]
    assert [c.shapes["C"] for c in attn] == list(cfg.hidden_sizes)
    assert [c.shapes["heads"] for c in attn] == list(cfg.num_heads)
    assert [c.count for c in attn] == list(cfg.depths)
    assert [c.shapes["N"] for c in attn] == [128**2, 64**2, 32**2, 16**2]
    assert [c.shapes["M"] for c in attn] == [16**2] * 4  # sr ratios 8, 4, 2, 1
    (up,) = [c for c in calls if c.op == "upsample_sum"]
    assert up.shapes["D"] == cfg.decoder_dim and up.shapes["sizes"] == [(128, 128), (64, 64), (32, 32), (16, 16)]
    (ce,) = [c for c in calls if c.op == "upsample_cross_entropy"]
    assert (ce.shapes["K"], ce.shapes["h"], ce.shapes["H"], ce.shapes["B"]) == (cfg.num_classes, 128, 512, 2)


def test_a_changed_kernel_file_is_named(monkeypatch):
    from segformer_fast.ops.dwconv3x3_gelu import cost

    path = os.path.join(ROOT, "segformer_fast", "ops", "dwconv3x3_gelu", "triton_kernels.py")
    current = {"triton_kernels.py": roofline._git_blob_sha1(path)}
    monkeypatch.setattr(cost, "MODELLED", current)
    assert roofline.stale_models(("dwconv3x3_gelu",)) == []
    monkeypatch.setattr(cost, "MODELLED", {"triton_kernels.py": "0" * 40})
    (msg,) = roofline.stale_models(("dwconv3x3_gelu",))
    assert "segformer_fast/ops/dwconv3x3_gelu/triton_kernels.py changed" in msg and "cost.py" in msg


def test_measure_adds_measured_columns(monkeypatch, tmp_path):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and no Triton interpreter")
    tiny = [roofline.Call("sr_attention", "toy", 2, dict(B=1, N=16, M=4, C=64, heads=2, dtype_bytes=4))]
    monkeypatch.setattr(roofline, "segformer_calls", lambda *args, **kwargs: tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = roofline.measure(device, dtype=torch.float32, repeat=1, warmup=0)
    assert [r["direction"] for r in data["rows"]] == ["forward", "backward"]
    for r in data["rows"]:
        assert r["measured_ms"] > 0, r.get("measure_error")
    assert all(t["measured_ms"] > 0 for t in data["totals"])
    md = roofline.markdown(data, measured=True)
    assert "| measured ms | of bound |" in md
    for t in data["totals"]:
        (line,) = [x for x in md.splitlines() if x.startswith(f"| sr_attention | {t['direction']} |")]
        assert line.endswith(f" {t['measured_ms']:.3f} | {t['bound_ms'] / t['measured_ms']:.0%} |"), line
    json_path, md_path = roofline.write_measured(data, str(tmp_path))
    assert json_path.endswith("_bf16_measured.json") and open(md_path).read() == md
    skipped = roofline.measure(device, dtype=torch.float32, repeat=1, warmup=0, deadline=0.0)
    assert all(r["measure_error"] == "skipped: time budget" and "measured_ms" not in r for r in skipped["rows"])
