"""Helpers of benchmarks/gpu_check.sh, one subcommand per step; each reads and writes files in OUTDIR.

    python benchmarks/gpu_check_report.py env OUTDIR        # versions -> env.json (and printed)
    python benchmarks/gpu_check_report.py backends OUTDIR [--require cuda,triton]
                                                             # `segformer-fast info` -> backends.json; exit 1 if a required backend is missing
    python benchmarks/gpu_check_report.py tests OUTDIR      # tests-<k>.xml -> tests.xml, test_counts.json (per backend)
    python benchmarks/gpu_check_report.py summary OUTDIR [--print-short]
                                                             # everything so far -> summary.md (and a
                                                             # shorter version, without the per-row table, printed)

``tests`` and ``summary`` import neither torch nor the package, so they work whatever broke.
A test's backend is read from its parametrisation: the first of torch, triton, cuda, cpp among the
``-``-separated parts of the id in brackets (``test_matches_reference[train-1-hw0-triton]``);
tests without one count as "other".
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

BACKENDS = ("torch", "triton", "cuda", "cpp")
OUTCOMES = ("passed", "failed", "error", "skipped")


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_text(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


# ---------------------------------------------------------------------------------------- env


def cmd_env(out_dir: str) -> int:
    import platform

    info = {"python": platform.python_version(), "executable": sys.executable}
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                        device_count=torch.cuda.device_count())
    except Exception as exc:  # noqa: BLE001 - recorded
        info["torch"] = f"import failed: {exc}"
    for mod in ("triton", "transformers", "timm", "numpy", "segformer_fast"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - recorded
            info[mod] = f"unavailable ({type(exc).__name__}: {str(exc)[:200]})"
    _write(os.path.join(out_dir, "env.json"), json.dumps(info, indent=1))
    for k, v in info.items():
        print(f"{k:<15}{v}")
    return 0


# ----------------------------------------------------------------------------------- backends


def cmd_backends(out_dir: str, require: list[str]) -> int:
    from segformer_fast.tools.cli import main as cli_main

    print("$ segformer-fast info", flush=True)
    cli_main(["info"])
    import segformer_fast
    from segformer_fast.backends import cuda_extension

    status = segformer_fast.available_backends()
    record = {name: {"available": st.available, "reason": st.reason} for name, st in status.items()}
    ext = cuda_extension()
    record["_C_cuda_file"] = getattr(ext, "__file__", None)
    missing = [name for name in require if not record.get(name, {}).get("available")]
    record["required"] = require
    record["missing_required"] = missing
    _write(os.path.join(out_dir, "backends.json"), json.dumps(record, indent=1))
    print("available_backends():")
    for name, st in status.items():
        print(f"  {name}: available={st.available} ({st.reason})")
    if missing:
        print(f"REQUIRED BACKEND MISSING: {', '.join(missing)}", flush=True)
        return 1
    return 0


# -------------------------------------------------------------------------------------- tests


def backend_of(test_name: str) -> str:
    m = re.search(r"\[(.*)\]$", test_name or "")
    if m:
        for part in m.group(1).split("-"):
            if part in BACKENDS:
                return part
    return "other"


def _xml_outcomes(path: str) -> list[tuple[str, str]] | None:
    """(test id, outcome) per testcase of a junit XML file; None when it is missing or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    out = []
    for tc in root.iter("testcase"):
        name = tc.get("name")
        if not name:  # the test running when pytest was interrupted
            out.append(("", "interrupted"))
            continue
        tags = {child.tag for child in tc}
        outcome = ("failed" if "failure" in tags else "error" if "error" in tags
                   else "skipped" if "skipped" in tags else "passed")
        out.append((f"{tc.get('classname', '')}::{name}", outcome))
    return out


def _jsonl_outcomes(path: str) -> tuple[list[tuple[str, str]], int | None]:
    """Outcomes from benchmarks.pytest_outcomes' lines (for a shard whose XML never got written)."""
    final: dict[str, str] = {}
    collected = None
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return [], None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "collected" in rec:
            collected = (collected or 0) + rec["collected"]
            continue
        node, when, outcome = rec["nodeid"], rec["when"], rec["outcome"]
        if outcome == "failed":
            final[node] = "failed" if when == "call" else "error"
        elif outcome == "skipped":
            final.setdefault(node, "skipped")
        elif node not in final:
            final[node] = "passed"
    return list(final.items()), collected


