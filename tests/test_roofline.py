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
    # backward as written: programs of 16 classes x 7 low-res columns (32 output columns) x 32 low-res rows;
    # 8 bands, 37 column blocks, K padded to 160; each band past the first recomputes the 4 output rows of the
    # low-res row above it
    lanes = B * (H + 7 * 4) * 37 * 32 * 160
    assert lanes == pytest.approx(1.594e9, rel=1e-3)  # the kernel docstring's exp-lane count
    kernel = next(p for p in bwd["parts"] if p["name"] == "_upsample_cross_entropy_bwd_kernel")
    lowres = B * (h + 2 * 8) * 37 * 32 * 160  # the low-res rows upsampled along the columns, 3 flops a lane
    acc = B * (4 * (H + 7 * 4) + 4 * h) * 37 * 16 * 160  # (BLOCK_J, BLOCK_K) accumulators per row
    assert kernel["other_flops"] == pytest.approx(lanes * (3 + 1 + 16 + 4 + 2) + lowres * 3 + acc, rel=1e-5)
    # T = adj @ G: three tf32 dots (tf32x3) of 2 x 16 flops a lane, a tf32 flop priced as two bf16 ones
    assert kernel["gemm_flops"] == pytest.approx(lanes * 3 * 2 * 16 * 2, rel=1e-5)
    # logits once, coef + lse (fp32) and labels (int64) once, the gradient once in bf16: 449 MB
    assert kernel["bytes"] == pytest.approx(L * 2 + P * 16 + L * 2, rel=1e-5)
    assert kernel["bytes"] == pytest.approx(449e6, rel=2e-3)
    assert not any("fp32 -> logits dtype" in p["name"] for p in bwd["parts"])  # no fp32 copy to cast
    pred = max(bwd["kernel_bytes"] / 4.8e12, bwd["kernel_other_flops"] / 67e12) * 1e3
    assert bwd["predicted_ms"] == pytest.approx(pred, rel=1e-3)
    assert bwd["ratio"] == pytest.approx(bwd["predicted_ms"] / bwd["bound_ms"], rel=2e-3) and not bwd["flag"]


def test_cross_entropy_tiles_as_the_launcher():
    # the cost model's copy of the backward's GPU tiles against the launcher's own
    pytest.importorskip("triton")
    from segformer_fast.ops.upsample_cross_entropy import cost, triton_kernels as tk

    for K, w, W in ((150, 256, 1024), (19, 128, 512), (3, 7, 9), (150, 64, 1024), (21, 100, 100), (5, 5, 200)):
        assert cost.bwd_launch_config(K, w, W) == tk.bwd_launch_config(K, w, W, True), (
            f"upsample_cross_entropy/cost.py's bwd_launch_config disagrees with the launcher's at {(K, w, W)}")
    for K in (1, 3, 19, 21, 33, 150, 171, 1000):  # the forward's class block, as the model's lane count assumes
        cfg, n_kb = tk.launch_config(K, True), cost.cdiv(K, tk.fwd_class_block(K))
        assert cfg["BLOCK_K"] == tk.fwd_class_block(K)
        lanes = cost.roofline(1, 4, 4, K, 8, 8)["forward"].parts[1].other_flops - 64 * cost.LERP2D_FLOPS
        assert lanes == pytest.approx(64 * n_kb * cfg["BLOCK_K"] * (cost.LERP2D_FLOPS + 3 + cost.EXP_FLOPS)), K


