import pytest
import torch

import segformer_fast as sf
from segformer_fast import backends


def test_reference_always_available():
    status = sf.available_backends()
    assert set(status) == set(backends.BACKENDS)
    assert status["torch"].available
    for st in status.values():
        assert st.reason


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        sf.segformer("b0", backend="fastest")


def test_missing_backend_is_an_error_not_a_fallback():
    if sf.available_backends()["cuda"].available:
        pytest.skip("the CUDA backend is present here")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        sf.segformer("b0", backend="cuda")


def test_env_var_sets_the_default(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert sf.segformer("b0", depths=(1, 1, 1, 1)).backend == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown backend"):
        sf.segformer("b0")


def test_resolve_auto_and_explicit():
    from segformer_fast.dispatch import get_spec

    x = torch.randn(1, 4, 4, 8)
    assert get_spec("mlp_gelu").resolve("auto", x).backend == "torch"
    assert get_spec("upsample_sum").resolve("torch", x).backend == "torch"
    with pytest.raises(NotImplementedError, match="has no 'cpp' implementation"):
        get_spec("mlp_gelu").resolve("cpp", x)


def test_saved_tensor_recorder_counts_activations_not_parameters():
    from segformer_fast.utils.memory import SavedTensorRecorder

    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(8, 64, requires_grad=True)
    with SavedTensorRecorder([w]) as rec:
        y = (x @ w).relu()  # saves x (for dw), w (excluded) and the relu output
    assert rec.bytes == x.numel() * 4 + y.numel() * 4
    with SavedTensorRecorder() as rec2:
        (x @ w).sum()
    assert rec2.bytes == (x.numel() + w.numel()) * 4
