"""Training, inference and evaluation: datasets, augmentation, the training loop, checkpoints, metrics.

    from segformer_fast.train import TrainConfig, train
    result = train(TrainConfig(steps=200, out="runs/demo"))

Names load their module on first use (see :mod:`segformer_fast.utils.lazy`), so the command line can
build its parser without importing torch.
"""

from ..utils.lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "CheckpointError": ".checkpoint",
    "read_checkpoint": ".checkpoint",
    "write_checkpoint": ".checkpoint",
    "DatasetError": ".datasets",
    "SegmentationFolder": ".datasets",
    "detect_layout": ".datasets",
    "evaluate": ".inference",
    "evaluate_dataset": ".inference",
    "load_model": ".inference",
    "predict_files": ".inference",
    "predict_probs": ".inference",
    "confusion_matrix": ".metrics",
    "metrics_from_confusion": ".metrics",
    "SyntheticSegmentation": ".synthetic",
    "NonFiniteLossError": ".trainer",
    "TrainConfig": ".config",
    "train": ".trainer",
    "EvalTransform": ".transforms",
    "TrainTransform": ".transforms",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, globals(), _EXPORTS)