def _collected(path: str) -> int | None:
    n = None
    try:
        for line in open(path):
            if line.startswith('{"collected"'):
                n = (n or 0) + json.loads(line)["collected"]
    except (OSError, ValueError):
        return None
    return n


def cmd_tests(out_dir: str) -> int:
    shards = sorted(glob.glob(os.path.join(out_dir, "tests-*.xml")) + glob.glob(os.path.join(out_dir, "outcomes-*.jsonl")))
    keys = sorted({re.sub(r"^(tests|outcomes)-|\.(xml|jsonl)$", "", os.path.basename(p)) for p in shards})
    merged = ET.Element("testsuites", name="pytest tests")
    results: list[tuple[str, str]] = []
    collected_total, sources = 0, {}
    for key in keys:
        xml_path = os.path.join(out_dir, f"tests-{key}.xml")
        jsonl_path = os.path.join(out_dir, f"outcomes-{key}.jsonl")
        got = _xml_outcomes(xml_path)
        collected = _collected(jsonl_path)
        if got is not None:
            sources[key] = "junit xml"
            for suite in ET.parse(xml_path).getroot().iter("testsuite"):
                suite.set("name", f"pytest shard {key}")
                merged.append(suite)
        else:
            got, collected = _jsonl_outcomes(jsonl_path)
            sources[key] = "outcome lines (no junit xml: the run was killed)"
        results += got
        collected_total += collected or 0
    if len(merged):
        ET.ElementTree(merged).write(os.path.join(out_dir, "tests.xml"), encoding="utf-8", xml_declaration=True)

    per_backend = {b: dict.fromkeys(OUTCOMES, 0) for b in BACKENDS + ("other",)}
    totals = dict.fromkeys(OUTCOMES + ("interrupted",), 0)
    failed = []
    for test_id, outcome in results:
        totals[outcome] += 1
        if outcome in OUTCOMES:
            per_backend[backend_of(test_id)][outcome] += 1
        if outcome in ("failed", "error"):
            failed.append(f"{outcome}: {test_id}")
    record = {"collected": collected_total or None, "ran": sum(totals[o] for o in OUTCOMES), "totals": totals,
              "per_backend": per_backend, "failed": failed, "sources": sources}
    _write(os.path.join(out_dir, "test_counts.json"), json.dumps(record, indent=1))
    print(_tests_markdown(record))
    return 0


