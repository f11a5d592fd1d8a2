"""segformer_fast.ops._triton_launch: launch configuration by tensor device."""

import pytest
import torch

from segformer_fast.ops._triton_launch import force_gpu_launch_config, gpu_launch_config


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
    for mod, n in ((us, 768), (uce, 150)):
        gpu_cfg = tuple(mod.launch_config(n, gpu=True).values())
        cpu_cfg = tuple(mod.launch_config(n, gpu=False).values())
        assert gpu_cfg != cpu_cfg
        assert mod._blocks(n, meta) == gpu_cfg
        assert mod._blocks(n, cpu) == cpu_cfg
        with force_gpu_launch_config():
            assert mod._blocks(n, cpu) == gpu_cfg
    assert us.launch_config(768, gpu=True) == {"BLOCK_P": 32, "BLOCK_D": 128}  # the GPU sizes, unchanged
    assert uce.launch_config(150, gpu=True) == {"BLOCK_P": 32, "BLOCK_K": 64}

