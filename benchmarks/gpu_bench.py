"""SegFormer on a GPU: our model, patched Hugging Face, Hugging Face eager and Hugging Face SDPA.

    python -m benchmarks.gpu_bench --out DIR [--budget SECONDS] [--only SUBSTRING] [--dry-run] [--roofline]

Cases: MiT-B2 at 1024x1024 batch 8, B2 and B0 at 512x512 batch 1; inference (eval, no grad) and a
training step (train mode, forward with labels and loss, backward; no optimizer); fp32 and bf16
(``torch.autocast``). Providers, all with the same random weights
(``segformer_fast.tools.benchmark.build_providers``):

- ``ours``: ``SegFormer`` with backend "auto" (what ``segformer_fast.segformer(...)`` builds);
- ``patched_hf``: transformers' SegformerForSemanticSegmentation after ``segformer_fast.patch``;
- ``hf_eager`` / ``hf_sdpa``: the same transformers model with ``attn_implementation`` "eager" / "sdpa".

Each case times the providers interleaved (every round runs each once, the starting provider
rotating) after warm-up, with CUDA events, and reports the median, images/s, the peak memory of the
step (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, less what was allocated
before the step, i.e. without the resident weights) and the speed-up over Hugging Face eager. In the
first round of an inference case every provider's logits are compared with Hugging Face eager's
(max abs difference); a training case records its first loss. An error (out of memory, a
kernel failure) is recorded for that provider and case, and the run goes on. ``gpu_bench.json`` and
``gpu_bench.md`` in ``--out`` are rewritten after every case. Cases are skipped (and listed) once
``--budget`` seconds are spent.

``--roofline`` then times each fused op at its roofline shapes (``benchmarks/roofline.py``
``measure()``) in the budget left, into ``roofline_b2_1024_bf16_measured.{json,md}``; ``--backends`` then each
op's implementations against each other at those shapes (``benchmarks/backend_table.py``), into
``backend_table_b2_1024.{json,md}``, the measurements auto's per-GPU order is taken from. A GPU only;
gpu_check.sh passes both.

``--dry-run`` runs the same code on the CPU with B0 at 64x64, one timed round and no warm-up, so
the script is exercised where there is no GPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from segformer_fast.tools.benchmark import Provider, build_providers, hf_provider  # noqa: E402
from segformer_fast.io.hf import to_hf  # noqa: E402
from segformer_fast.utils.atomic import atomic_write_text  # noqa: E402

PROVIDERS = ("hf_eager", "hf_sdpa", "patched_hf", "ours")
LABELS = {"hf_eager": "HF eager", "hf_sdpa": "HF SDPA", "patched_hf": "patched HF", "ours": "ours"}
MODES = ("inference", "train")
PRECISIONS = ("fp32", "bf16")
BASELINE = "hf_eager"
NUM_CLASSES = 150


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    size: int
    batch: int
    mode: str
    precision: str

    @property
    def id(self) -> str:
        return f"{self.model}-{self.size}-b{self.batch}-{self.mode}-{self.precision}"


def gpu_cases() -> list[Case]:
    """The heaviest (and most telling) case first; grouped by model so each model is built once."""
    out = []
    for model, size, batch in (("b2", 1024, 8), ("b2", 512, 1), ("b0", 512, 1)):
        for mode in ("train", "inference"):
            for precision in ("bf16", "fp32"):
                out.append(Case(model, size, batch, mode, precision))
    return out


def dry_run_cases() -> list[Case]:
    return [Case("b0", 64, 1, mode, precision) for mode in MODES for precision in PRECISIONS]


def make_providers(variant: str, device: str) -> tuple[dict[str, Provider], dict]:
    """The providers with one set of random weights, what each really runs, and why any is missing.

    Ours must build (else this raises); a Hugging Face provider that fails to build is left out and
    its error recorded in ``info["errors"]``.
    """
    errors = {}
    try:
        base = build_providers(variant, num_classes=NUM_CLASSES, backend="auto", device=device,
                               names=("fast", "reference", "patched"))
    except Exception as exc:  # noqa: BLE001 - transformers or patch failed: ours alone
        errors["patched_hf"] = _error_text(exc)
        base = build_providers(variant, num_classes=NUM_CLASSES, backend="auto", device=device, hf=False,
                               names=("fast", "reference"))
    reference = base["reference"].module
    providers = {}
    for name, impl in (("hf_eager", "eager"), ("hf_sdpa", "sdpa")):
        try:
            providers[name] = hf_provider(name, to_hf(reference, impl))
        except Exception as exc:  # noqa: BLE001 - recorded
            errors[name] = _error_text(exc)
    if "patched" in base:
        providers["patched_hf"] = dataclasses.replace(base["patched"], name="patched_hf")
    providers["ours"] = dataclasses.replace(base["fast"], name="ours")
    ours = providers["ours"].module
    info = {
        "ours_backend": ours.backend,
        "ours_op_backends": ours.op_backends(),
        "attn_implementation": {name: getattr(p.module.config, "_attn_implementation", None)
                                for name, p in providers.items() if name != "ours"},
        "parameters": sum(p.numel() for p in ours.parameters()),
        "errors": errors,
    }
    return providers, info


class CaseInterrupted(KeyboardInterrupt):
    """Raised by run_case on SIGINT, carrying the rows of the rounds timed so far."""

    def __init__(self, rows: list[dict]):
        super().__init__("interrupted")
        self.rows = rows


def _error_text(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - a sticky CUDA error is reported where it happened
            pass


class Clock:
    """Times one call: CUDA events on a GPU (with the step's peak memory), perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def measure(self, fn):
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t0, None, None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return out, start.elapsed_time(end) / 1e3, peak - before, peak


def _step(p: Provider, x: torch.Tensor, labels: torch.Tensor | None, precision: str):
    """One inference call (returns the logits) or training step (returns the loss, grads freed after)."""
    device_type = x.device.type

    def autocast():
        if precision == "bf16":
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if labels is None:
        def step():
            with torch.no_grad(), autocast():
                return p.infer(x)
    else:
        def step():
            p.module.zero_grad(set_to_none=True)
            with autocast():
                loss = p.loss(x, labels)
            loss.backward()
            p.module.zero_grad(set_to_none=True)
            return loss.detach()
    return step


def _row(case: Case, provider: str, status: str = "ok", error: str | None = None) -> dict:
    return dict(case=case.id, model=case.model, size=case.size, batch=case.batch, mode=case.mode,
                precision=case.precision, provider=provider, label=LABELS[provider], status=status, error=error,
                times_ms=[], peak_mib=None, peak_total_mib=None)


def run_case(case: Case, providers: dict[str, Provider], device: torch.device, *, case_budget_s: float,
             deadline: float, warmup: int, min_repeat: int, max_repeat: int) -> list[dict]:
    """Time every provider on one case, interleaved; one result row per provider."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, 3, case.size, case.size, generator=gen).to(device)
    labels = None
    if case.mode == "train":
        labels = torch.randint(0, NUM_CLASSES, (case.batch, case.size, case.size), generator=gen).to(device)
    clock = Clock(device)
    rows = {name: _row(case, name) for name in providers}
    steps = {}
    for name, p in providers.items():
        p.module.train(case.mode == "train")
        steps[name] = _step(p, x, labels, case.precision)
    active = list(providers)

    def call(name: str, timed: bool, check: dict | None = None) -> float:
        row = rows[name]
        try:
            out, seconds, peak, peak_total = clock.measure(steps[name])
            if check is not None:  # first round: correctness evidence
                if case.mode == "train":
                    row["loss"] = float(out)
                else:
                    logits = out.float()
                    if name == BASELINE:
                        check["reference"] = logits
                    ref = check.get("reference")
                    if ref is not None and ref.shape == logits.shape:
                        row["max_abs_diff_vs_hf_eager"] = float((logits - ref).abs().max())
                        row["max_abs_hf_eager"] = float(ref.abs().max())
                    row["finite"] = bool(torch.isfinite(logits).all())
            del out
        except Exception as exc:  # out of memory, a kernel failure: record it, keep going
            row["status"], row["error"] = "error", _error_text(exc)
        if row["status"] == "error":  # freed here, once the exception's frames are gone
            active.remove(name)
            providers[name].module.zero_grad(set_to_none=True)
            _free(device)
            return 0.0
        if timed:
            row["times_ms"].append(seconds * 1e3)
            if peak is not None:
                row["peak_mib"] = max(row["peak_mib"] or 0.0, peak / 2**20)
                row["peak_total_mib"] = max(row["peak_total_mib"] or 0.0, peak_total / 2**20)
        return seconds

    # warm-up: the first round also compiles kernels, the last one sets the number of timed rounds;
    # the first round run (warm-up or timed) records the correctness evidence
    check: dict | None = {}
    interrupted = False
    try:
        round_s = 0.0
        for r in range(warmup):
            if r and time.perf_counter() > deadline - 10:
                break
            t0 = time.perf_counter()
            for name in list(active):
                call(name, timed=False, check=check)
            check = None
            round_s = time.perf_counter() - t0

        repeat = max(min_repeat, min(max_repeat, int(case_budget_s / max(round_s, 1e-3))))
        t_start = time.perf_counter()
        done = 0
        for r in range(repeat):
            if not active:
                break
            order = active[r % len(active):] + active[:r % len(active)]
            for name in order:
                call(name, timed=True, check=check)
            check = None
            done += 1
            now = time.perf_counter()
            if done >= min_repeat and (now - t_start > 1.5 * case_budget_s or now > deadline):
                break
    except KeyboardInterrupt:  # the time limit: keep the rounds already timed
        interrupted = True

    base = rows.get(BASELINE)
    base_med = statistics.median(base["times_ms"]) if base and base["times_ms"] else None
    out = []
    for name in providers:
        row = rows[name]
        if row["times_ms"]:
            med = statistics.median(row["times_ms"])
            row.update(median_ms=med, min_ms=min(row["times_ms"]), rounds=len(row["times_ms"]),
                       images_per_s=case.batch / (med / 1e3),
                       speedup_vs_hf_eager=(base_med / med) if base_med else None)
        elif row["status"] == "ok":
            row["status"] = "interrupted" if interrupted else "error"
            row["error"] = "time limit before a timed round" if interrupted else "no timed round completed"
        if interrupted:
            row["interrupted"] = True
        out.append(row)
    steps.clear()
    del x, labels
    for p in providers.values():
        p.module.zero_grad(set_to_none=True)
    _free(device)
    if interrupted:
        raise CaseInterrupted(out)
    return out


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for mod in ("triton", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, never fatal
            out[mod] = f"unavailable ({_error_text(exc)})"
    import segformer_fast

    out["segformer_fast"] = segformer_fast.__version__
    return out


def _fmt(v, spec: str, empty: str = "") -> str:
    return empty if v is None else format(v, spec)


def to_markdown(record: dict) -> str:
    meta = record["meta"]
    lines = [f"# SegFormer benchmark on {meta['device_name']}", ""]
    v = meta["versions"]
    lines.append(f"torch {v['torch']} (CUDA {v['torch_cuda']}), triton {v.get('triton')}, transformers "
                 f"{v.get('transformers')}, python {v['python']}; fp32 matmul precision "
                 f"{meta['float32_matmul_precision']!r}; status: {meta['status']}, {meta['elapsed_s']:.0f} s"
                 + (" (dry run, CPU)" if meta["dry_run"] else ""))
    lines.append("")
    lines.append("Median of the timed rounds after warm-up, providers interleaved per round. Inference: eval, "
                 "no grad. Train: train mode, forward with labels, loss, backward (no optimizer). bf16: "
                 "torch.autocast. Peak: the step's torch.cuda.max_memory_allocated less what was allocated "
                 "before it (weights excluded). x: speed-up over HF eager. Max |diff|: logits against HF "
                 "eager's (same weights), inference only.")
    for model, info in meta.get("models", {}).items():
        lines.append(f"- {model.upper()}: ours backend {info.get('ours_backend')!r} "
                     f"({', '.join(f'{k}={v}' for k, v in (info.get('ours_op_backends') or {}).items())}); "
                     f"attn_implementation {info.get('attn_implementation')}")
    lines += ["", "| case | " + " | ".join(LABELS[p] for p in PROVIDERS) + " |",
              "|---|" + "---:|" * len(PROVIDERS)]
    by_case: dict[str, dict[str, dict]] = {}
    for row in record["results"]:
        by_case.setdefault(row["case"], {})[row["provider"]] = row
    for case_id, provs in by_case.items():
        cells = []
        for name in PROVIDERS:
            row = provs.get(name)
            if row is None:
                cells.append("")
            elif row.get("median_ms") is None:
                cells.append(row["status"])
            else:
                cells.append(f"{row['median_ms']:.1f} ms ({_fmt(row.get('speedup_vs_hf_eager'), '.2f', '?')}x)")
        lines.append(f"| {case_id} | " + " | ".join(cells) + " |")
    if any(row.get("peak_mib") is not None for row in record["results"]):
        lines += ["", "Peak memory of the step, MiB (weights excluded):", "",
                  "| case | " + " | ".join(LABELS[p] for p in PROVIDERS) + " |", "|---|" + "---:|" * len(PROVIDERS)]
        for case_id, provs in by_case.items():
            cells = [_fmt((provs.get(name) or {}).get("peak_mib"), ".0f") for name in PROVIDERS]
            lines.append(f"| {case_id} | " + " | ".join(cells) + " |")
    lines += ["", "| case | provider | median ms | images/s | peak MiB | peak total MiB | vs HF eager | rounds | "
              "max abs diff | loss | error |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in record["results"]:
        diff = row.get("max_abs_diff_vs_hf_eager")
        lines.append(
            f"| {row['case']} | {row['label']} | {_fmt(row.get('median_ms'), '.2f')} | "
            f"{_fmt(row.get('images_per_s'), '.2f')} | {_fmt(row.get('peak_mib'), '.0f')} | "
            f"{_fmt(row.get('peak_total_mib'), '.0f')} | {_fmt(row.get('speedup_vs_hf_eager'), '.2f')} | "
            f"{row.get('rounds', 0)} | {_fmt(diff, '.2e')} | {_fmt(row.get('loss'), '.4f')} | "
            f"{(row.get('error') or '').replace('|', '/')} |")
    if record["skipped"]:
        lines += ["", "Skipped: " + ", ".join(f"{s['case']} ({s['reason']})" for s in record["skipped"])]
    return "\n".join(lines) + "\n"


def write(record: dict, out_dir: str, t_start: float) -> None:
    record["meta"]["elapsed_s"] = time.perf_counter() - t_start
    atomic_write_text(os.path.join(out_dir, "gpu_bench.json"), json.dumps(record, indent=1))
    atomic_write_text(os.path.join(out_dir, "gpu_bench.md"), to_markdown(record))


def _measure_ops(flag: str, device: torch.device, out_dir: str, deadline: float) -> None:
    """--roofline (each fused op against its bound) or --backends (each op's implementations against each other),
    at the roofline shapes, into their own files: never the cases' status."""
    if device.type != "cuda":
        print(f"gpu_bench: {flag} needs a CUDA device; skipped", flush=True)
        return
    from benchmarks import backend_table, roofline

    try:
        if flag == "--roofline":
            roofline.write_measured(roofline.measure(device, deadline=deadline - 5.0), out_dir)
        else:
            backend_table.write(backend_table.measure(device, deadline=deadline - 5.0), out_dir)
    except KeyboardInterrupt:
        print(f"gpu_bench: {flag} interrupted (time limit)", flush=True)
    except Exception as exc:  # noqa: BLE001 - the cases' results stand
        print(f"gpu_bench: {flag} failed: {_error_text(exc)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu"))
    parser.add_argument("--budget", type=float, default=180.0, help="seconds for the whole run (cases beyond are skipped)")
    parser.add_argument("--case-seconds", type=float, default=10.0, help="target timed seconds per case")
    parser.add_argument("--only", default=None, help="run only the cases whose id contains this")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--dry-run", action="store_true", help="CPU, B0 at 64x64, one round: exercises the script")
    parser.add_argument("--roofline", action="store_true",
                        help="then, on a GPU, time each fused op against its roofline (benchmarks/roofline.py "
                             "measure(): B2 1024x1024 batch 8) within the budget left -> roofline_*_measured.{json,md}")
    parser.add_argument("--backends", action="store_true",
                        help="then, on a GPU, time each op's implementations against each other (benchmarks/"
                             "backend_table.py) within the budget left -> backend_table_b2_1024.{json,md}")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    deadline = t_start + args.budget
    device = torch.device(args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"))
    cases = dry_run_cases() if args.dry_run else gpu_cases()
    if args.only:
        cases = [c for c in cases if args.only in c.id]
    if args.dry_run:
        warmup, min_repeat, max_repeat = 0, 1, 1
    else:
        warmup, min_repeat, max_repeat = 2, 3, 30
    os.makedirs(args.out, exist_ok=True)

    meta = dict(dry_run=args.dry_run, device=str(device), versions=_versions(), budget_s=args.budget,
                status="running", started=time.strftime("%Y-%m-%d %H:%M:%S %z"), elapsed_s=0.0,
                float32_matmul_precision=torch.get_float32_matmul_precision(),
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, models={},
                cases=[c.id for c in cases], warmup=warmup, min_repeat=min_repeat, max_repeat=max_repeat)
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
        meta["capability"] = list(torch.cuda.get_device_capability(device))
        meta["total_memory_mib"] = torch.cuda.get_device_properties(device).total_memory / 2**20
    else:
        meta["device_name"] = f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    record = {"meta": meta, "results": [], "skipped": []}
    write(record, args.out, t_start)
    print(f"gpu_bench: {len(cases)} cases on {meta['device_name']}, budget {args.budget:.0f} s", flush=True)

    providers, built_for = None, None
    try:
        for i, case in enumerate(cases):
            remaining = deadline - time.perf_counter()
            if remaining < 3.0:
                record["skipped"].append(dict(case=case.id, reason="time budget"))
                write(record, args.out, t_start)
                continue
            if built_for != case.model:
                providers = None
                _free(device)
                try:
                    providers, info = make_providers(case.model, str(device))
                    built_for = case.model
                    meta["models"][case.model] = info
                except Exception as exc:  # noqa: BLE001 - recorded per case
                    built_for = case.model
                    meta["models"][case.model] = {"error": _error_text(exc)}
            if providers is None:
                record["skipped"].append(dict(case=case.id, reason="providers not built: "
                                              + meta["models"][case.model].get("error", "?")))
                write(record, args.out, t_start)
                continue
            case_budget = max(1.0, min(args.case_seconds, (remaining - 2.0) / (len(cases) - i) * 0.6))
            t0 = time.perf_counter()
            try:
                rows = run_case(case, providers, device, case_budget_s=case_budget, deadline=deadline,
                                warmup=warmup, min_repeat=min_repeat, max_repeat=max_repeat)
            except Exception as exc:  # noqa: BLE001 - e.g. the input did not fit: every provider failed
                rows = [_row(case, name, "error", _error_text(exc)) for name in providers]
            if any(r["status"] == "error" for r in rows):
                _free(device)
            built_errors = meta["models"][case.model].get("errors", {})
            rows += [_row(case, name, "error", "not built: " + built_errors.get(name, "?"))
                     for name in PROVIDERS if name not in providers]
            rows.sort(key=lambda r: PROVIDERS.index(r["provider"]))
            record["results"].extend(rows)
            write(record, args.out, t_start)
            summary = "  ".join(f"{r['provider']}={_fmt(r.get('median_ms'), '.1f', r['status'])}" for r in rows)
            print(f"[{time.perf_counter() - t_start:6.1f}s] {case.id} ({time.perf_counter() - t0:.1f}s): {summary}",
                  flush=True)
        meta["status"] = "complete" if not record["skipped"] else "complete, cases skipped"
    except KeyboardInterrupt as exc:  # the phase's time limit (SIGINT): keep what was measured
        record["results"].extend(sorted(getattr(exc, "rows", []), key=lambda r: PROVIDERS.index(r["provider"])))
        seen = {r["case"] for r in record["results"]} | {s["case"] for s in record["skipped"]}
        record["skipped"] += [dict(case=c.id, reason="time limit (interrupted)") for c in cases if c.id not in seen]
        meta["status"] = "interrupted"
        write(record, args.out, t_start)
        print("gpu_bench: interrupted; results so far written", flush=True)
        return 130
    write(record, args.out, t_start)
    if args.roofline:  # with --backends too: 60% of the budget left, the rest for the backend table
        left = max(0.0, deadline - time.perf_counter())
        _measure_ops("--roofline", device, args.out, time.perf_counter() + (0.6 * left if args.backends else left))
    if args.backends:
        _measure_ops("--backends", device, args.out, deadline)
    errors = sum(r["status"] != "ok" for r in record["results"])
    print(f"gpu_bench: {len(record['results'])} results, {errors} errors, {len(record['skipped'])} cases skipped; "
          f"wrote {os.path.join(args.out, 'gpu_bench.json')} and gpu_bench.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
