"""segformer_fast.ops.triton_launch: launch configuration by tensor device, and bf16 refused by the interpreter."""

import pytest
import torch

from segformer_fast.ops.triton_launch import force_gpu_launch_config, gpu_launch_config
from segformer_fast.testing import interpreter_unavailable_reason

_REASON = interpreter_unavailable_reason()
needs_interpreter = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def test_gpu_configuration_follows_the_tensor_device():
    cpu, meta = torch.empty(2), torch.empty(2, device="meta")
    assert not gpu_launch_config(cpu)
    assert gpu_launch_config(meta)
    with force_gpu_launch_config():
        assert gpu_launch_config(cpu)
        with force_gpu_launch_config():
            assert gpu_launch_config(cpu)
        assert gpu_launch_config(cpu)
    assert not gpu_launch_config(cpu)
    with pytest.raises(RuntimeError, match="inside"):
        with force_gpu_launch_config():
            raise RuntimeError("inside")
    assert not gpu_launch_config(cpu)  # left on an exception too


def test_launchers_pick_blocks_by_device():
    pytest.importorskip("triton")
    from segformer_fast.ops.upsample_cross_entropy import triton_kernels as uce
    from segformer_fast.ops.upsample_sum import triton_kernels as us

    cpu, meta = torch.empty(1), torch.empty(1, device="meta")
    for mod, n in ((us, 768), (uce, 64)):  # sizes where the GPU and interpreter tiles differ
        gpu_cfg = tuple(mod.launch_config(n, gpu=True).values())
        cpu_cfg = tuple(mod.launch_config(n, gpu=False).values())
        assert gpu_cfg != cpu_cfg
        assert mod._blocks(n, meta) == gpu_cfg
        assert mod._blocks(n, cpu) == cpu_cfg
        with force_gpu_launch_config():
            assert mod._blocks(n, cpu) == gpu_cfg
    assert us.launch_config(768, gpu=True) == {"BLOCK_P": 32, "BLOCK_D": 128}  # the GPU sizes, unchanged
    assert uce.launch_config(150, gpu=True) == {"BLOCK_P": 64, "BLOCK_K": 32}  # 160 class lanes


def _bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


def _sr_attention_fwd():
    from segformer_fast.ops.sr_attention.triton_kernels import sr_attention_fwd_triton

    sr_attention_fwd_triton(_bf16(1, 9, 32), _bf16(1, 4, 32), _bf16(1, 4, 32), 1, 32**-0.5)


def _sr_attention_bwd():
    from segformer_fast.ops.sr_attention.triton_kernels import sr_attention_bwd_triton

    q, k, v, o = _bf16(1, 9, 32), _bf16(1, 4, 32), _bf16(1, 4, 32), _bf16(1, 9, 32)
    sr_attention_bwd_triton(_bf16(1, 9, 32), q, k, v, o, torch.zeros(1, 1, 9), 1, 32**-0.5)


def _dwconv_fwd():
    from segformer_fast.ops.dwconv3x3_gelu.triton_kernels import dwconv3x3_gelu_fwd

    dwconv3x3_gelu_fwd(_bf16(1, 12, 5), (3, 4), _bf16(5, 1, 3, 3), _bf16(5))


def _dwconv_bwd():
    from segformer_fast.ops.dwconv3x3_gelu.triton_kernels import dwconv3x3_gelu_bwd

    dwconv3x3_gelu_bwd(_bf16(1, 12, 5), _bf16(1, 12, 5), (3, 4), _bf16(5, 1, 3, 3), _bf16(5))


def _upsample_sum_fwd():
    from segformer_fast.ops.upsample_sum.triton_kernels import upsample_sum_fwd_triton

    upsample_sum_fwd_triton([_bf16(1, 3, 4, 8), _bf16(1, 2, 2, 8)], 6, 8, None, None, False)


def _upsample_sum_bwd():
    from segformer_fast.ops.upsample_sum.triton_kernels import upsample_sum_bwd_triton

    upsample_sum_bwd_triton(_bf16(1, 6, 8, 8), [(3, 4), (2, 2)], [], None, None, False, False, False)


