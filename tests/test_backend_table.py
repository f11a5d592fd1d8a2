"""benchmarks/backend_table.py on the CPU: Triton's interpreter and the CUDA stand-in at toy shapes.

The timings mean nothing here; what is checked is that every op and implementation is called through
its public function, that an implementation that cannot run records why instead of stopping the
table, and the order and files it writes.
"""

import json
import os
import sys

import pytest
import torch

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the benchmarks package

from benchmarks import backend_table  # noqa: E402
from benchmarks.roofline import Call  # noqa: E402

TOY = [
    Call("sr_attention", "toy attention", 2, dict(B=1, N=16, M=4, C=64, heads=2, dtype_bytes=4)),  # 4x4, sr 2
    Call("mix_ffn", "toy mix_ffn", 2, dict(B=1, H=5, W=6, C=8, hidden=32, dtype_bytes=4)),
    Call("dwconv3x3_gelu", "toy dwconv", 2, dict(B=1, H=5, W=6, C=32, dtype_bytes=4)),
    Call("upsample_sum", "toy upsample_sum", 1, dict(B=1, D=8, H=8, W=8, sizes=[(8, 8), (4, 4)], dtype_bytes=4)),
    Call("upsample_cross_entropy", "toy loss", 1, dict(B=1, h=4, w=4, K=5, H=8, W=8, dtype_bytes=4)),
    Call("all_mlp_decoder", "one implementation on a GPU: not in the table", 1, {}),
]


def test_every_op_and_implementation_timed_or_explained(cuda_standin, tmp_path):
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the toy run needs the interpreter and the CUDA stand-in (no GPU)")
    data = backend_table.measure("cpu", dtype=torch.float32, repeat=1, warmup=0, calls=TOY)
    got = {(r["op"], r["backend"]): r for r in data["rows"]}
    assert set(got) == {(op, b) for op, backends in backend_table.GPU_OPS.items() for b in backends}
    # ATen's flash / efficient attention take CUDA tensors: recorded, and the rest go on
    assert "CUDA tensors" in got[("sr_attention.core", "aten")]["error"]
    for key, r in got.items():
        if key != ("sr_attention.core", "aten"):
            assert "error" not in r, r
            assert r["forward_ms"] > 0 and r["train_ms"] > 0 and r["calls"] in (1, 2)
    assert data["order"]["sr_attention.core"] == ["triton"] and sorted(data["order"]["sr_attention"]) == [
        "cuda", "triton"]
    for op in ("dwconv3x3_gelu", "mix_ffn", "upsample_sum", "upsample_cross_entropy"):
        per = data["totals"][op]
        assert sorted(data["order"][op]) == ["cuda", "triton"]
        assert per[data["order"][op][0]]["train"] <= per[data["order"][op][1]]["train"]
    json_path, md_path = backend_table.write(data, str(tmp_path))
    assert json.load(open(json_path))["order"] == data["order"]
    md = open(md_path).read()
    assert "| mix_ffn | triton |" in md and "sr_attention.core aten" in md
    skipped = backend_table.measure("cpu", dtype=torch.float32, repeat=1, warmup=0, calls=TOY[:1], deadline=0.0)
    assert all(r["error"] == "skipped: time budget" for r in skipped["rows"]) and skipped["order"] == {
        "sr_attention": [], "sr_attention.core": []}


def test_a_fallback_is_not_timed_as_the_backend_asked():
    # head dim 24: the Triton core declares a fallback to the torch core, which must not be timed as "triton"
    why = backend_table._resolves_to("sr_attention.core", "triton", torch.empty(1), dict(C=48, heads=2))
    assert why == "'triton' falls back to 'torch' here"


def test_an_interrupt_keeps_what_was_measured(cuda_standin, monkeypatch):
    """A time limit's SIGINT (KeyboardInterrupt) mid-table: the rows timed so far are kept, the rest marked."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the toy run needs the interpreter and the CUDA stand-in (no GPU)")
    real = backend_table._runner

    def runner(op, backend, *args):
        if op == "upsample_sum" and backend == "cuda":
            raise KeyboardInterrupt
        return real(op, backend, *args)

    monkeypatch.setattr(backend_table, "_runner", runner)
    data = backend_table.measure("cpu", dtype=torch.float32, repeat=1, warmup=0, calls=TOY[3:5])
    got = {(r["op"], r["backend"]): r for r in data["rows"]}
    assert got[("upsample_sum", "triton")]["train_ms"] > 0
    assert got[("upsample_sum", "cuda")]["error"] == "interrupted"
    assert {got[("upsample_cross_entropy", b)]["error"] for b in ("triton", "cuda")} == {"skipped: interrupted"}
    assert data["meta"]["interrupted"] and data["order"]["upsample_sum"] == ["triton"]  # those timed at every call
