"""benchmarks/aot_compile.py: every Triton kernel compiles for sm_90 and sm_80, in fp32/fp16/bf16, with no GPU.

The script runs in a subprocess without TRITON_INTERPRET (a stub driver's target, meta tensors, the
package's own launchers at MiT-B2 1024x1024 batch 8 shapes). The checks would fail if compiling
silently did nothing: every kernel of every triton_kernels module must come back with a cubin and
a ptxas register count for every arch x dtype, and the attention dots must be wgmma on sm_90
(PTX and SASS), mma.sync on sm_80, and plain FMAs for fp32 (exact fp32 dots, no TF32).
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPS = ("sr_attention", "dwconv3x3_gelu", "mix_ffn", "upsample_sum", "upsample_cross_entropy", "all_mlp_decoder")
ARCHS, DTYPES = ("sm_90", "sm_80"), ("fp32", "fp16", "bf16")


def _kernels() -> set[str]:
    names = set()
    for op in OPS:
        mod = importlib.import_module(f"segformer_fast.ops.{op}.triton_kernels")
        names |= {n for n in vars(mod) if n.startswith("_") and n.endswith("_kernel")}
        names -= set(getattr(mod, "DIAGNOSTIC_KERNELS", ()))  # launched by test helpers only, never by the model
    return names


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "aot_compile.py"), "--out", str(out / "aot.json"),
           "--markdown", str(out / "aot.md")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "aot.json").read_text()), (out / "aot.md").read_text()


def test_every_kernel_compiles_for_every_arch_and_dtype(aot):
    data, md = aot
    kernels = _kernels()
    for op in OPS:  # every op's module was found and has kernels
        assert any(r["op"] == op for r in data["kernels"]), op
    rows = data["kernels"]
    for arch in ARCHS:
        for dtype in DTYPES:
            got = {r["kernel"] for r in rows if r["arch"] == arch and r["dtype"] == dtype}
            assert got == kernels, (arch, dtype, sorted(kernels - got))
    for r in rows:
        assert r["cubin_bytes"] > 0 and 0 < r["regs"] <= 255 and r["num_warps"] in (1, 2, 4, 8, 16), r
        assert r["ptx_target"] == ("sm_90a" if r["arch"] == "sm_90" else "sm_80"), r
        if r["kernel"] == "_upsample_sum_fwd_kernel":
            assert (r["constexprs"]["BLOCK_P"], r["constexprs"]["BLOCK_D"]) == (32, 128)
        if r["kernel"] == "_upsample_cross_entropy_bwd_kernel":  # K = 150, 256 -> 1024
            assert (r["constexprs"]["BLOCK_C"], r["constexprs"]["BLOCK_K"]) == (32, 16)
    for k in kernels:
        assert f"| `{k}` |" in md


def test_every_autotuned_configuration_is_compiled(aot):
    # each configuration a GPU's timing can pick is in the report, at every arch and in the dtypes that use it
    from segformer_fast.ops.sr_attention import triton_kernels as attn
    from segformer_fast.ops.dwconv3x3_gelu import triton_kernels as dw

    rows = aot[0]["kernels"]

    def tiles(kernel, arch, dtype, names):
        return {(*(r["constexprs"][n] for n in names), r["num_warps"], r["num_stages"]) for r in rows
                if (r["kernel"], r["arch"], r["dtype"]) == (kernel, arch, dtype)}

    def declared(tuner, names):
        return {(*(c.meta[n] for n in names), c.num_warps, c.num_stages) for c in tuner.configs}

    for arch in ARCHS:
        for dtype in DTYPES:  # fp32 on a GPU without TF32: the exact-fp32 ("ieee") tiles
            fwd, dq = (attn.FWD_IEEE_TUNER, attn.DQ_IEEE_TUNER) if dtype == "fp32" else (attn.FWD_TUNER, attn.DQ_TUNER)
            nm = ("BLOCK_N", "BLOCK_M")
            assert tiles("_sr_attention_fwd_kernel", arch, dtype, nm) == declared(fwd, nm), (arch, dtype)
            assert tiles("_sr_attention_bwd_dq_kernel", arch, dtype, nm) == declared(dq, nm), (arch, dtype)
            # the forward's tiles, and launch_config's (the backward's flipped pass), capped by the small stages
            got = {t for t in tiles("_dwconv3x3_gelu_fwd_kernel", arch, dtype, ("ROWS", "BLOCK_W", "BLOCK_C"))}
            assert declared(dw.FWD_TUNER, ("ROWS", "BLOCK_W", "BLOCK_C")) <= got, (arch, dtype)


def test_attention_dots_use_the_tensor_cores_of_each_arch(aot):
    rows = [r for r in aot[0]["kernels"] if r["op"] == "sr_attention"]
    for r in rows:
        dots = r["dots"]
        assert dots["tt.dot"] > 0, r
        if r["dtype"] == "fp32":  # exact fp32 dots ("ieee"): no tensor-core instruction at all
            assert r["tensor_cores"] == "fma (no tensor cores)" and dots["HGMMA"] == dots["HMMA"] == 0, r
        elif r["arch"] == "sm_80":
            assert dots["wgmma"] == 0 and dots["mma.sync"] > 0 and dots["HMMA"] > 0, r
    for dtype in ("fp16", "bf16"):
        fwd = [r for r in rows if (r["arch"], r["dtype"], r["kernel"]) == ("sm_90", dtype, "_sr_attention_fwd_kernel")]
        assert fwd and all("wgmma" in r["tensor_cores"] and r["dots"]["HGMMA"] > 0 for r in fwd), fwd


def test_no_kernel_spills(aot):
    # every kernel, in every configuration and at every shape the model launches, keeps its registers: in
    # fp16/bf16 (what mixed-precision training runs) and in fp32 (exact-fp32 dots included)
    spills = [(r["kernel"], r["arch"], r["dtype"], r["spill_stores"]) for r in aot[0]["kernels"]
              if r["spill_stores"] or r["spill_loads"]]
    assert spills == []


def test_committed_report_shows_no_spills():
    # the committed report (regenerated after every kernel change) states the same goal
    data = json.loads((ROOT / "benchmarks" / "results" / "aot" / "aot_sm90_sm80.json").read_text())
    assert {r["op"] for r in data["kernels"]} >= set(OPS)
    spilled = [(r["kernel"], r["arch"], r["dtype"]) for r in data["kernels"] if r["spill_stores"] or r["spill_loads"]]
    assert spilled == []
