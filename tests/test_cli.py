import json
import subprocess
import sys

import pytest

from segformer_fast.tools.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "info" in out and "benchmark" in out


def test_info_reports_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "triton", "cuda", "cpp"):
        assert f"  {name}" in out
    assert "torch " in out and "device" in out


def test_benchmark_small_train_run(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    rc = main(["benchmark", "--size", "64", "--width", "96", "--repeat", "1", "--warmup", "0", "--train",
               "--num-classes", "4", "--no-progress", "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "saved MiB" in out
    record = json.loads(out_json.read_text())
    providers = {r["provider"] for r in record["rows"]}
    assert {"fast", "reference"} <= providers
    assert all(r["saved_bytes"] > 0 and r["median_s"] > 0 for r in record["rows"])
    if "hf" in providers:  # same weights, same function: same order of saved bytes
        by = {r["provider"]: r for r in record["rows"]}
        assert 0.2 < by["reference"]["saved_bytes"] / by["hf"]["saved_bytes"] < 5


def test_entry_point_is_installed():
    proc = subprocess.run([sys.executable, "-m", "segformer_fast.tools.cli", "benchmark", "--help"],
                          capture_output=True, text=True, check=True)
    assert "--train" in proc.stdout and "--model" in proc.stdout


def test_benchmark_table_columns():
    from segformer_fast.tools.benchmark import BenchRow, format_table

    rows = [BenchRow("fast", "train", [0.5], 1, 2**20), BenchRow("reference", "train", [1.0], 1, 4 * 2**20)]
    table = format_table(rows)  # no Hugging Face row (SETR): the reference is the one baseline
    header, _, fast, ref = table.splitlines()
    assert header.split() == ["provider", "mode", "median", "ms", "images/s", "vs", "reference", "saved", "MiB",
                              "saved", "vs", "reference"]
    assert fast.split()[4:] == ["2.00x", "1.0", "0.25x"] and ref.split()[4:] == ["1.00x", "4.0", "1.00x"]
    rows.append(BenchRow("hf", "train", [2.0], 1, 8 * 2**20))
    header, _, fast, *_ = format_table(rows).splitlines()
    assert "vs hf" in header and "vs reference" in header and fast.split()[4:6] == ["4.00x", "2.00x"]
