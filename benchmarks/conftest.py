"""Shared helpers for `pytest benchmarks/` (pytest-benchmark).

Providers are named alike everywhere: ``fast`` (our fused path), ``reference`` (our pure-PyTorch
oracle), ``hf`` (Hugging Face transformers), ``hf_compile`` (the same under torch.compile; only with
--bench-compile, since compiling on a CPU takes minutes); model benchmarks add ``patched``
(Hugging Face after segformer_fast.patch), ``fast_compile`` and ``patched_compile``. Shapes come from the model registry.
1024-pixel cases carry the ``large`` mark (deselect with ``-m "not large"``). End-to-end SegFormer
cases run in fp32 and under bf16 autocast (``amp``), every provider under the same autocast.

Each benchmark records ``extra_info`` (provider, case, saved bytes); at the end of the session the
medians of every case are grouped, ratios against ``hf`` and ``reference`` taken within this one
run, and the table written to benchmarks/results/<device>.json (plus a printed summary). Run
``python benchmarks/report.py`` to turn that JSON into a Markdown table.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections import defaultdict

import pytest
import torch

from segformer_fast.configs import SEGFORMER_VARIANTS
from segformer_fast.utils.amp import autocast
from segformer_fast.utils.atomic import atomic_write_text
from segformer_fast.utils.memory import SavedTensorRecorder

PROVIDERS = ("fast", "reference", "hf", "hf_compile")
# end-to-end model benchmarks add the patched Hugging Face model and compiled variants
MODEL_PROVIDERS = PROVIDERS + ("patched", "fast_compile", "patched_compile")
RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")

_RECORDS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--bench-compile", action="store_true", help="also run the hf_compile provider")
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.addoption("--bench-out", default=None, help="results JSON path (default benchmarks/results/<device>.json)")


def pytest_configure(config):
    config.addinivalue_line("markers", "large: 1024-pixel cases (slow on a CPU)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def stage_shapes(variant: str, size: int, batch: int = 1) -> list[dict]:
    """Per MiT stage of ``variant`` at a ``size`` x ``size`` input: B, H, W, N, C, heads, sr, M."""
    cfg = SEGFORMER_VARIANTS[variant]
    out, h = [], size
    for i in range(cfg.num_stages):
        h = math.ceil(h / cfg.strides[i])
        sr = cfg.sr_ratios[i]
        out.append(dict(stage=i + 1, B=batch, H=h, W=h, N=h * h, C=cfg.hidden_sizes[i], heads=cfg.num_heads[i],
                        sr=sr, M=(h // sr) ** 2, hidden=cfg.hidden_sizes[i] * cfg.mlp_ratios[i]))
    return out


def size_param(size: int):
    """A pytest param for an image size, marked ``large`` from 1024 up."""
    return pytest.param(size, marks=pytest.mark.large, id=str(size)) if size >= 1024 else pytest.param(size, id=str(size))


def skip_unavailable(provider: str, request) -> None:
    if provider.startswith(("hf", "patched")):
        pytest.importorskip("transformers", reason="the hf and patched providers need transformers")
    if provider.endswith("_compile") and not request.config.getoption("--bench-compile"):
        pytest.skip(f"{provider} runs only with --bench-compile (compiling takes minutes on a CPU)")


def saved_bytes(fn, exclude=()) -> int:
    """Bytes autograd keeps for backward while ``fn()`` runs, tensors in ``exclude`` not counted."""
    with SavedTensorRecorder(exclude) as rec:
        out = fn()
    del out
    return rec.bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(benchmark, fn, device: torch.device, *, provider: str, case: str, saved: int | None = None,
        rounds: int = 3, warmup: int = 1):
    """Benchmark ``fn`` and record it for the session's ratio table."""

    def step():
        fn()
        sync(device)

    benchmark.extra_info.update(provider=provider, case=case, saved_bytes=saved)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        _RECORDS.append(dict(case=case, provider=provider, median_s=stats.stats.median, saved_bytes=saved,
                             device=device_name(device)))


