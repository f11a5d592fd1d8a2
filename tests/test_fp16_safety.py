"""benchmarks/fp16_safety.py: the result's shape on a tiny B0 run, and that its detectors see injected faults."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import fp16_safety  # noqa: E402

TINY = ["--model", "b0", "--size", "32", "--batch", "1", "--device", "cpu", "--no-progress"]


def _fused_layer(model, cls: str) -> str:
    return next(name for name, c in fp16_safety.fused_layer_names(model).items() if c == cls)


def test_run_writes_result_and_summary(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = fp16_safety.main(TINY + ["--steps", "2", "--out", str(out), "--markdown", str(md)])
    result = json.loads(out.read_text())
    assert rc == 0, result["verdict"]
    assert result["verdict"]["passed"] and not result["verdict"]["failures"]
    assert {"config", "environment", "op_backends_fp16", "fused_layers", "models", "verdict"} <= set(result)
    assert result["fused_layers"] and all(f["class"].startswith("Fused") for f in result["fused_layers"])
    assert set(result["models"]) == {"fused", "reference"}
    assert result["models"]["fused"]["backend"] != "torch" and result["models"]["reference"]["backend"] == "torch"
    for m in result["models"].values():
        assert m["steps_run"] == 2 and len(m["per_step"]) == 2
        assert m["nonfinite_activations"]["count"] == 0
        assert m["skipped_steps"] == len(m["skipped_step_indices"]) == m["initial_backoff_skips"] + m["later_skips"]
        assert m["detector_scaler_mismatch_steps"] == []
        # a step has non-finite gradients exactly when the scaler skipped it
        assert m["nonfinite_gradients"]["step_indices"] == m["skipped_step_indices"]
        assert m["final_scale"] == m["initial_scale"] / 2 ** m["skipped_steps"]
        assert m["wall_time_s"] > 0
        assert all(math.isfinite(r["loss"]) for r in m["per_step"])
        assert m["largest_abs_output"] and 0 < m["largest_abs_output"][0]["max_abs"] < fp16_safety.FP16_MAX
    assert "PASS" in md.read_text() and "| skipped steps" in md.read_text()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # atomic writes leave no temp file


def test_detector_reports_inf_written_into_a_fused_layer_input(tmp_path):
    injected = []

    def prepare(label, model):
        name = _fused_layer(model, "FusedMixFFN")
        injected.append(name)

        def write_inf(module, args):
            x = args[0].clone()
            x.view(-1)[0] = math.inf
            return (x,) + tuple(args[1:])

        model.get_submodule(name).register_forward_pre_hook(write_inf)

    out = tmp_path / "r.json"
    rc = fp16_safety.main(TINY + ["--steps", "1", "--models", "fused", "--out", str(out)], prepare=prepare)
    result = json.loads(out.read_text())
    acts = result["models"]["fused"]["nonfinite_activations"]
    assert rc == 1
    assert acts["count"] >= 1
    assert acts["events"][0] == {"step": 0, "layer": injected[0], "class": "FusedMixFFN",
                                 "nonfinite": acts["events"][0]["nonfinite"]}
    assert acts["events"][0]["nonfinite"] > 0
    assert any(injected[0] in f for f in result["verdict"]["failures"])


def test_detector_attributes_a_nonfinite_gradient_to_its_fused_layer(tmp_path):
    injected = []

    def prepare(label, model):
        name = _fused_layer(model, "FusedSpatialReductionAttention")
        injected.append(name)
        param = next(p for p in model.get_submodule(name).parameters() if p.requires_grad)
        param.register_hook(lambda g: torch.full_like(g, math.nan))

    out = tmp_path / "r.json"  # scale 1: no overflow of its own, so the injected NaN is the only one
    rc = fp16_safety.main(TINY + ["--steps", "1", "--models", "fused", "--init-scale", "1", "--out", str(out)],
                          prepare=prepare)
    m = json.loads(out.read_text())["models"]["fused"]
    grads = m["nonfinite_gradients"]
    assert rc == 1  # without a reference, any gradient originating in a fused layer fails
    assert m["nonfinite_activations"]["count"] == 0
    assert m["skipped_steps"] == 1 and m["detector_scaler_mismatch_steps"] == []
    assert grads["parameter_events"]["in_fused_layers"] >= 1
    assert injected[0] in grads["events_in_fused_layers"][0]["layers"]
    assert grads["origin_steps"] == {"in_fused_layers": 1, "elsewhere": 0}
    assert grads["origins"][0]["origin"] == [injected[0]]


@pytest.mark.parametrize("steps, slack", [(30, 2), (300, 5)])
def test_skip_slack(steps, slack):
    assert fp16_safety.skip_slack(steps) == slack