def _tests_markdown(counts: dict) -> str:
    t = counts["totals"]
    lines = [f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, {t['skipped']} skipped"
             + (f", {t['interrupted']} interrupted" if t.get("interrupted") else "")
             + f"; ran {counts['ran']} of {counts['collected'] or '?'} collected", "",
             "| backend | passed | failed | error | skipped |", "|---|---:|---:|---:|---:|"]
    for b, c in counts["per_backend"].items():
        lines.append(f"| {b} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} |")
    if counts["failed"]:
        lines += ["", "Failed:"] + [f"- {f}" for f in counts["failed"][:40]]
        if len(counts["failed"]) > 40:
            lines.append(f"- ... and {len(counts['failed']) - 40} more (test_counts.json)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ summary


def cmd_summary(out_dir: str, print_short: bool = False) -> int:
    p = lambda name: os.path.join(out_dir, name)  # noqa: E731
    env = _read_json(p("env.json")) or {}
    dry = os.path.exists(p("DRY_RUN"))
    device = env.get("device") or ("CPU (dry run)" if dry else "unknown device")
    lines = [f"# GPU check{' (dry run)' if dry else ''}: {device}", ""]
    meta = _read_text(p("meta.txt"))
    if meta:
        lines += [meta.strip(), ""]
    lines.append(", ".join(f"{k} {env[k]}" for k in ("python", "torch", "torch_cuda", "triton", "transformers", "timm")
                           if k in env))
    lines += ["", "## Phases", "", "| phase | exit | seconds | note |", "|---|---:|---:|---|"]
    for line in (_read_text(p("phases.tsv")) or "").splitlines():
        parts = (line.split("\t") + ["", "", "", ""])[:4]
        lines.append("| " + " | ".join(parts) + " |")

    lines += ["", "## Build"]
    build = _build_verdict(out_dir, dry)
    lines += ["", build]
    backends = _read_json(p("backends.json"))
    if backends:
        lines += ["", "| backend | available | why |", "|---|---|---|"]
        for name in ("torch", "triton", "cuda", "cpp"):
            st = backends.get(name) or {}
            lines.append(f"| {name} | {'yes' if st.get('available') else '**no**'} | {st.get('reason', '')} |")

    lines += ["", "## Tests", ""]
    counts = _read_json(p("test_counts.json"))
    lines.append(_tests_markdown(counts) if counts else "no test results")

    lines += ["", "## Benchmark", ""]
    bench = _read_text(p("gpu_bench.md"))
    bench_lines = [line for line in (bench or "no benchmark results").splitlines() if not line.startswith("# ")]
    while bench_lines and not bench_lines[0].strip():
        bench_lines.pop(0)
    roof = _read_text(p("roofline_b2_1024_bf16_measured.md"))
    if roof:  # gpu_bench --roofline: the per-op table (the per-call rows stay in its own file)
        per_op = roof.split("## Per op", 1)[-1].split("\n## ")[0].splitlines()
        bench_lines += ["", "## Roofline, measured (roofline_b2_1024_bf16_measured.md)"] + per_op
    table = _read_text(p("backend_table_b2_1024.md"))
    impls = [line for line in (table or "").split("\nPer call:")[0].splitlines() if line.startswith("|")]
    if impls:  # gpu_bench --backends: each op's implementations, fastest first
        bench_lines += ["", "## Implementations per op (backend_table_b2_1024.md)", ""] + impls
    _write(p("summary.md"), "\n".join(lines + bench_lines).rstrip() + "\n")
    if print_short:  # the per-row table left out; the rows that failed listed instead
        cut = next((i for i, line in enumerate(bench_lines) if line.startswith("| case | provider")), len(bench_lines))
        short = bench_lines[:cut]
        short += [line for line in bench_lines[cut:] if line.startswith("Skipped:")]
        if roof:
            short += ["", "## Roofline, measured"] + [line for line in per_op if line.startswith("|")]
        if impls:
            short += ["", "## Implementations per op"] + impls
        rows = (_read_json(p("gpu_bench.json")) or {}).get("results", [])
        bad = [f"- {r['case']} {r['provider']}: {r['status']} {r.get('error') or ''}" for r in rows if r["status"] != "ok"]
        short += (["", "Not ok:"] + bad[:30]) if bad else []
        print("\n".join(lines + short).rstrip())
    return 0


def _build_verdict(out_dir: str, dry: bool) -> str:
    phases = {}
    for line in (_read_text(os.path.join(out_dir, "phases.tsv")) or "").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            phases[parts[0]] = parts[1]
    backends = _read_json(os.path.join(out_dir, "backends.json"))
    notes = []
    if dry:
        notes.append("dry run: build skipped.")
    elif "build" not in phases:
        notes.append("build not run (yet).")
    elif phases["build"] == "0":
        notes.append("build ok (pip install --no-build-isolation --no-deps -e .).")
    else:
        notes.append(f"**BUILD FAILED** (pip exit {phases['build']}; fallback build_ext --inplace exit "
                     f"{phases.get('build-inplace', 'not run')}); see build.log.")
    if backends is None:
        notes.append("**backend check did not run or failed** (see build.log).")
    elif backends.get("missing_required"):
        notes.append(f"**REQUIRED BACKENDS MISSING: {', '.join(backends['missing_required'])}**")
    elif backends.get("required"):
        notes.append(f"required backends present: {', '.join(backends['required'])}.")
    return " ".join(notes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in ("env", "backends", "tests", "summary"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, out_dir = argv[0], argv[1]
    os.makedirs(out_dir, exist_ok=True)
    if cmd == "env":
        return cmd_env(out_dir)
    if cmd == "backends":
        require = []
        if "--require" in argv:
            require = [b for b in argv[argv.index("--require") + 1].split(",") if b]
        return cmd_backends(out_dir, require)
    if cmd == "tests":
        return cmd_tests(out_dir)
    return cmd_summary(out_dir, print_short="--print-short" in argv)


if __name__ == "__main__":
    sys.exit(main())
