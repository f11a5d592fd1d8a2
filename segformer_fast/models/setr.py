"""SETR: a plain ViT encoder (features at 1/16) with the Naive, PUP or MLA decoder, built from segformer_fast.nn.

Input sizes: any H, W >= the patch size (16). An image whose sides are not multiples of 16 is
zero-padded at the bottom and right up to the next multiple (as mmseg's ViT does with its
"corner" adaptive padding), segmented, and the logits cropped back to H x W. The learned position
embedding is interpolated bilinearly when the padded grid differs from img_size / 16.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import default_backend, validate_backend
from ..configs import MEMORY_MODES  # noqa: F401  (re-exported: its old home)
from ..configs import MemoryMode, SETRConfig, get_setr_config
from ..nn.setr_heads import ClassifierHead, MLANeck, SETRMLAHead, SETRUpHead
from ..nn.setr_heads_fused import FusedMLANeck, FusedSETRMLAHead, FusedSETRUpHead
from ..nn.vit_block import ViTBlock
from .segformer import Predicts, SegFormer, _init_weights, _run, check_image_batch, segformer_loss_reference

__all__ = ["ViTEncoder", "SETR", "SETROutput", "setr", "setr_loss"]


class SETROutput(NamedTuple):
    """What a SETR returns in training, or when given labels: main logits, auxiliary logits, loss.

    Without labels all logits are (B, K, H, W) at the input resolution and ``loss`` is None;
    ``aux_logits`` is empty when the model has no auxiliary heads (or in eval mode). With labels,
    ``loss`` is the training loss and the logits are the tensors it was computed from: at the input
    resolution on the reference backend, at each head's own resolution (over the input padded to a
    multiple of 16) on the fused ones, which never build full-resolution logits.
    """

    logits: torch.Tensor
    aux_logits: tuple[torch.Tensor, ...]
    loss: torch.Tensor | None = None


class ViTEncoder(nn.Module):
    """ViT encoder of SETR: patch-16 conv embedding, cls token, learned position embedding, blocks.

    Parameter names: patch_embed (Conv2d), cls_token (1, 1, C), pos_embed (1, 1 + G*G, C) with
    G = img_size / patch_size, blocks.{i} (:class:`ViTBlock`). No final LayerNorm (see SETRConfig).
    """

    def __init__(self, cfg: SETRConfig, backend: str | None = None, memory: str = "save"):
        super().__init__()
        mode = MemoryMode.parse(memory)
        self.config = cfg
        c, g = cfg.embed_dim, cfg.grid_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, c, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + g * g, c))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = [cfg.drop_path_rate * k / max(cfg.depth - 1, 1) for k in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            ViTBlock(c, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.drop_rate, p, cfg.ln_eps, backend,
                     mode.layer.value)
            for p in rates
        )
        self.checkpoint = mode is MemoryMode.CHECKPOINT

    def position_embedding(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls part (1, 1, C), grid part (1, h*w, C)), the grid resized bilinearly to h x w if needed."""
        g = self.config.grid_size
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        # traced (torch.export / compile) always resizes: exact when the size is the same, and it keeps
        # the graph free of a branch on the input size (dynamic H, W in an exported graph)
        if _traced() or (h, w) != (g, g):
            grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            grid = grid.flatten(2).transpose(1, 2)
        return cls_pos, grid

    def forward(self, images: torch.Tensor, indices: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """(B, 3, H, W) with H, W multiples of the patch size -> {block index: (B, C, H/16, W/16)}."""
        x = self.patch_embed(images)  # (B, C, h, w)
        b, c, h, w = x.shape
        cls_pos, grid_pos = self.position_embedding(h, w)
        x = x.flatten(2).transpose(1, 2) + grid_pos  # (B, h*w, C)
        skip = 0
        if self.config.uses_cls_token:
            x = torch.cat([(self.cls_token + cls_pos).expand(b, -1, -1), x], dim=1)  # (B, 1 + h*w, C)
            skip = 1
        x = self.pos_drop(x)
        feats, last = {}, max(indices)
        ckpt = self.checkpoint and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks[: last + 1]):
            x = _run(block, x, checkpointed=ckpt)
            if i in indices:
                feats[i] = x[:, skip:].reshape(b, h, w, c).permute(0, 3, 1, 2)  # a channels-last view
        return feats