def _upsample_cross_entropy_fwd():
    from segformer_fast.ops.upsample_cross_entropy.triton_kernels import upsample_cross_entropy_fwd_triton

    upsample_cross_entropy_fwd_triton(_bf16(1, 3, 4, 5), torch.randint(0, 5, (1, 6, 8)), 255)


def _upsample_cross_entropy_bwd():
    from segformer_fast.ops.upsample_cross_entropy.triton_kernels import upsample_cross_entropy_bwd_triton

    coef, lse = torch.rand(1, 6, 8), torch.rand(1, 6, 8)
    upsample_cross_entropy_bwd_triton(coef, _bf16(1, 3, 4, 5), torch.randint(0, 5, (1, 6, 8)), lse)


LAUNCHERS = [_sr_attention_fwd, _sr_attention_bwd, _dwconv_fwd, _dwconv_bwd, _upsample_sum_fwd, _upsample_sum_bwd,
             _upsample_cross_entropy_fwd, _upsample_cross_entropy_bwd]


@needs_interpreter
@pytest.mark.parametrize("launch", LAUNCHERS, ids=lambda f: f.__name__.lstrip("_"))
def test_interpreter_refuses_bfloat16(launch):
    with pytest.raises(TypeError, match=r"Triton interpreter's bfloat16 arithmetic is wrong.*float16 or float32.*GPU"):
        launch()
    with force_gpu_launch_config(), pytest.raises(TypeError, match="bfloat16"):
        launch()


@needs_interpreter
def test_public_op_with_triton_backend_refuses_bfloat16():
    from segformer_fast.ops import upsample_cross_entropy

    logits = torch.randn(1, 5, 3, 4).to(torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 arithmetic is wrong"):
        upsample_cross_entropy(logits, torch.randint(0, 5, (1, 6, 8)), backend="triton")
    upsample_cross_entropy(logits.half(), torch.randint(0, 5, (1, 6, 8)), backend="triton")  # fp16 still runs


def _tuner(n=3):
    from segformer_fast.ops.triton_launch import Autotuner, LaunchConfig

    return Autotuner("test_kernel", [LaunchConfig({"BLOCK": 32 * (i + 1)}, num_warps=4) for i in range(n)])


def test_autotuner_runs_the_declared_default_where_nothing_is_timed(monkeypatch):
    import segformer_fast.ops.triton_launch as tl

    tuner = _tuner()
    calls = []
    monkeypatch.setattr(tl, "_time_launch", lambda launch, cfg: calls.append(cfg) or 1.0)
    assert tuner.pick(torch.zeros(4), lambda c: None) is tuner.default  # a CPU tensor (the interpreter)
    assert tuner.pick(torch.zeros(4, device="meta"), lambda c: None) is tuner.default  # compiled ahead of time
    assert calls == [] and tuner.chosen == {}


def test_autotuner_times_once_per_key_not_per_image_size(monkeypatch):
    import segformer_fast.ops.triton_launch as tl

    tuner = _tuner()
    timed = []
    fastest = {32: 3.0, 64: 1.0, 96: 2.0}  # the second config is fastest

    def fake_time(launch, cfg):
        timed.append(cfg)
        launch(cfg)
        return fastest[cfg.meta["BLOCK"]]

    monkeypatch.setattr(tl, "_time_launch", fake_time)
    monkeypatch.setattr(tl, "_timing_device", lambda t: "NVIDIA H200")
    monkeypatch.delenv(tl.AUTOTUNE_ENV, raising=False)
    launched = []
    for hw in (64, 96, 128):  # three image sizes, one layer shape: timed once
        x = torch.zeros(1, 32, hw, hw)
        cfg = tuner.pick(x, launched.append, key=(32,))
        assert cfg.meta["BLOCK"] == 64
    assert len(timed) == 3 and launched == list(tuner.configs)
    tuner.pick(torch.zeros(1, 32, 8, 8, dtype=torch.float16), launched.append, key=(32,))  # another dtype: timed
    tuner.pick(torch.zeros(1, 64, 8, 8), launched.append, key=(64,))  # another layer shape: timed
    assert len(timed) == 9 and len(tuner.chosen) == 3
    monkeypatch.setenv(tl.AUTOTUNE_ENV, "0")
    assert tuner.pick(torch.zeros(1, 16, 8, 8), launched.append, key=(16,)) is tuner.default
    assert len(timed) == 9


def test_autotuner_never_picks_a_config_that_fails(monkeypatch):
    import math

    import segformer_fast.ops.triton_launch as tl

    tuner = _tuner(2)
    monkeypatch.setattr(tl, "_timing_device", lambda t: "gpu")
    monkeypatch.setattr(tl, "_time_launch", lambda launch, cfg: math.inf if cfg is tuner.default else 5.0)
    assert tuner.pick(torch.zeros(2), lambda c: None) is tuner.configs[1]


def test_launch_config_kwargs_and_validation():
    from segformer_fast.ops.triton_launch import Autotuner, LaunchConfig

    cfg = LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)
    assert cfg.kwargs() == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    assert len({cfg, LaunchConfig({"BLOCK_N": 32, "BLOCK_M": 64}, 8, 2)}) == 1
    with pytest.raises(ValueError, match="at least one configuration"):
        Autotuner("empty", [])


