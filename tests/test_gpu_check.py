"""benchmarks/gpu_check.sh --dry-run: the GPU check's whole path (env, backend check, benchmark, tests
in shards, counting, summary) runs on the CPU and writes every file the GPU run writes."""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check_report  # noqa: E402

needs_shell = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and coreutils timeout")


@needs_shell
def test_dry_run_writes_every_case_and_the_summary(tmp_path):
    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    record = json.loads((out / "gpu_bench.json").read_text())
    assert record["meta"]["dry_run"] and record["meta"]["status"] == "complete"
    got = {(r["provider"], r["mode"], r["precision"]): r for r in record["results"]}
    for provider in ("ours", "patched_hf", "hf_eager", "hf_sdpa"):
        for mode in ("inference", "train"):
            for precision in ("fp32", "bf16"):
                row = got.get((provider, mode, precision))
                assert row is not None, f"no result for {provider} {mode} {precision}"
                assert row["status"] == "ok", row
                assert row["median_ms"] > 0 and row["images_per_s"] > 0 and row["speedup_vs_hf_eager"] > 0
                if mode == "inference":
                    assert row["finite"] and row["max_abs_diff_vs_hf_eager"] < (1e-3 if precision == "fp32" else 0.5)
                else:
                    assert 0 < row["loss"] < 20
    md = (out / "gpu_bench.md").read_text()
    assert "| b0-64-b1-train-bf16 |" in md and "HF SDPA" in md

    counts = json.loads((out / "test_counts.json").read_text())
    assert counts["ran"] == counts["collected"] > 0 and counts["totals"]["failed"] == counts["totals"]["error"] == 0
    assert sum(c["passed"] for b, c in counts["per_backend"].items() if b != "other") > 0
    assert ET.parse(out / "tests.xml").getroot().tag == "testsuites"

    phases = [line.split("\t") for line in (out / "phases.tsv").read_text().splitlines()]
    assert [p[0] for p in phases][:4] == ["env", "build", "backends", "bench"] and phases[-1][0].startswith("tests[")
    summary = (out / "summary.md").read_text()
    for heading in ("## Phases", "## Build", "## Tests", "## Benchmark"):
        assert heading in summary
    assert "dry run: build skipped" in summary and "| cpp | yes |" in summary
    for name in ("env.txt", "env.json", "build.log", "backends.json", "tests.log"):
        assert (out / name).stat().st_size > 0, name


def test_backend_of_reads_the_parametrisation():
    assert gpu_check_report.backend_of("test_matches_reference[train-1-hw0-triton]") == "triton"
    assert gpu_check_report.backend_of("test_x[cuda-B1_H2_W1_C33]") == "cuda"
    assert gpu_check_report.backend_of("test_y[setr-mla-b16-fp16-2-torch]") == "torch"
    assert gpu_check_report.backend_of("test_bad_input[not a tensor-TypeError-torch.Tensor]") == "other"
    assert gpu_check_report.backend_of("test_plain") == "other"


def test_counts_fall_back_to_outcome_lines_when_the_xml_is_missing(tmp_path):
    """A shard killed before pytest wrote its junit XML is counted from benchmarks.pytest_outcomes' lines."""
    (tmp_path / "tests-0.xml").write_text(
        '<testsuites><testsuite name="pytest"><testcase classname="t" name="a[cpp]"/>'
        '<testcase classname="t" name="b[cuda]"><failure message="x"/></testcase>'
        '<testcase classname="t" name="c"><skipped message="s"/></testcase><testcase time="0"/></testsuite></testsuites>')
    (tmp_path / "outcomes-0.jsonl").write_text('{"collected": 5}\n')
    lines = [{"collected": 4},
             {"nodeid": "t.py::d[triton]", "when": "call", "outcome": "passed"},
             {"nodeid": "t.py::e[triton]", "when": "setup", "outcome": "failed"},
             {"nodeid": "t.py::f[torch]", "when": "setup", "outcome": "skipped"}]
    (tmp_path / "outcomes-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert gpu_check_report.main(["tests", str(tmp_path)]) == 0
    counts = json.loads((tmp_path / "test_counts.json").read_text())
    assert counts["collected"] == 9
    assert counts["totals"] == {"passed": 2, "failed": 1, "error": 1, "skipped": 2, "interrupted": 1}
    assert counts["per_backend"]["triton"] == {"passed": 1, "failed": 0, "error": 1, "skipped": 0}
    assert counts["per_backend"]["cuda"]["failed"] == 1 and counts["per_backend"]["other"]["skipped"] == 1
    assert "junit" in counts["sources"]["0"] and "killed" in counts["sources"]["1"]


def test_summary_carries_the_measured_roofline_table(tmp_path, capsys):
    """gpu_bench --roofline's per-op table (measured ms, fraction of the bound) goes into summary.md and the
    printed summary; the per-call rows stay in their own file."""
    import roofline

    data = roofline.report("b2", 1024, 8)
    for i, t in enumerate(data["totals"]):
        t["measured_ms"] = t["bound_ms"] * (1.5 + i)
    roofline.write_measured(data, str(tmp_path))
    assert gpu_check_report.main(["summary", str(tmp_path), "--print-short"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "## Roofline, measured" in summary and "| measured ms | of bound |" in summary
    assert "| sr_attention | forward |" in summary and "67% |" in summary  # the first op at 1.5x its bound
    assert "## Per call" not in summary
    assert "| upsample_sum | backward |" in capsys.readouterr().out


def test_summary_carries_the_backend_table(tmp_path, capsys):
    """gpu_bench --backends's per-op table (each implementation, fastest first) goes into summary.md and the
    printed summary; its per-call rows and failures stay in its own file."""
    sys.path.insert(0, ROOT)  # the benchmarks package
    from benchmarks import backend_table

    rows = [dict(op="upsample_sum", shape="s", calls=1, backend="triton", forward_ms=1.0, train_ms=3.0),
            dict(op="upsample_sum", shape="s", calls=1, backend="cuda", forward_ms=2.0, train_ms=5.0),
            dict(op="sr_attention.core", shape="s", calls=1, backend="aten", error="RuntimeError: no")]
    data = dict(meta=dict(model="b2", image=1024, batch=8, dtype="bfloat16", device="GPU", capability=[9, 0],
                          torch="x", repeat=5), rows=rows,
                totals={"upsample_sum": {"triton": {"forward": 1.0, "train": 3.0},
                                         "cuda": {"forward": 2.0, "train": 5.0}}, "sr_attention.core": {}},
                order={"upsample_sum": ["triton", "cuda"], "sr_attention.core": []})
    backend_table.write(data, str(tmp_path))
    assert gpu_check_report.main(["summary", str(tmp_path), "--print-short"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "## Implementations per op" in summary
    assert "| upsample_sum | triton | 1.000 | 3.000 | 1 |" in summary
    assert "| upsample_sum | cuda | 2.000 | 5.000 | 2 |" in summary
    assert "Per call" not in summary and "RuntimeError" not in summary
    assert "| upsample_sum | cuda |" in capsys.readouterr().out