def test_dwconv_backward_by_hand(b2):
    # stage 1: (8, 256*256, 256) bf16, tiles of 8 rows x 16 columns: 8 * 32 * 16 tiles, 3 layers
    E, tiles = 8 * 256 * 256 * 256, 8 * 32 * 16
    rows = [r for r in b2["rows"] if r["op"] == "dwconv3x3_gelu" and r["direction"] == "backward"]
    (kernel,) = [p for p in rows[0]["parts"] if p["name"] == "_dwconv3x3_gelu_bwd_kernel"]
    # pass 1: x, grad_y in and gz out once in bf16, the (tiles, 10, C) fp32 partials out
    assert kernel["bytes"] == pytest.approx(3 * (3 * E * 2 + tiles * 10 * 256 * 4), rel=1e-5)
    # gz (9 taps + bias, GELU' = erf 20 + exp 16 + 8, * grad_y) once per element; the weight/bias sums (9 FMAs + 1)
    assert kernel["other_flops"] == pytest.approx(3 * E * (19 + 44 + 1 + 19), rel=1e-5)
    # pass 2: the forward kernel, flipped, on gz: gz in, grad_x out in bf16, 9 FMAs per element
    (flipped,) = [p for p in rows[0]["parts"] if p["name"] == "_dwconv3x3_gelu_fwd_kernel (flipped, on gz)"]
    assert flipped["bytes"] == pytest.approx(3 * 2 * E * 2, rel=1e-5)
    assert flipped["other_flops"] == pytest.approx(3 * E * 18, rel=1e-5)
    assert len(rows[0]["parts"]) == 3  # the two kernels and partial.sum(0)
    mix = [r for r in b2["rows"] if r["op"] == "mix_ffn" and r["direction"] == "backward"]
    # past 128 channels (stage 3) Mix-FFN's conv is the dwconv3x3_gelu model
    (in_mix,) = [p for p in mix[2]["parts"] if p["name"] == "_dwconv3x3_gelu_bwd_kernel"]
    (stage3,) = [p for p in rows[2]["parts"] if p["name"] == "_dwconv3x3_gelu_bwd_kernel"]
    assert in_mix == stage3
    # up to 128 (stage 1) the fused backward: h and gout in, gz out, W2, fp32 partials of 4 * 132 / (256 / 32) = 66
    # pixel groups; gW2 and gy on tensor cores
    T, C = 8 * 256 * 256, 64
    (hid,) = [p for p in mix[0]["parts"] if p["name"].startswith("_stencil_wgrad_kernel (hidden")]
    partials = 66 * (C * 256 + 10 * 256 + C) * 4
    assert hid["bytes"] == pytest.approx(3 * (2 * E * 2 + T * C * 2 + C * 256 * 2 + partials), rel=1e-5)
    assert hid["gemm_flops"] == pytest.approx(3 * 2 * (2 * T * C * 256), rel=1e-5)
    assert not any("dwconv3x3_gelu_bwd" in p["name"] for p in mix[0]["parts"])


def test_upsample_sum_prep_pass_by_hand():
    # the decoder's call has no prep pass; with ReLU and an affine (dscale, dshift) one pass reads the gradient,
    # reads `out`, writes the masked gradient (bf16), gathers the maps again and writes (blocks, D) fp32 partials
    from segformer_fast.ops.upsample_sum.cost import roofline as up

    B, D, H, sizes = 3, 96, 20, [(20, 20), (10, 10), (5, 5)]
    N, ins = B * H * H * D, sum(B * h * w * D for h, w in sizes)
    plain = up(B, D, H, H, sizes)["backward"]
    assert not any("prep" in p.name for p in plain.parts)
    blocks = -(-B * H * H // (4096 // 128))  # BLOCK_P = 4096 // BLOCK_D, BLOCK_D = 128 for D = 96
    both = up(B, D, H, H, sizes, relu=True, affine=True)["backward"]
    (prep,) = [p for p in both.parts if p.name == "_upsample_sum_bwd_prep_kernel"]
    assert prep.bytes == pytest.approx(3 * N * 2 + ins * 2 + 2 * blocks * D * 4)
    relu = up(B, D, H, H, sizes, relu=True)["backward"]
    assert [p.bytes for p in relu.parts if "prep" in p.name] == [3 * N * 2]
    # one adjoint launch for all maps reads the (masked) gradient once in its own dtype and writes the maps,
    # whatever the prep
    assert [p.bytes for p in both.parts if p.name.startswith("_upsample_sum_bwd_kernel")] == [(N + ins) * 2]
    assert relu.min_bytes == plain.min_bytes + N * 2 and both.min_bytes == relu.min_bytes + ins * 2


def test_attention_counts_its_matmuls(b2):
    cfg = get_config("b2")
    r = [r for r in b2["rows"] if r["op"] == "sr_attention" and r["direction"] == "backward"]
    assert [x["calls"] for x in r] == list(cfg.depths)
    # stage 1: N = 256^2 queries, M = 32^2 keys, C = 64, 3 layers; flash backward 5 matmuls, as written 7 with O
    # kept (memory="save", the default: dQ and dK/dV each form S and dP), 9 when O is recomputed ("recompute")
    mm = 2 * 8 * 256**2 * 32**2 * 64 * 3
    assert r[0]["gemm_flops"] == pytest.approx(5 * mm, rel=1e-5)
    assert r[0]["kernel_gemm_flops"] == pytest.approx(7 * mm, rel=1e-5)
    assert not any("O from lse" in p["name"] for p in r[0]["parts"])
    from segformer_fast.ops.sr_attention import cost

    shapes = dict(B=8, N=256**2, M=32**2, C=64, heads=1)
    recompute = cost.roofline(**shapes, **cost.VARIANTS['memory="recompute" (O recomputed in backward)'])
    assert recompute["backward"].kernel_gemm_flops * 3 == pytest.approx(9 * mm, rel=1e-5)
    assert recompute["backward"].min_bytes == cost.roofline(**shapes)["backward"].min_bytes
    (v,) = [t for t in b2["variants"] if t["op"] == "sr_attention" and t["direction"] == "backward"]
    (d,) = [t for t in b2["totals"] if t["op"] == "sr_attention" and t["direction"] == "backward"]
    assert v["bound_ms"] == d["bound_ms"] and v["predicted_ms"] > d["predicted_ms"]
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
