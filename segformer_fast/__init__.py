"""segformer_fast: fast, memory-lean SegFormer and SETR for PyTorch.

Fused Triton / CUDA / C++ kernels behind torch.autograd, each with a pure-PyTorch reference beside it.

The public names below load their modules on first use, so ``import segformer_fast`` is cheap and the
``segformer-fast`` command answers ``--help`` without importing torch. When torch is already imported
(any program that will run a model), the fused ops are registered with torch at import, so
``torch.export.load`` finds them in a saved program.
"""

import sys as _sys

from .utils.lazy import lazy_exports as _lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "available_backends": ".backends",
    "explain": ".dispatch",
    "export_onnx": ".tools.export",
    "SEGFORMER_VARIANTS": ".configs",
    "LayerNormEps": ".configs",
    "SegFormerConfig": ".configs",
    "get_config": ".configs",
    "CheckpointMismatchError": ".io",
    "LoadReport": ".io",
    "export_state_dict": ".io",
    "from_pretrained": ".io",
    "load_weights": ".io",
    "save_weights": ".io",
    "to_hf": ".io",
    "SegFormer": ".models",
    "segformer": ".models",
    "segformer_loss_reference": ".models",
    "SETR": ".models.setr",
    "setr": ".models.setr",
    "setr_loss": ".models.setr",
    "load_setr_weights": ".io.setr_weights",
    "is_patched": ".patch",
    "patch": ".patch",
    "unpatch": ".patch",
    "predict": ".prediction",
    "predict_probs": ".prediction",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, globals(), _EXPORTS)

if "torch" in _sys.modules:  # a program that runs models: register the custom ops now (cheap: torch is loaded)
    from . import ops as _ops  # noqa: F401