def test_autotuner_forcing_a_declared_config(monkeypatch):
    import segformer_fast.ops.triton_launch as tl

    tuner = _tuner()
    monkeypatch.setattr(tl, "_timing_device", lambda t: "gpu")
    monkeypatch.setattr(tl, "_time_launch", lambda launch, cfg: pytest.fail("nothing is timed while forcing"))
    with tuner.forcing(tuner.configs[2]):
        assert tuner.pick(torch.zeros(2), lambda c: None, key=(1,)) is tuner.configs[2]
        with tuner.forcing(tuner.configs[1]):
            assert tuner.pick(torch.zeros(2), lambda c: None) is tuner.configs[1]
        assert tuner.pick(torch.zeros(2), lambda c: None) is tuner.configs[2]
    assert tuner.forced is None and tuner.chosen == {}
    with pytest.raises(ValueError, match="not one of its configurations"):
        with tuner.forcing(tl.LaunchConfig({"BLOCK": 7})):
            pass


def test_every_registered_autotuner_is_wired_and_compiled_ahead_of_time():
    # the kernels that autotune (benchmarks/aot_compile.py compiles every configuration of each)
    pytest.importorskip("triton")
    import segformer_fast.ops.sr_attention.triton_kernels  # noqa: F401 - registers its tuners
    import segformer_fast.ops.dwconv3x3_gelu.triton_kernels  # noqa: F401
    from segformer_fast.ops.triton_launch import autotuners

    tuners = autotuners()
    assert {"sr_attention_fwd", "sr_attention_bwd_dq", "sr_attention_fwd_ieee", "sr_attention_bwd_dq_ieee",
            "dwconv3x3_gelu_fwd"} <= set(tuners)
    for tuner in tuners.values():
        assert len(tuner.configs) >= 2 and len(set(tuner.configs)) == len(tuner.configs), tuner.name


def test_autotuner_does_not_time_inside_a_cuda_graph_capture(monkeypatch):
    import segformer_fast.ops.triton_launch as tl

    tuner = _tuner()
    monkeypatch.setattr(tl, "_timing_device", lambda t: "gpu")
    monkeypatch.setattr(tl, "_time_launch", lambda launch, cfg: float(cfg.meta["BLOCK"]) if cfg is not tuner.default
                        else 99.0)
    monkeypatch.setattr(tl, "_capturing", lambda t: True)
    assert tuner.pick(torch.zeros(2), lambda c: None) is tuner.default and tuner.chosen == {}  # nothing cached
    monkeypatch.setattr(tl, "_capturing", lambda t: False)
    assert tuner.pick(torch.zeros(2), lambda c: None) is tuner.configs[1]  # timed at the first call outside
    monkeypatch.setattr(tl, "_capturing", lambda t: True)
    assert tuner.pick(torch.zeros(2), lambda c: None) is tuner.configs[1]  # the choice made stands in a capture
