"""End-to-end SegFormer: fast vs reference vs Hugging Face, inference and a training step, in fp32 and
under bf16 autocast (every provider under the same autocast; the bf16 cases are named ``...-bf16``)."""

import pytest

from .conftest import MODEL_PROVIDERS, model_providers, run_model_case, size_param, skip_unavailable


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("size", [size_param(512), size_param(1024)])
@pytest.mark.parametrize("variant", ["b0", "b2"])
@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
def test_segformer(benchmark, request, device, provider, variant, size, mode, amp):
    skip_unavailable(provider, request)
    p = model_providers(variant, device, request.config.getoption("--bench-compile"))[provider]
    case = f"segformer-{variant}-{size}-{mode}" + ("" if amp == "fp32" else f"-{amp}")
    run_model_case(benchmark, device, p, provider=provider, case=case, size=size, mode=mode,
                   amp=None if amp == "fp32" else amp)