def run_interleaved(benchmark, fns: dict, device: torch.device, *, case: str, rounds: int = 15,
                    min_seconds: float = 0.02) -> dict[str, float]:
    """Time several providers alternately (round r runs each once, in turn) and record the medians.

    For short calls whose ratio matters more than their absolute time: load that drifts during the
    run hits every provider alike. Each round times a batch of calls lasting about ``min_seconds``.
    Under ``--benchmark-disable`` one round of one call each (a smoke test). Returns median seconds.
    """
    import statistics
    import time

    smoke = getattr(benchmark, "disabled", False)
    times: dict[str, list[float]] = {k: [] for k in fns}

    def loop():
        for f in fns.values():  # warm-up, and the batch size from one timed call
            f()
        sync(device)
        t0 = time.perf_counter()
        next(iter(fns.values()))()
        sync(device)
        n = 1 if smoke else max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
        for _ in range(1 if smoke else rounds):
            for name, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(n):
                    f()
                sync(device)
                times[name].append((time.perf_counter() - t0) / n)

    benchmark.extra_info.update(case=case, providers=list(fns), interleaved=True)
    benchmark.pedantic(loop, rounds=1, iterations=1)
    medians = {k: statistics.median(v) for k, v in times.items()}
    benchmark.extra_info.update({f"median_s_{k}": v for k, v in medians.items()})
    if not smoke:
        for name, med in medians.items():
            _RECORDS.append(dict(case=case, provider=name, median_s=med, saved_bytes=None, device=device_name(device)))
    return medians


_PROVIDER_CACHE: dict = {}


def model_providers(model: str, device: torch.device, compile: bool = False) -> dict:
    """``segformer_fast.tools.benchmark.build_providers`` for one model, kept while consecutive cases use it."""
    from segformer_fast.tools.benchmark import build_providers

    key = (model, str(device), compile)
    if key not in _PROVIDER_CACHE:
        _PROVIDER_CACHE.clear()
        _PROVIDER_CACHE[key] = build_providers(model, num_classes=150, compile=compile, device=str(device))
    return _PROVIDER_CACHE[key]


def run_model_case(benchmark, device: torch.device, p, *, provider: str, case: str, size: int, mode: str,
                   rounds: int = 3, num_classes: int = 150, amp: str | None = None) -> None:
    """Benchmark one end-to-end provider: inference (no grad) or a training step (forward, loss,
    backward), recording the saved-activation bytes of forward + loss for the training step.
    With ``amp`` ("bf16", "fp16") forward and loss run under that autocast; a training step under
    fp16 scales its loss with a GradScaler (``segformer_fast.tools.benchmark.provider_step``)."""
    from segformer_fast.tools.benchmark import provider_step

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=gen).to(device)
    benchmark.extra_info.update(amp=amp)
    if mode == "inference":
        p.module.eval()

        def fn():
            provider_step(p, x, None, amp)

        run(benchmark, fn, device, provider=provider, case=case, rounds=rounds)
        return
    p.module.train()
    labels = torch.randint(0, num_classes, (1, size, size), generator=gen).to(device)
    params = list(p.module.parameters()) + list(p.module.buffers())
    with autocast(device.type, amp):
        saved = saved_bytes(lambda: p.loss(x, labels), params)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def fn():
        provider_step(p, x, labels, amp, scaler)

    run(benchmark, fn, device, provider=provider, case=case, saved=saved, rounds=rounds)


def pytest_sessionfinish(session, exitstatus):
    if not _RECORDS:
        return
    by_case: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in _RECORDS:
        by_case[r["case"]][r["provider"]] = r
    table = []
    for case, provs in by_case.items():
        for provider, r in provs.items():
            row = dict(r)
            for base in ("hf", "reference"):
                if base in provs and base != provider:
                    row[f"speedup_vs_{base}"] = provs[base]["median_s"] / r["median_s"]
                    if r["saved_bytes"] and provs[base]["saved_bytes"]:
                        row[f"saved_vs_{base}"] = r["saved_bytes"] / provs[base]["saved_bytes"]
            table.append(row)
    dev = _RECORDS[0]["device"]
    path = session.config.getoption("--bench-out") or os.path.join(RESULTS_DIR, f"{dev}.json")
    record = dict(device=dev, torch=torch.__version__, threads=torch.get_num_threads(), rows=table)
    if os.path.exists(path):  # merge with earlier runs on this device: newer cases replace older
        try:
            old = json.load(open(path))
            keep = [r for r in old.get("rows", []) if (r["case"], r["provider"]) not in
                    {(t["case"], t["provider"]) for t in table}]
            record["rows"] = keep + table
        except (ValueError, KeyError):
            pass
    atomic_write_text(path, json.dumps(record, indent=1))
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"benchmark ratios (same run) written to {path}")
        for row in table:
            extra = "  ".join(f"{k}={v:.2f}" for k, v in row.items() if k.startswith(("speedup", "saved_vs")))
            tr.write_line(f"  {row['case']:<48} {row['provider']:<11} {row['median_s'] * 1e3:9.2f} ms  {extra}")
