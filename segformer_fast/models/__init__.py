from .segformer import MiTEncoder, MiTStage, SegFormer, segformer, segformer_loss_reference
from .setr import SETR, SETROutput, ViTEncoder, setr, setr_loss

__all__ = ["MiTEncoder", "MiTStage", "SegFormer", "segformer", "segformer_loss_reference", "SETR", "SETROutput",
           "ViTEncoder", "setr", "setr_loss"]
