"""Compile every Triton kernel for real GPU targets on a machine without a GPU, and report its resources.

A stub Triton driver reports the target (sm_90: ``GPUTarget("cuda", 90, 32)``, sm_80: ``(.., 80, 32)``),
kernel launches become compile-only warm-ups, and the package's own launchers run on meta tensors
at the shapes of a real training step: a SegFormer from the model registry (MiT-B2 by default) at
1024x1024, batch 8. Triton compiles each kernel exactly as for a launch, through its bundled ptxas;
this script reads back, per kernel x arch x dtype: registers and spills (Triton's own ptxas -v log),
shared memory, num_warps/num_stages, and whether the dots became wgmma (sm_90) or mma.sync, counted
in the PTX and confirmed in the SASS (HGMMA / HMMA, via cuobjdump).

    python benchmarks/aot_compile.py --markdown benchmarks/results/aot/aot_sm90_sm80.md
    python benchmarks/aot_compile.py --arch 90 --dtype bf16 --out /tmp/aot.json
    python benchmarks/aot_compile.py --render benchmarks/results/aot/aot_sm90_sm80.json --markdown out.md

benchmarks/results/aot/ holds the tables from triton 3.9 (this project's environment) and, in the
``_triton3.6`` files, from the same command with triton 3.6 (the GPU machine's) on the path: the
two ptxas versions allocate registers differently.

A kernel that autotunes (ops/triton_launch.Autotuner) is compiled in every configuration it declares,
so the report covers whatever a GPU's timing can pick.

Each (arch, dtype) compiles in its own process (``--jobs`` at a time) with TRITON_INTERPRET unset
and a fresh Triton cache, so every kernel really goes through ptxas. Any compile error, or a kernel
that produced no cubin, exits non-zero.

Triton versions: written against triton 3.9 and checked with 3.6 (the GPU machine's). Both have
``JITFunction.run(*args, grid, warmup, **kwargs)`` (warmup=True compiles and returns the
CompiledKernel without launching), ``triton.runtime.driver.driver.set_active``,
``triton.backends.compiler.GPUTarget`` and ``knobs.nvidia.dump_ptxas_log``; a Triton whose run()
lacks ``grid``/``warmup`` is refused with a message, and the ptxas log, where a Triton does not
print it, is recomputed by running the same ptxas on the kernel's PTX.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "aot" / "aot_sm90_sm80.json"
ARCHS = (90, 80)
DTYPES = ("fp32", "fp16", "bf16")
# Per-block shared memory a kernel may use (H100/H200 and A100): what the stub driver reports.
MAX_SHARED = {90: 232448, 80: 166912}


# ---------------------------------------------------------------------------------------------
# the worker: one (arch, dtype) in a process with no TRITON_INTERPRET


class _StubUtils:
    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED.get(self.arch, 101376), "multiprocessor_count": 132, "warpSize": 32}

    def load_binary(self, *args, **kwargs):
        raise RuntimeError("aot_compile: compile only, nothing is loaded on a device")


class _StubDriver:
    """The part of a Triton driver that compiling touches: the target, a device id, a stream."""

    def __init__(self, target):
        self.target = target
        self.utils = _StubUtils(target.arch)

    @classmethod
    def is_active(cls):
        return False

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # JITFunction caches the target per device id: one id per arch

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")

    def launcher_cls(self, *args, **kwargs):
        raise RuntimeError("aot_compile: compile only, no kernel is launched")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _cases(model: str, image: int, batch: int, dtype):
    """(op, call, label, thunk) per launcher call of one training step's shapes, meta tensors of ``dtype``."""
    import torch

    from segformer_fast.configs import SEGFORMER_VARIANTS
    from segformer_fast.ops.all_mlp_decoder.triton_kernels import (
        bn_relu_dropout_bwd_linear_triton,
        bn_relu_dropout_bwd_reduce_linear_triton,
        bn_relu_dropout_bwd_reduce_triton,
        bn_relu_dropout_bwd_triton,
        bn_relu_dropout_fwd_triton,
        bn_relu_dropout_linear_triton,
        bn_stats_gather_triton,
        bn_stats_triton,
        StageOne,
    )
    from segformer_fast.ops.dwconv3x3_gelu.triton_kernels import dwconv3x3_gelu_bwd, dwconv3x3_gelu_fwd
    from segformer_fast.ops.mix_ffn.triton_kernels import dwconv_gelu_linear_triton, fused_fc2_applies, mix_ffn_bwd_triton
    from segformer_fast.ops.sr_attention.triton_kernels import sr_attention_bwd_triton, sr_attention_fwd_triton
    from segformer_fast.ops.upsample_cross_entropy.triton_kernels import (
        upsample_cross_entropy_bwd_triton,
        upsample_cross_entropy_fwd_triton,
    )
    from segformer_fast.ops.upsample_sum.triton_kernels import upsample_sum_bwd_triton, upsample_sum_fwd_triton

    cfg = SEGFORMER_VARIANTS[model]

    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    res, sizes = image, []
    for s in cfg.strides:  # overlapping patch embeddings: kernel 2s-1, padding s//2 -> ceil(H / s)
        res = _ceil(res, s)
        sizes.append(res)
    cases = []
    for i, (c, heads, sr, ratio, hw) in enumerate(zip(cfg.hidden_sizes, cfg.num_heads, cfg.sr_ratios,
                                                      cfg.mlp_ratios, sizes)):
        n, m, d = hw * hw, (hw // sr) ** 2, c // heads
        tag = f"stage {i + 1}: C={c} heads={heads} sr={sr} {hw}x{hw}"
        q, k, v, do, o = t(batch, n, c), t(batch, m, c), t(batch, m, c), t(batch, n, c), t(batch, n, c)
        lse = t(batch, heads, n, dt=torch.float32)
        cases += [
            ("sr_attention", "fwd", tag, partial(sr_attention_fwd_triton, q, k, v, heads, d**-0.5)),
            ("sr_attention", "fwd O from lse", tag, partial(sr_attention_fwd_triton, q, k, v, heads, d**-0.5, lse=lse)),
            ("sr_attention", "bwd", tag, partial(sr_attention_bwd_triton, do, q, k, v, o, lse, heads, d**-0.5)),
        ]
        hidden = c * ratio
        x, gy, w, b = t(batch, n, hidden), t(batch, n, hidden), t(hidden, 1, 3, 3), t(hidden)
        tag = f"stage {i + 1}: hidden={hidden} {hw}x{hw}"
        cases += [
            ("dwconv3x3_gelu", "fwd", tag, partial(dwconv3x3_gelu_fwd, x, (hw, hw), w, b)),
            ("dwconv3x3_gelu", "bwd", tag, partial(dwconv3x3_gelu_bwd, gy, x, (hw, hw), w, b)),
        ]
        if fused_fc2_applies(c):  # Mix-FFN's forward with fc2 fused into the conv + GELU (C_out = C)
            cases.append(("mix_ffn", "fwd (conv + GELU + fc2)", f"stage {i + 1}: hidden={hidden} C={c} {hw}x{hw}",
                          partial(dwconv_gelu_linear_triton, x, (hw, hw), w, b, t(c, hidden), t(c))))
            cases.append(("mix_ffn", "bwd (three kernels after fc1)", f"stage {i + 1}: hidden={hidden} C={c} {hw}x{hw}",
                          partial(mix_ffn_bwd_triton, t(batch, n, c), t(batch, n, c), x, (hw, hw), w, b, t(hidden, c),
                                  t(c, hidden))))
    D, H = cfg.decoder_dim, sizes[0]
    maps = [t(batch, s, s, D) for s in sizes]  # the fused decoder's channels-last stage maps
    scale, shift = t(D, dt=torch.float32), t(D, dt=torch.float32)
    grad, out = t(batch, H, H, D), t(batch, H, H, D)
    tag = f"D={D}, maps {'/'.join(map(str, sizes))} -> {H}x{H}"
    hws = [(s, s) for s in sizes]
    cases += [
        ("upsample_sum", "fwd", tag, partial(upsample_sum_fwd_triton, maps, H, H, None, None, False)),
        ("upsample_sum", "fwd affine+ReLU", tag, partial(upsample_sum_fwd_triton, maps, H, H, scale, shift, True)),
        ("upsample_sum", "bwd", tag, partial(upsample_sum_bwd_triton, grad, hws, [], None, None, False, False, False)),
        ("upsample_sum", "bwd affine+ReLU, dscale/dshift", tag,
         partial(upsample_sum_bwd_triton, grad, hws, maps, out, scale, True, True, True)),
    ]
    N, p = batch * H * H, cfg.decoder_dropout
    # what the training decoder's gathering kernels read: the finest stage as its features (its map computed in the
    # kernels), the coarser stages' maps
    C1 = cfg.hidden_sizes[0]
    src = [StageOne(t(batch, C1, H, H), t(D, C1), t(D)), *maps[1:]]
    u2, g2, v = t(N, D), t(N, D), t(D, dt=torch.float32)  # the training decoder's u, dL/dd; per-channel vectors
    tag = f"u ({N}, {D}), dropout {p:g}"
    drop = (p, 1234, H * H, cfg.decoder_dropout2d)  # p, seed, pixels per image, dropout2d
    cases += [
        ("all_mlp_decoder", "BN statistics", tag, partial(bn_stats_triton, u2)),
        ("all_mlp_decoder", "BN + ReLU + dropout fwd", tag, partial(bn_relu_dropout_fwd_triton, u2, v, v, *drop, out=u2)),
        ("all_mlp_decoder", "BN statistics, u gathered from the stage maps", tag,
         partial(bn_stats_gather_triton, src, H, H)),
        ("all_mlp_decoder", "classifier, u gathered and BN + ReLU + dropout in its prologue", tag,
         partial(bn_relu_dropout_linear_triton, src, H, H, v, v, t(cfg.num_classes, D), t(cfg.num_classes), p, 1234,
                 cfg.decoder_dropout2d)),
        ("all_mlp_decoder", "bwd pass 1 (sums, d)", tag,
         partial(bn_relu_dropout_bwd_reduce_triton, u2, g2, v, v, v, v, *drop)),
        ("all_mlp_decoder", "bwd pass 2 (dL/du)", tag,
         partial(bn_relu_dropout_bwd_triton, u2, g2, v, v, v, v, v, v, v, N, *drop, out=g2)),
        ("all_mlp_decoder", "bwd pass 1, u gathered, classifier fused (sums, dWc, dbc)", tag,
         partial(bn_relu_dropout_bwd_reduce_linear_triton, src, H, H, t(N, cfg.num_classes), t(cfg.num_classes, D),
                 v, v, v, v, p, 1234, cfg.decoder_dropout2d)),
        ("all_mlp_decoder", "bwd pass 2, u gathered, classifier fused (dL/du, dA_1)", tag,
         partial(bn_relu_dropout_bwd_linear_triton, src, H, H, t(N, cfg.num_classes), t(cfg.num_classes, D), v, v, v,
                 v, v, v, v, N, p, 1234, cfg.decoder_dropout2d, stage_one_grad=True)),
    ]
    K = cfg.num_classes
    logits, labels = t(batch, H, H, K), t(batch, image, image, dt=torch.int64)
    coef, lse = t(batch, image, image, dt=torch.float32), t(batch, image, image, dt=torch.float32)
    tag = f"K={K}, {H}x{H} -> {image}x{image}"
    cases += [
        ("upsample_cross_entropy", "fwd", tag, partial(upsample_cross_entropy_fwd_triton, logits, labels, 255)),
        ("upsample_cross_entropy", "bwd", tag,
         partial(upsample_cross_entropy_bwd_triton, coef, logits, labels, lse, out_dtype=dtype)),  # as the op calls it
    ]
    return cases


_PTXAS_NUMBERS = {
    "regs": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "static_smem": r"(\d+) bytes smem",
}


def _parse_ptxas(log: str) -> dict:
    out = {}
    for key, pat in _PTXAS_NUMBERS.items():
        hit = re.search(pat, log)
        out[key] = int(hit.group(1)) if hit else 0
    out["found"] = bool(re.search(_PTXAS_NUMBERS["regs"], log))
    return out


def _nvidia_tool(name: str) -> str:
    from triton import knobs

    try:  # triton >= 3.4: knobs.nvidia.<tool>.path (honours TRITON_<TOOL>_PATH)
        return getattr(knobs.nvidia, name.replace("-", "_")).path
    except AttributeError:
        import triton.backends.nvidia as nv

        return str(Path(nv.__file__).parent / "bin" / name)


def _ptxas(arch: int) -> str:
    """The ptxas Triton compiles ``arch`` with (3.9: CUDA 13's for sm_90 and up, 12.9's below)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        return _nvidia_tool("ptxas")


def _ptxas_version(arch: int) -> str:
    text = subprocess.run([_ptxas(arch), "--version"], capture_output=True, text=True).stdout
    hit = re.search(r"release ([\d.]+)", text)
    return hit.group(1) if hit else "?"


def _ptxas_rerun(ptx: str, arch: int, tmp: Path) -> str:
    """ptxas -v on the kernel's PTX, for a Triton that did not print its own log."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    src = tmp / "k.ptx"
    src.write_text(ptx)
    cmd = [_ptxas(arch), "-v", "-lineinfo", f"--gpu-name={target}", str(src), "-o", str(tmp / "k.cubin")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return proc.stderr


def _sass_counts(cubin: bytes, tmp: Path) -> dict:
    path = tmp / "k.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                          check=True).stdout
    return {"HGMMA": len(re.findall(r"\bHGMMA\b", sass)), "HMMA": len(re.findall(r"\bHMMA\b", sass)),
            "sass_lines": sass.count("\n")}


def _specialization(kernel, given: dict) -> tuple[dict, dict]:
    """Runtime arguments Triton turned into constants (an int equal to 1), and every pointer's element type."""
    try:  # ASTSource.signature {name: type}, .constants {(index,): value} in triton 3.2 to 3.9
        sig, consts = kernel.src.signature, kernel.src.constants
    except AttributeError:
        return {}, {}
    names = list(sig)
    extra = {}
    for key, val in consts.items():
        idx = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        name = names[idx] if isinstance(idx, int) and idx < len(names) else str(idx)
        if name not in given:
            extra[name] = val if isinstance(val, (int, float, str, bool)) else str(val)
    ptrs = {n: t[1:] for n, t in sig.items() if isinstance(t, str) and t.startswith("*")}
    return extra, ptrs


def _tensor_cores(dots: dict) -> str:
    if dots["tt.dot"] == 0:
        return "no dot"
    kinds = [k for k in ("wgmma", "mma.sync") if dots[k]]
    return "+".join(kinds) if kinds else "fma (no tensor cores)"


def worker(arch: int, dtype_name: str, model: str, image: int, batch: int, only=None) -> list[dict]:
    import contextlib
    import inspect
    import io
    import time

    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    params = inspect.signature(JITFunction.run).parameters
    if "grid" not in params or "warmup" not in params:
        raise SystemExit(f"aot_compile: triton {triton.__version__}'s JITFunction.run has no grid/warmup "
                         f"arguments ({inspect.signature(JITFunction.run)}); this script knows triton 3.6 to 3.9")
    driver.set_active(_StubDriver(GPUTarget("cuda", arch, 32)))
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its ptxas -v log; captured per compile below

    launches, current = [], {}
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        log, start = io.StringIO(), time.perf_counter()
        with contextlib.redirect_stdout(log):
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
            if hasattr(kernel, "result"):  # an asynchronous compile's future
                kernel = kernel.result()
        const = {p.name: kwargs[p.name] for p in self.params if p.is_constexpr and p.name in kwargs}
        launches.append(dict(current, kernel=self.fn.__name__, compiled=kernel, ptxas_log=log.getvalue(),
                             seconds=time.perf_counter() - start,
                             constexprs={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                         for k, v in const.items()}))
        return kernel

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    JITFunction.run = compile_only
    try:
        cases = [c for c in _cases(model, image, batch, dtype) if not only or c[0] in only]
        from segformer_fast.ops.triton_launch import autotuners

        # every configuration an autotuner can pick (its kernel's modules are imported by _cases): the default
        # launch, then each other configuration forced (kernels that do not tune compile once, the rest hit
        # Triton's cache)
        variants = [contextlib.nullcontext] + [partial(tuner.forcing, cfg) for tuner in autotuners().values()
                                               for cfg in tuner.configs[1:]]
        for variant in variants:
            with variant():
                for op, call, label, thunk in cases:
                    current.update(op=op, call=call, case=label)
                    thunk()
    finally:
        JITFunction.run = run

    rows, by_hash, ptxas_version = [], {}, _ptxas_version(arch)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for launch in launches:
            kernel = launch.pop("compiled")
            if kernel is None or "cubin" not in kernel.asm:
                raise RuntimeError(f"{launch['kernel']} ({launch['op']} {launch['call']}, {launch['case']}): no cubin")
            key = getattr(kernel, "hash", None) or id(kernel)
            row = by_hash.get(key)
            if row is None:
                ptxas = _parse_ptxas(launch["ptxas_log"])
                source = "triton"
                if not ptxas["found"]:  # the same kernel object reached through another path, or no log printed
                    ptxas, source = _parse_ptxas(_ptxas_rerun(kernel.asm["ptx"], arch, tmp)), "rerun"
                ptx, ttir = kernel.asm["ptx"], kernel.asm.get("ttir", "")
                dots = {"tt.dot": len(re.findall(r"\btt\.dot\b", ttir)),
                        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
                        "mma.sync": len(re.findall(r"\bmma\.sync", ptx)), **_sass_counts(kernel.asm["cubin"], tmp)}
                md = kernel.metadata
                specialized, pointers = _specialization(kernel, launch["constexprs"])
                row = by_hash[key] = {
                    "arch": f"sm_{arch}", "dtype": dtype_name, "op": launch["op"], "kernel": launch["kernel"],
                    "calls": [], "cases": [], "constexprs": launch["constexprs"],
                    "specialized": specialized, "pointers": pointers,
                    "num_warps": md.num_warps, "num_stages": md.num_stages, "shared": md.shared,
                    "regs": ptxas["regs"], "spill_stores": ptxas["spill_stores"], "spill_loads": ptxas["spill_loads"],
                    "stack": ptxas["stack"], "static_smem": ptxas["static_smem"], "ptxas_log": source,
                    "ptxas": ptxas_version,
                    "ptx_target": re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1),
                    "cubin_bytes": len(kernel.asm["cubin"]), "compile_s": round(launch["seconds"], 2),
                    "dots": dots, "tensor_cores": _tensor_cores(dots),
                }
                rows.append(row)
            if launch["call"] not in row["calls"]:
                row["calls"].append(launch["call"])
            if launch["case"] not in row["cases"]:
                row["cases"].append(launch["case"])
    return rows


# ---------------------------------------------------------------------------------------------
# the driver: run the workers, merge, write JSON and Markdown


def _run_worker(arch: int, dtype: str, args, tmp: Path) -> tuple[int, str, Path]:
    out = tmp / f"sm{arch}_{dtype}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp / f"cache_sm{arch}_{dtype}"), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    cmd = [sys.executable, __file__, "--worker", "--arch", str(arch), "--dtype", dtype, "--model", args.model,
           "--image", str(args.image), "--batch", str(args.batch), "--out", str(out)] + (
               ["--only", *args.only] if args.only else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, out


def _span(cases: list[str]) -> str:
    return "; ".join(cases) if len(cases) <= 2 else f"{cases[0]}; ... ({len(cases)} cases)"


def markdown(data: dict) -> str:
    rows = data["kernels"]
    combos = [(a, d) for a in data["archs"] for d in data["dtypes"]]
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    lines = [
        f"# Triton kernels compiled ahead of time ({data['model']} at {data['image']}x{data['image']}, "
        f"batch {data['batch']})",
        "",
        f"Generated by `python benchmarks/aot_compile.py` with triton {data['triton']} (ptxas "
        f"{', '.join(f'{v} for {a}' for a, v in data['ptxas'].items())}), "
        "no GPU: a stub driver's target, meta tensors, the package's own launchers. Registers and spills are "
        "ptxas's; dots: PTX `wgmma.mma_async` / `mma.sync`, SASS HGMMA / HMMA.",
        "",
        "## Worst case per kernel: registers / spill stores (bytes)",
        "",
        "| kernel | " + " | ".join(f"{a} {d}" for a, d in combos) + " |",
        "|---|" + "---:|" * len(combos),
    ]
    for k in kernels:
        cells = []
        for a, d in combos:
            sel = [r for r in rows if r["kernel"] == k and r["arch"] == a and r["dtype"] == d]
            if not sel:
                cells.append("")
                continue
            w = max(sel, key=lambda r: (r["spill_stores"], r["regs"]))
            cells.append(f"{max(r['regs'] for r in sel)} / {w['spill_stores']}")
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Every compiled variant",
        "",
        "| kernel | arch | dtype | constexprs (runtime ints specialized) | other pointer types | warps | stages | "
        "regs | spill st/ld B | stack B | smem B | dots | PTX wgmma / mma.sync | SASS HGMMA / HMMA | calls | cases |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (kernels.index(r["kernel"]), r["arch"], DTYPES.index(r["dtype"]))):
        const = ", ".join([f"{k}={v}" for k, v in r["constexprs"].items()]
                          + [f"({k}={v})" for k, v in r.get("specialized", {}).items()])
        ptrs = ", ".join(f"{k}: {v}" for k, v in r.get("pointers", {}).items() if v != r["dtype"])
        dots = r["dots"]
        lines.append(
            f"| `{r['kernel']}` | {r['arch']} | {r['dtype']} | {const} | {ptrs} | {r['num_warps']} | "
            f"{r['num_stages']} | "
            f"{r['regs']} | {r['spill_stores']} / {r['spill_loads']} | {r['stack']} | {r['shared']} | "
            f"{r['tensor_cores']} | {dots['wgmma']} / {dots['mma.sync']} | {dots['HGMMA']} / {dots['HMMA']} | "
            f"{', '.join(r['calls'])} | {_span(r['cases'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (90, 80)")
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--model", default="b2", help="SegFormer variant from the registry")
    p.add_argument("--image", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON to write")
    p.add_argument("--markdown", type=Path, help="also write the Markdown tables here")
    p.add_argument("--render", type=Path, help="only turn this JSON into Markdown (--markdown, or stdout)")
    p.add_argument("--jobs", type=int, default=min(6, os.cpu_count() or 1), help="compile processes at once")
    p.add_argument("--only", nargs="+", metavar="OP",
                   help="compile only these ops' launches (a quick check; the committed report has every op)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise SystemExit("aot_compile: the worker must run without TRITON_INTERPRET")
        rows = worker(args.arch[0], args.dtype[0], args.model, args.image, args.batch, args.only)
        args.out.write_text(json.dumps(rows))
        return 0
    if args.render:
        text = markdown(json.loads(args.render.read_text()))
        if args.markdown:
            args.markdown.write_text(text)
        else:
            print(text, end="")
        return 0

    import triton

    combos = [(a, d) for a in args.arch for d in args.dtype]
    failed, rows = [], []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda ad: _run_worker(*ad, args, Path(tmp)), combos))
        for (arch, dtype), (rc, log, out) in zip(combos, results):
            if rc != 0:
                failed.append(f"sm_{arch} {dtype}")
                print(f"--- sm_{arch} {dtype}: exit {rc}\n{log[-6000:]}", file=sys.stderr)
                continue
            got = json.loads(out.read_text())
            if not got:
                failed.append(f"sm_{arch} {dtype} (no kernel compiled)")
            rows += got
    if failed:
        print(f"aot_compile: failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    data = {
        "triton": triton.__version__, "ptxas": {r["arch"]: r["ptxas"] for r in rows}, "model": args.model,
        "image": args.image, "batch": args.batch, "archs": [f"sm_{a}" for a in args.arch], "dtypes": args.dtype,
        "kernels": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(data))
    worst = max(rows, key=lambda r: (r["spill_stores"], r["regs"]))
    print(f"aot_compile: {len(rows)} kernels compiled for {', '.join(data['archs'])} x {', '.join(args.dtype)}; "
          f"most spilled: {worst['kernel']} {worst['arch']} {worst['dtype']} {worst['regs']} regs, "
          f"{worst['spill_stores']} B spilled -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
