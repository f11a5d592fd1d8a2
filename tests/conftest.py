import os

# Must happen before anything imports triton: with no CUDA device, Triton kernels run in the
# interpreter on the CPU, so every CI run exercises them.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SEGFORMER_FAST_DEBUG", "1")  # NaN-fill torch.empty outputs of kernels

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _select_standin(monkeypatch):
    """Selects the CPU stand-in of the CUDA extension for one test (skips where it cannot run)."""
    from segformer_fast.testing import cuda_standin as standin

    reason = standin.unavailable_reason()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv(standin.ENV_VAR, "1")
    return standin


@pytest.fixture(autouse=True)
def _cuda_backend_without_gpu(request, monkeypatch):
    """A test parametrised with backend="cuda" runs, where there is no CUDA device, on the CPU
    stand-in of the CUDA extension (segformer_fast.testing.cuda_standin): the CUDA glue is then
    tested on every CI run. Its tensors go on ``segformer_fast.testing.backend_device("cuda")``."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cuda" and not torch.cuda.is_available():
        _select_standin(monkeypatch)
    yield


@pytest.fixture
def cuda_standin(monkeypatch):
    """Selects the CPU stand-in of the CUDA extension for one test (skips where it cannot run)."""
    return _select_standin(monkeypatch)


@pytest.fixture
def torchrun(tmp_path):
    """``torchrun(source)``: run a Python script under torch.distributed.run with 2 CPU processes.

    The script gets ``tmp_path`` as its first argument (to write its results there); the run must
    succeed (its output tails are shown otherwise).
    """
    import subprocess
    import sys

    def run(source: str, nproc: int = 2, timeout: int = 240) -> None:
        driver = tmp_path / "driver.py"
        driver.write_text(source)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(driver), str(tmp_path)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    return run