class SETR(Predicts, nn.Module):
    """SETR semantic segmentation model (ViT encoder + Naive, PUP or MLA decoder).

    ``model(images)`` maps (B, 3, H, W) images (any H, W >= 16; see the module docstring for
    padding) to logits (B, num_classes, H, W) in eval mode, and to a :class:`SETROutput` (main and
    auxiliary logits, all at H x W) in training mode. Use :func:`setr_loss` for the loss.

    Auxiliary heads (``aux=True``): Naive/PUP on blocks ``config.aux_indices`` (9, 14, 19 for
    ViT-L), each a copy of the main head's kind (PUP's with two x2 stages); MLA one 1x1 classifier
    per neck level.

    Example:
        >>> model = segformer_fast.setr("pup", num_classes=19, embed_dim=64, depth=4, num_heads=2, img_size=64)
        >>> model.eval()(torch.randn(1, 3, 64, 80)).shape
        torch.Size([1, 19, 64, 80])
    """

    def __init__(self, config: SETRConfig, backend: str = "auto", memory: str = "save", aux: bool = True):
        super().__init__()
        memory = MemoryMode.parse(memory).value  # stored as the plain string
        self.config, self.memory, self.aux = config, memory, bool(aux)
        self.backend = validate_backend(backend)
        fused = self.backend != "torch"  # "torch" is the pure reference; every other backend the fused layers
        cfg, c, d, k = config, config.embed_dim, config.head_channels, config.num_classes
        self.encoder = ViTEncoder(cfg, self.backend if fused else None, memory)
        self.neck = None
        if cfg.decoder == "mla":
            self.neck = (FusedMLANeck if fused else MLANeck)(c, d, eps=cfg.ln_eps)
            self.decode_head = (FusedSETRMLAHead if fused else SETRMLAHead)(d, cfg.mla_head_channels, k)
            aux_heads = [ClassifierHead(d, k) for _ in range(4)] if aux else []
        else:
            up = FusedSETRUpHead if fused else SETRUpHead
            main, extra = ((4, 3, 2), (2, 3, 2)) if cfg.decoder == "pup" else ((1, 1, 1), (1, 1, 1))
            self.decode_head = up(c, d, k, *main, eps=cfg.ln_eps)
            aux_heads = [up(c, d, k, *extra, eps=cfg.ln_eps) for _ in cfg.aux_indices] if aux else []
        self.aux_heads = nn.ModuleList(aux_heads)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.encoder.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.encoder.cls_token, std=0.02)

    @property
    def feature_indices(self) -> tuple[int, ...]:
        """Blocks whose outputs the decoder reads (MLA: the four taps; else the last block)."""
        return self.config.mla_indices if self.config.decoder == "mla" else (self.config.depth - 1,)

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a clear error for input the model cannot segment."""
        check_image_batch(images, self.config.in_channels, self.config.patch_size, self.decode_head.conv_seg.weight)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                ignore_index: int = 255) -> torch.Tensor | SETROutput:
        """images (B, 3, H, W) -> eval: logits (B, K, H, W); training: :class:`SETROutput`.

        With ``labels`` (B, H, W) class ids (``ignore_index`` pixels skipped) the result is a
        :class:`SETROutput` whose ``loss`` is :func:`setr_loss` of the outputs (auxiliary terms in
        training only). Fused backends compute it with the upsampling cross-entropy op from the
        heads' low-resolution logits, so no full-resolution logits are kept for backward.
        """
        self.check_images(images)
        if labels is not None:
            _check_setr_labels(images, labels)
        h, w = images.shape[-2:]
        p = self.config.patch_size
        hp, wp = h + (-h) % p, w + (-w) % p  # rounded up to multiples of p (written so a shape solver sees hp >= h)
        if (hp, wp) != (h, w):
            images = F.pad(images, (0, wp - w, 0, hp - h))  # zeros at the bottom and right
        want_aux = self.training and len(self.aux_heads) > 0
        aux_idx = self.config.aux_indices if want_aux and self.config.decoder != "mla" else ()
        feats = self.encoder(images, tuple(sorted(set(self.feature_indices) | set(aux_idx))))
        low_res = labels is not None and self.backend != "torch"
        if self.neck is not None:
            levels = self.neck([feats[i] for i in self.config.mla_indices])
            logits = self.decode_head(levels)
            aux_in = levels
        else:
            logits = self._run_head(self.decode_head, feats[self.config.depth - 1], low_res)
            aux_in = [feats[i] for i in aux_idx]
        aux = tuple(self._run_head(head, x, low_res) for head, x in zip(self.aux_heads, aux_in)) if want_aux else ()
        if low_res:
            padded = F.pad(labels, (0, wp - w, 0, hp - h), value=ignore_index)  # padding adds no loss
            loss = _fused_loss((logits,) + aux, padded, ignore_index, self.backend)
            return SETROutput(logits, aux, loss)
        logits = _to_input(logits, (hp, wp), (h, w))
        aux = tuple(_to_input(a, (hp, wp), (h, w)) for a in aux)
        if labels is not None:
            return SETROutput(logits, aux, setr_loss(SETROutput(logits, aux), labels, ignore_index=ignore_index))
        return SETROutput(logits, aux) if self.training else logits

    def _run_head(self, head: nn.Module, x: torch.Tensor, low_res: bool) -> torch.Tensor:
        """A Naive/PUP head's logits; with ``low_res``, a head whose upsampling ends at the padded
        input size stops before its last upsample (the loss op does that one exactly)."""
        if low_res and isinstance(head, FusedSETRUpHead) and head.up_convs[-1].scale > 1:
            total = 1
            for up in head.up_convs:
                total *= up.scale
            if total == self.config.patch_size:
                return head(x, upsample=False)
        return head(x)

    def op_backends(self, device: str | torch.device | None = None) -> dict[str, str]:
        """Which implementation each fused op runs with on ``device`` (default: the model's)."""
        from ..dispatch import resolve_ops

        ops = ("sr_attention", "mlp_gelu", "conv_bn_relu_up")
        if self.backend == "torch":
            return dict.fromkeys(ops, "reference")
        w = self.decode_head.conv_seg.weight
        asked = {"sr_attention": self.backend, "mlp_gelu": "auto", "conv_bn_relu_up": "auto"}  # the last two: no backend
        return resolve_ops(asked, w.new_empty(0, device=device if device is not None else w.device))

    def extra_repr(self) -> str:
        return (f"encoder={self.config.name}, decoder={self.config.decoder!r}, num_classes={self.config.num_classes}, "
                f"backend={self.backend!r}, memory={self.memory!r}, aux={self.aux}")


def _traced() -> bool:
    """Under torch.compile or torch.export (strict or not)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _to_input(logits: torch.Tensor, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Logits -> the padded input size (bilinear, align_corners=False) -> cropped to the input size."""
    if tuple(logits.shape[-2:]) != padded:
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
    if padded != size:
        logits = logits[..., : size[0], : size[1]]
    return logits


def _check_setr_labels(images: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    want = (images.shape[0],) + tuple(images.shape[-2:])
    if tuple(labels.shape) != want:
        raise ValueError(f"labels must be (B, H, W) = {want} for images {tuple(images.shape)}, got {tuple(labels.shape)}")
    if labels.device != images.device:
        raise ValueError(f"labels are on {labels.device}, the images on {images.device}")


def _fused_loss(outputs: tuple[torch.Tensor, ...], labels: torch.Tensor, ignore_index: int, backend: str,
                aux_weight: float = 0.4) -> torch.Tensor:
    """setr_loss from low-resolution logits: each upsampled to the labels' size inside the CE op."""
    from ..ops.upsample_cross_entropy import upsample_cross_entropy

    # the op reads fp16/bf16 logits as they are and sums the loss in fp32
    return _main_plus_aux([upsample_cross_entropy(o, labels, ignore_index, backend=backend) for o in outputs],
                          aux_weight)


def _main_plus_aux(losses: list[torch.Tensor], aux_weight: float) -> torch.Tensor:
    """losses[0] + aux_weight * each of the rest: SETR's combination of its heads' losses."""
    loss = losses[0]
    for a in losses[1:]:
        loss = loss + aux_weight * a
    return loss


def setr(decoder: str = "pup", num_classes: int = 150, img_size: int = 512, backend: str | None = "auto",
         aux: bool = True, *, variant: str | SETRConfig = "vit-l16", memory: str = "save", **overrides) -> SETR:
    """Build a SETR with random weights.

    Args:
        decoder: "naive", "pup" or "mla".
        num_classes: classifier outputs (150 for ADE20K, 19 for Cityscapes).
        img_size: the square training size the position embedding is made for (other sizes are
            interpolated); a multiple of the patch size.
        backend: "auto" (or SEGFORMER_FAST_BACKEND), "torch" (pure reference), "triton", "cuda", "cpp".
        aux: build the auxiliary heads (their logits come back in training).
        variant: the encoder, "vit-l16" (default: 1024 dim, 24 blocks, 16 heads) or "vit-b16".
        memory: what training keeps for backward: "save" (default), "recompute" or "checkpoint"
            (see ``segformer_fast.configs.MemoryMode``); the fused layers only, the reference backend
            keeps what eager does (with "checkpoint" it still checkpoints the encoder blocks).
        **overrides: any SETRConfig field, e.g. ``embed_dim=768, depth=12, num_heads=12``.
    Returns:
        A :class:`SETR` (train mode, as nn.Modules start).

    Example:
        >>> model = setr("mla", num_classes=19, variant="vit-b16")
    """
    backend = default_backend() if backend in (None, "auto") else backend
    cfg = get_setr_config(variant, decoder=decoder, num_classes=num_classes, img_size=img_size, **overrides)
    return SETR(cfg, backend=backend, memory=memory, aux=aux)


def setr_loss(outputs: SETROutput | torch.Tensor, labels: torch.Tensor, aux_weight: float = 0.4,
              ignore_index: int = 255) -> torch.Tensor:
    """SETR's training loss: CE(main) + aux_weight * sum of CE(aux) (SETR and mmseg use 0.4).

    Args:
        outputs: what a SETR returns in training (:class:`SETROutput`), or plain (B, K, h, w) logits.
        labels: (B, H, W) integer class ids; logits of another size are upsampled bilinearly first.
        aux_weight: weight of each auxiliary loss. ignore_index: label value that is skipped.
    Returns:
        The scalar loss.

    Example:
        >>> loss = setr_loss(model.train()(images), labels); loss.backward()
    """
    if isinstance(outputs, torch.Tensor):
        main, aux = outputs, ()
    else:
        main, aux = outputs[0], tuple(outputs[1])
    return _main_plus_aux([segformer_loss_reference(o, labels, ignore_index) for o in (main, *aux)], aux_weight)
