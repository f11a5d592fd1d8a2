from .segformer import MiTEncoder, MiTStage, SegFormer, segformer

__all__ = ["MiTEncoder", "MiTStage", "SegFormer", "segformer"]
