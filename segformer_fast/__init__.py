"""segformer_fast: fast, memory-lean SegFormer and SETR for PyTorch.

Fused Triton / CUDA / C++ kernels behind torch.autograd, each with a pure-PyTorch reference beside it.
"""

from .backends import available_backends
from .dispatch import explain
from .tools.export import export_onnx
from .configs import SEGFORMER_VARIANTS, LayerNormEps, SegFormerConfig, get_config
from .io import CheckpointMismatchError, LoadReport, export_state_dict, from_pretrained, load_weights, save_weights
from .models import SegFormer, segformer, segformer_loss_reference
from .models.setr import SETR, setr, setr_loss
from .io.setr_weights import load_setr_weights
from .patch import is_patched, patch, unpatch
from .prediction import predict, predict_probs

__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "export_onnx",
    "export_state_dict",
    "from_pretrained",
    "load_weights",
    "save_weights",
    "SEGFORMER_VARIANTS",
    "LayerNormEps",
    "SegFormer",
    "SegFormerConfig",
    "available_backends",
    "explain",
    "get_config",
    "is_patched",
    "patch",
    "unpatch",
    "predict",
    "predict_probs",
    "segformer",
    "segformer_loss_reference",
    "SETR",
    "setr",
    "setr_loss",
    "load_setr_weights",
]
