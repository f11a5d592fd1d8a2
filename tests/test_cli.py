import json
import subprocess
import sys

from types import SimpleNamespace

import pytest
import torch

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


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_benchmark_under_autocast(capsys, tmp_path, amp):
    out_json = tmp_path / "bench.json"
    rc = main(["benchmark", "--size", "64", "--repeat", "1", "--warmup", "0", "--train", "--num-classes", "4",
               "--no-progress", "--amp", amp, "--json", str(out_json)])
    assert rc == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert f"autocast {amp}" in header and ("GradScaler" in header) == (amp == "fp16")
    record = json.loads(out_json.read_text())
    assert record["amp"] == amp and {r["amp"] for r in record["rows"]} == {amp}
    assert all(r["saved_bytes"] > 0 for r in record["rows"])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_memory_under_autocast(capsys, amp):
    from segformer_fast.tools.benchmark import have_transformers

    hf = amp == "bf16" and have_transformers()
    args = ["memory", "--model", "b0", "--size", "64", "--num-classes", "4", "--amp", amp]
    assert main(args + ([] if hf else ["--no-hf"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"autocast {amp}" in lines[0]
    assert any(line.startswith(f"SegFormer-B0 64x64, batch 1, autocast {amp}:") for line in lines)
    head = next(line for line in lines if line.startswith("component"))
    assert head.split()[1:] == ["save", "recompute", "checkpoint", "reference"] + (["hf", "sdpa", "hf", "eager"] if hf else [])
    total = [float(v) for v in next(line for line in lines if line.startswith("total")).split()[1:]]
    assert all(t > 0 for t in total)


class _Probe(torch.nn.Module):
    """A linear classifier that notes its last input and the autocast state its forward ran under."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.config = SimpleNamespace(num_classes=4)
        self.seen, self.last = [], None

    def forward(self, x):  # (B, 3, H, W) -> (B, 4, H, W)
        self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        self.last = x
        return self.lin(x.movedim(1, -1)).movedim(-1, 1)

    def loss(self, x, labels):
        self.labels = labels
        return torch.nn.functional.cross_entropy(self(x).float(), labels)


@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_run_benchmark_autocasts_every_provider(amp):
    from segformer_fast.tools.benchmark import Provider, run_benchmark

    dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    torch.manual_seed(0)
    probes = {"fast": _Probe(), "hf": _Probe()}
    probes["hf"].load_state_dict(probes["fast"].state_dict())
    providers = {n: Provider(n, m, m, m.loss) for n, m in probes.items()}
    rows = run_benchmark(providers, size=(5, 7), train=True, warmup=0, repeat=1, progress=False, amp=amp)
    assert [r.amp for r in rows] == [amp, amp]
    for m in probes.values():  # the timed step and the saved-bytes forward
        assert m.seen == [dtype, dtype]
    # the timed step's gradients against a plain backward of the same loss: fp16 scales the loss first
    # (GradScaler's initial scale, 2^16), as a user's training step does
    hf, ref = probes["hf"], probes["fast"]
    ref.zero_grad()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = ref.loss(hf.last, hf.labels)
    loss.backward()
    ratio = hf.lin.weight.grad.abs().sum() / ref.lin.weight.grad.abs().sum()
    assert ratio.item() == pytest.approx(2.0**16 if amp == "fp16" else 1.0, rel=1e-2)


@pytest.mark.parametrize("command", ["benchmark", "memory"])
def test_amp_rejects_unknown_dtype(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--amp", "fp8"])
    assert info.value.code == 2
    assert "argument --amp: invalid choice: 'fp8' (choose from 'none', 'bf16', 'fp16')" in capsys.readouterr().err


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "segformer_fast.tools.cli", *args],
                          capture_output=True, text=True, timeout=120, **kw)


def test_version_prints_package_version():
    import segformer_fast

    r = _cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"segformer-fast {segformer_fast.__version__}"


def test_bare_call_prints_help_and_succeeds():
    r = _cli()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: segformer-fast")
    for command in ("info", "benchmark", "memory", "train", "predict", "evaluate", "export"):
        assert f"    {command}" in r.stdout


@pytest.mark.parametrize("command, option", [("benchmark", "--size"), ("memory", "--size"), ("train", "--threads"),
                                             ("predict", "--scales"), ("evaluate", "--split")])
def test_subcommand_help_shows_defaults(command, option):
    r = _cli(command, "--help")
    assert r.returncode == 0, r.stderr
    line = r.stdout[r.stdout.index(f"  {option}"):]
    assert "(default:" in line.split("\n  --")[0]


SUBCOMMANDS = [["info"], ["benchmark"], ["memory"], ["train"], ["predict", "x.png", "--out", "o", "--weights", "w"],
               ["evaluate", "--data", "synthetic", "--weights", "w"], ["export", "--out", "m.onnx", "--weights", "w"]]


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=[a[0] for a in SUBCOMMANDS])
def test_every_subcommand_takes_device_threads_and_debug(argv):
    from segformer_fast.tools.cli import build_parser

    args = build_parser().parse_args([*argv, "--threads", "3", "--device", "cpu", "--debug"])
    assert (args.threads, args.device, args.debug) == (3, "cpu", True)
    r = _cli(argv[0], "--help")
    for option in ("--threads THREADS", "--device DEVICE", "--debug"):
        assert option in r.stdout, (argv[0], option)


def test_help_imports_no_torch():
    # --help must answer at once: building the whole parser (every subcommand) and importing the package
    # must not import torch; the commands import it when they run
    code = ("import sys, segformer_fast, segformer_fast.train; from segformer_fast.tools.cli import build_parser; "
            "build_parser(); print(sorted(m for m in ('torch', 'numpy', 'triton') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_package_names_load_on_first_use():
    code = ("import sys, segformer_fast as sf; assert 'torch' not in sys.modules; "
            "assert 'segformer' in dir(sf) and 'predict' in sf.__all__; m = sf.segformer('b0', num_classes=3); "
            "assert type(m).__name__ == 'SegFormer' and sf.ops.sr_attention is not None; "
            "import segformer_fast.train as t; assert t.TrainConfig().steps > 0\n"
            "try:\n    sf.no_such_name\nexcept AttributeError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "module 'segformer_fast' has no attribute 'no_such_name'"


def test_ops_are_registered_when_torch_came_first():
    # a program that imports torch, then segformer_fast, can torch.export.load a saved graph of our ops
    code = "import torch, segformer_fast; print(hasattr(torch.ops.segformer_fast, 'sr_attention'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def test_device_without_cuda_is_a_one_line_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error path needs a machine without it")
    assert main(["info", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("segformer-fast info: error: --device cuda: no CUDA device is available"), err
    assert main(["info", "--device", "tpu:x"]) == 2
    assert "is not a device name" in capsys.readouterr().err


def test_debug_shows_the_traceback(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error path needs a machine without it")
    with pytest.raises(ValueError, match="no CUDA device"):
        main(["info", "--device", "cuda", "--debug"])


def test_export_writes_a_verified_onnx_graph_and_refuses_to_overwrite(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    import onnx

    import segformer_fast as sf

    weights = tmp_path / "b0.safetensors"
    sf.save_weights(sf.segformer("b0", num_classes=3), weights)
    out = tmp_path / "b0.onnx"
    assert main(["export", "--weights", str(weights), "--out", str(out), "--size", "64", "--verify"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "dynamic batch, height and width" in text
    err = float(text.split("max |difference| of logits ")[1].split()[0])
    assert err < 1e-3
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in (dims[0], dims[2], dims[3]))  # dynamic B, H, W
    before = out.read_bytes()
    assert main(["export", "--weights", str(weights), "--out", str(out), "--size", "64"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_physical_cores_within_allowed_cpus():
    import os

    from segformer_fast.tools.runtime import physical_cores

    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


def test_runtime_args_set_threads_and_warn_on_oversubscription(monkeypatch, capsys):
    import os

    from segformer_fast.tools.runtime import apply_runtime_args, physical_cores

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        apply_runtime_args(SimpleNamespace(command="benchmark", threads=None))
        assert torch.get_num_threads() == physical_cores()
        assert capsys.readouterr().err == ""
        monkeypatch.setattr(os, "getloadavg", lambda: (os.cpu_count() + 3.0, 0.0, 0.0))
        apply_runtime_args(SimpleNamespace(command="train", threads=None))
        assert torch.get_num_threads() == 1  # every core busy elsewhere: one thread, which never waits on another
        assert "(1 torch threads)" in capsys.readouterr().err
        monkeypatch.setattr(os, "getloadavg", lambda: (os.cpu_count() + 1.5, 0.0, 0.0))
        apply_runtime_args(SimpleNamespace(command="benchmark", threads=1))
        assert torch.get_num_threads() == 1
        err = capsys.readouterr().err
        assert err.startswith("segformer-fast benchmark: warning: load average") and err.count("\n") == 1
        with pytest.raises(ValueError, match="--threads"):
            apply_runtime_args(SimpleNamespace(command="benchmark", threads=0))
    finally:
        torch.set_num_threads(before)


def test_default_threads_leave_the_cores_other_processes_use(monkeypatch):
    import os

    import segformer_fast.tools.runtime as rt

    monkeypatch.setattr(rt, "physical_cores", lambda: 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)  # 8 cores, 2 hyperthreads each
    assert rt.default_threads(0.3) == 8
    assert rt.default_threads(9.5) == 7  # 9 CPUs busy: 7 left
    assert rt.default_threads(40.0) == 1
