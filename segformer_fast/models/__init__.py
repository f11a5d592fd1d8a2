from .segformer import MiTEncoder, MiTStage, SegFormer, segformer
from .setr import SETR, SETROutput, ViTEncoder, setr, setr_loss

__all__ = ["MiTEncoder", "MiTStage", "SegFormer", "segformer", "SETR", "SETROutput", "ViTEncoder", "setr", "setr_loss"]
