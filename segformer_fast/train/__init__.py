"""Training, inference and evaluation: datasets, augmentation, the training loop, checkpoints, metrics.

    from segformer_fast.train import TrainConfig, train
    result = train(TrainConfig(steps=200, out="runs/demo"))
"""

from .checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from .datasets import DatasetError, SegmentationFolder, detect_layout
from .inference import evaluate, evaluate_dataset, load_model, predict_files, predict_probs
from .metrics import confusion_matrix, metrics_from_confusion
from .synthetic import SyntheticSegmentation
from .trainer import NonFiniteLossError, TrainConfig, train
from .transforms import EvalTransform, TrainTransform

__all__ = [
    "CheckpointError",
    "DatasetError",
    "EvalTransform",
    "NonFiniteLossError",
    "SegmentationFolder",
    "SyntheticSegmentation",
    "TrainConfig",
    "TrainTransform",
    "confusion_matrix",
    "detect_layout",
    "evaluate",
    "evaluate_dataset",
    "load_model",
    "metrics_from_confusion",
    "predict_files",
    "predict_probs",
    "read_checkpoint",
    "train",
    "write_checkpoint",
]
