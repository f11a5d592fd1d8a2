"""One dispatcher: every fused op declares its implementations, one resolver picks, explain() says why."""

import pytest
import torch

import segformer_fast as sf
from segformer_fast import backends
from segformer_fast.dispatch import Impl, OpSpec, clear_caches, explain, get_spec, specs

OPS = ("sr_attention", "sr_attention.core", "dwconv3x3_gelu", "upsample_sum", "upsample_cross_entropy", "mlp_gelu",
       "conv_bn_relu_up")


def test_every_op_is_registered_with_its_implementations():
    got = specs()
    assert set(OPS) <= set(got)
    for name in ("dwconv3x3_gelu", "upsample_sum", "upsample_cross_entropy"):
        assert set(got[name].impls) == {"torch", "triton", "cpp", "cuda"}, name
        for impl in got[name].impls.values():
            assert impl.forward is not None and impl.backward is not None and impl.note, (name, impl.backend)
    assert set(got["sr_attention"].impls) == {"torch", "triton", "cuda", "cpp"}
    assert set(got["mlp_gelu"].impls) == set(got["conv_bn_relu_up"].impls) == {"torch"}


def _spec(calls):
    # A toy op whose "cpp" needs a condition and falls back to torch, to test the resolver alone.
    def cond(x, facts):
        return None if facts.get("k", 0) < 4 else f"k={facts['k']} is too large"

    return OpSpec("toy", [
        Impl("torch", lambda x: calls.append("torch"), note="reference"),
        Impl("cpp", lambda x: calls.append("cpp"), conditions=(cond,), fallback="torch", note="fast"),
    ], prefer={"cpu": ("cpp", "torch")})


def test_resolution_order_explicit_then_environment_then_auto(monkeypatch):
    if not sf.available_backends()["cpp"].available:
        pytest.skip(sf.available_backends()["cpp"].reason)
    spec, x = _spec([]), torch.zeros(2)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert spec.resolve("auto", x, k=1).backend == "cpp"  # auto: the device's preference
    assert spec.resolve("torch", x, k=1).backend == "torch"  # explicit
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert spec.resolve("auto", x, k=1).backend == "torch"  # the environment before auto
    assert spec.resolve("cpp", x, k=1).backend == "cpp"  # an explicit argument before the environment
    assert spec.resolve("auto", x, use_env=False, k=1).backend == "cpp"
    monkeypatch.setenv(backends.ENV_VAR, "triton")  # an op without it: auto, and the explanation says so
    ex = spec.explain("auto", x, k=1)
    assert ex.chosen() == {"toy": "cpp"} and "SEGFORMER_FAST_BACKEND=triton cannot run it" in str(ex)


def test_declared_fallback_is_shown_and_other_failures_raise(monkeypatch):
    if not sf.available_backends()["cpp"].available:
        pytest.skip(sf.available_backends()["cpp"].reason)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    spec, x = _spec([]), torch.zeros(2)
    assert spec.resolve("cpp", x, k=9).backend == "torch"
    rows = {b: (runs, why) for _, _, b, runs, why in spec.explain("cpp", x, k=9).rows()}
    assert rows["torch"][0] and "declared fallback of cpp: k=9 is too large" in rows["torch"][1]
    assert not rows["cpp"][0] and rows["cpp"][1] == "k=9 is too large"
    assert spec.resolve("auto", x, k=9).backend == "torch"
    with pytest.raises(NotImplementedError, match="toy has no 'cuda' implementation"):
        spec.resolve("cuda", x)
    with pytest.raises(ValueError, match="unknown backend"):
        spec.resolve("fastest", x)
    no_fallback = OpSpec("toy2", [Impl("torch"), Impl("cpp", conditions=(lambda x, f: "never",))], prefer={})
    with pytest.raises(ValueError, match="backend 'cpp' cannot run here: never"):
        no_fallback.resolve("cpp", x)


def test_a_stale_extension_is_a_reason_in_every_op(monkeypatch, cuda_standin):
    # The extension built before an op lacks its functions: auto skips it with the reason, explicit raises.
    for name in ("sr_attention", "dwconv3x3_gelu", "upsample_sum", "upsample_cross_entropy"):
        spec = get_spec(name)
        missing = spec.impls["cuda"].needs[0]
        monkeypatch.delattr(cuda_standin, missing)
        clear_caches()  # resolutions are memoised; an extension does not change while a program runs
        x = torch.randn(1, 4, 4, 8)
        assert spec.resolve("auto", x).backend != "cuda"
        with pytest.raises(ValueError, match=f"lacks {missing}"):
            spec.resolve("cuda", x)
        monkeypatch.undo()
        monkeypatch.setenv(cuda_standin.ENV_VAR, "1")
        clear_caches()


def test_triton_core_head_dims_are_a_declared_fallback():
    core = get_spec("sr_attention.core")
    q = torch.randn(1, 5, 48)
    if not sf.available_backends()["triton"].available:
        pytest.skip(sf.available_backends()["triton"].reason)
    assert core.resolve("triton", q, head_dim=24).backend == "torch"
    assert core.resolve("triton", q, head_dim=32).backend == "triton"
    text = str(core.explain("triton", q, head_dim=24))
    assert "head dim 24 is not one of the Triton kernels'" in text and "declared fallback of triton" in text
    assert core.resolve("triton", q.bfloat16(), head_dim=32).backend == "torch"  # the interpreter's bf16 is wrong


def test_explain_a_model_names_every_fused_op_and_matches_what_runs():
    model = sf.segformer("b0", num_classes=3, depths=(1, 1, 1, 1)).eval()
    ex = explain(model, torch.randn(1, 3, 64, 64))
    chosen = ex.chosen()
    assert {"sr_attention", "sr_attention.core", "dwconv3x3_gelu", "upsample_sum"} <= set(chosen)
    assert {k: chosen[k] for k in model.op_backends()} == model.op_backends()
    text = str(ex)
    for name in chosen:
        assert name in text
    assert all(any(d.runs for d in ds) for _, _, ds in ex.calls)  # one runs per call
    ref = sf.segformer("b0", num_classes=3, depths=(1, 1, 1, 1), backend="torch").eval()
    assert explain(ref, torch.randn(1, 3, 64, 64)).chosen() == {}  # the reference model runs no fused op
    with pytest.raises(TypeError, match="explain"):
        explain(42)


def test_environment_variable_reaches_every_layer(monkeypatch):
    """SEGFORMER_FAST_BACKEND applies to attention, Mix-FFN and decoder alike (read in one place)."""
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    model = sf.segformer("b0", num_classes=3, depths=(1, 1, 1, 1), backend="auto").eval()
    assert model.backend == "auto"
    chosen = explain(model, torch.randn(1, 3, 64, 64)).chosen()
    assert set(chosen.values()) == {"torch"}, chosen
