"""``segformer-fast train``, ``predict`` and ``evaluate``: registered by :func:`register`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

from ..configs import MEMORY_MODES, MODEL_CHOICES
from ..tools.runtime import HelpFormatter, add_runtime_args, apply_runtime_args, resolve_device

__all__ = ["register"]

UNSET = argparse.SUPPRESS  # train's options: absent from the namespace unless given, so --resume can tell


def _ints(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LONG,SHORT, got {text!r}")
    return parts[0], parts[1]


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be finite positive numbers, got {text!r}")
    return values


def _override(text: str) -> tuple[str, object]:
    field, sep, value = text.partition("=")
    if not sep or not field.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return field.strip(), json.loads(value)
    except json.JSONDecodeError:
        return field.strip(), value  # a bare string, e.g. name=tiny


def _overrides(args) -> dict | None:
    return dict(args.model_overrides) if args.model_overrides else None


def _add_override_option(p, default=None) -> None:
    p.add_argument("--model-override", dest="model_overrides", action="append", type=_override, default=default,
                   metavar="FIELD=VALUE",
                   help="change a field of the model's config (SegFormerConfig, or SETRConfig for setr-*); VALUE is "
                        "JSON, e.g. --model-override depth=12 --model-override mla_layers=[2,5,8,11]; repeatable")


def _train_config(args):
    """The TrainConfig of the command line: the flags given (train's options default to unset), and with
    --resume the saved run's settings for every flag not given."""
    from .checkpoint import read_checkpoint_meta
    from .config import RESUMABLE, TrainConfig

    given = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k) and k != "out"}
    if "model_overrides" in given:
        given["model_overrides"] = _overrides(args)
    if not args.resume:
        return TrainConfig(**given, out=args.out or TrainConfig.out)
    saved = TrainConfig.from_json(read_checkpoint_meta(args.resume)["config"])
    fixed = sorted(k for k, v in given.items() if k not in RESUMABLE and v != getattr(saved, k))
    if fixed:
        flags = ", ".join("--model-override" if k == "model_overrides" else "--" + k.replace("_", "-") for k in fixed)
        raise ValueError(f"--resume continues the saved run with its own settings; {flags} cannot change "
                         "(--steps, --val-every, --save-every, --out, --workers, --log-every, --tensorboard and "
                         "--no-progress can). "
                         "Start a new run with --weights to change them")
    resumable = {k: v for k, v in given.items() if k in RESUMABLE}
    return dataclasses.replace(saved, **resumable, out=args.out or args.resume)  # keeps writing where it was


def _cmd_train(args) -> int:
    import sys

    from .log import tensorboard_writer_class
    from .trainer import TrainingInterrupted, train

    apply_runtime_args(args)  # a loaded machine: fewer threads (tools.runtime.default_threads), and a warning
    device = resolve_device(args.device)
    cfg = _train_config(args)
    if cfg.tensorboard:
        try:
            tensorboard_writer_class()
        except ImportError as exc:
            print(f"segformer-fast train: error: {exc}", file=sys.stderr)
            return 2
    try:
        result = train(cfg, resume=args.resume, stop_at=args.stop_at, overwrite=args.overwrite, device=device)
    except TrainingInterrupted as exc:  # Ctrl-C: one line, no traceback, the shell's status for SIGINT
        if int(os.environ.get("RANK", "0")) == 0:
            again = f"; continue with: segformer-fast train --resume {exc.out}" if exc.checkpoint is not None else ""
            print(f"{exc}{again}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before the first step: no checkpoint was written", file=sys.stderr)
        return 130
    m = result["metrics"]
    if m is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"final: mIoU {m['miou']:.4f}, pixel accuracy {m['pixel_accuracy']:.4f} (step {result['step']}); "
              f"outputs in {result['out']}")
    return 0


def _model_options(p) -> None:
    """The model to load: --weights, and --model/--num-classes/--model-override/--backend when they hold no config."""
    p.add_argument("--weights", required=True,
                   help="a train output folder, a .safetensors from save_weights or train, a Hugging Face folder or "
                        "hub id, or (with --model) any weights file load_weights (SETR: load_setr_weights) reads")
    p.add_argument("--model", default=None, choices=MODEL_CHOICES, metavar="MODEL",
                   help="model to build when --weights holds no config: b0..b5, or setr-{naive,pup,mla} (ViT-L/16) "
                        "and setr-{naive,pup,mla}-b16 (ViT-B/16) (needs --num-classes)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (with --model)")
    _add_override_option(p)
    p.add_argument("--backend", default=None, help="auto, torch, triton, cuda or cpp (default auto)")


def _inference_options(p) -> None:
    _model_options(p)
    p.add_argument("--window", type=int, default=None, help="sliding-window size in pixels (default: whole image)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window step (default: 3/4 of --window)")
    p.add_argument("--scales", type=_floats, default=(1.0,), help="comma-separated scales, e.g. 0.5,0.75,1.0,1.25")
    p.add_argument("--flip", action="store_true", help="also average over horizontal flips")
    add_runtime_args(p)


def _model_for(args):
    from .inference import default_stride, load_model

    apply_runtime_args(args)
    device = resolve_device(args.device)
    stride = getattr(args, "stride", None) or default_stride(getattr(args, "window", None))  # export has neither
    model = load_model(args.weights, args.model, args.num_classes, args.backend, device, _overrides(args))
    return model, device, stride


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def _background(text: str):
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a class id, 'auto' or 'none', got {text!r}")
    return value


def _cmd_predict(args) -> int:
    from .datasets import IMAGE_EXTENSIONS
    from .inference import predict_files

    paths = []
    for item in args.images:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, n) for n in os.listdir(item)
                            if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {', '.join(args.images)}")
    model, _, stride = _model_for(args)
    written = predict_files(model, paths, args.out, args.scales, args.flip, args.window, stride, size=args.size,
                            scale=args.scale, alpha=args.alpha, paint_background=not args.no_background_paint,
                            background=args.background_class, progress=not args.no_progress,
                            overwrite=args.overwrite)
    print(f"wrote {len(written)} files for {len(paths)} images to {args.out}")
    return 0


def _cmd_export(args) -> int:
    from ..tools.export import export_onnx, verify_onnx

    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    model, _, _ = _model_for(args)
    size = (args.size, args.width or args.size)
    export_onnx(model, args.out, dynamic_hw=not args.static, example_size=size, batch=args.batch,
                dynamic_batch=not args.static)
    shape = "fixed " + "x".join(map(str, size)) if args.static else "dynamic batch, height and width"
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB; input 'images' (B, 3, H, W), "
          f"output 'logits'; {shape})")
    if args.verify:
        err = verify_onnx(model, args.out, size)
        print(f"onnxruntime vs PyTorch on a random {size[0]}x{size[1]} image: max |difference| of logits {err:.2e}")
    return 0


def _cmd_evaluate(args) -> int:
    from ..classes import model_class_names
    from .datasets import SegmentationFolder
    from .inference import evaluate
    from .synthetic import SyntheticSegmentation

    model, device, stride = _model_for(args)
    k = model.config.num_classes
    if args.data == "synthetic":
        dataset = SyntheticSegmentation("val", args.synthetic_val, (args.synthetic_size,) * 2, seed=args.seed)
        scale = args.scale
    else:
        dataset = SegmentationFolder(args.data, args.split, args.layout, k)
        scale = args.scale if args.scale is not None else dataset.scale
    if dataset.num_classes != k:
        raise ValueError(f"the dataset has {dataset.num_classes} classes but the model {args.weights!r} predicts {k}")
    names = model_class_names(model, dataset)  # the model's id2label, else the dataset's names, else "class k"
    m = evaluate(model, dataset, class_names=names, scale=scale, scales=args.scales, flip=args.flip,
                 window=args.window, stride=stride, device=device, progress=not args.no_progress,
                 batch=1 if args.window else 8)
    print(m.format())
    if args.json:
        from ..utils.atomic import atomic_write_json

        # strict JSON: NaN (a class absent from the data) is null; per-class IoU as a list and by name
        atomic_write_json(args.json, dict(m))
        print(f"wrote {args.json}")
    return 0


def register(subparsers) -> None:
    """Add the train, predict and evaluate subcommands to ``segformer-fast``."""
    from .config import TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="train SegFormer or SETR (default: built-in synthetic data, no download)",
        description="Train SegFormer or SETR on the built-in synthetic dataset or a dataset folder (ADE20K, "
        "Cityscapes or images/ + masks/ layouts). Runs on one device, or one process per device under "
        "`torchrun --nproc_per_node N` (DistributedDataParallel, SyncBatchNorm). Checkpoints go to --out; "
        "--resume DIR continues exactly.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default=UNSET, choices=MODEL_CHOICES, metavar="MODEL",
                   help=f"b0..b5 (SegFormer, default {d.model}), or setr-{{naive,pup,mla}} (ViT-L/16) and "
                        "setr-{naive,pup,mla}-b16 (ViT-B/16); a SETR's position embedding is made for --crop")
    _add_override_option(p, default=UNSET)
    p.add_argument("--data", default=UNSET, help="'synthetic' (default) or a dataset folder")
    p.add_argument("--layout", default=UNSET, choices=("auto", "ade", "cityscapes", "generic"),
                   help="dataset folder layout (default: detected)")
    p.add_argument("--num-classes", type=int, default=UNSET, help="classes (default: the layout's; needed for generic)")
    p.add_argument("--crop", type=int, default=UNSET, help=f"square training crop (default {d.crop})")
    p.add_argument("--scale", type=_ints, default=UNSET,
                   help="base LONG,SHORT scale the 0.5-2.0 resize ratio multiplies (default: ADE 2048,512, "
                        "Cityscapes 2048,1024, otherwise the image's own size); also the validation scale")
    p.add_argument("--batch", type=int, default=UNSET, help=f"images per device per micro-batch (default {d.batch})")
    p.add_argument("--accum", type=int, default=UNSET, help="gradient accumulation micro-batches per step (default 1)")
    p.add_argument("--steps", type=int, default=UNSET, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--lr", type=float, default=UNSET,
                   help="AdamW learning rate, decoder x10 (default 6e-5 with --weights or a dataset folder, "
                        "2e-3 for synthetic data from scratch)")
    p.add_argument("--weight-decay", type=float, default=UNSET, help="AdamW weight decay (default 0.01)")
    p.add_argument("--warmup", type=int, default=UNSET, help="linear warmup steps (default steps/20, at most 1500)")
    p.add_argument("--amp", default=UNSET, choices=("none", "bf16", "fp16"), help="autocast dtype (fp16 uses GradScaler)")
    p.add_argument("--memory", default=UNSET, choices=MEMORY_MODES,
                   help="activation memory mode (default save): save, recompute or checkpoint, for SegFormer and SETR")
    p.add_argument("--backend", default=UNSET, help="auto, torch, triton, cuda or cpp (default auto)")
    p.add_argument("--weights", default=UNSET, help="initial weights, any layout load_weights reads (backbone-only OK)")
    p.add_argument("--drop-path", type=float, default=UNSET,
                   help="stochastic depth rate (default 0.1 for SegFormer, 0 for SETR as in mmseg's configs)")
    p.add_argument("--val-every", type=int, default=UNSET, help=f"validate every N steps (default {d.val_every})")
    p.add_argument("--save-every", type=int, default=UNSET, help="checkpoint every N steps (default: --val-every)")
    p.add_argument("--out", default=None,
                   help=f"output folder for checkpoints, metrics.json, log.jsonl and curves.png (default {d.out}, "
                        "or the --resume folder)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run checkpointed in DIR")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after STEP (checkpointing) while keeping the schedule of --steps; resume later")
    p.add_argument("--synthetic-size", type=int, default=UNSET,
                   help=f"synthetic image side (default {d.synthetic_size})")
    p.add_argument("--synthetic-train", type=int, default=UNSET,
                   help=f"synthetic training images (default {d.synthetic_train})")
    p.add_argument("--synthetic-val", type=int, default=UNSET,
                   help=f"synthetic validation images (default {d.synthetic_val})")
    p.add_argument("--seed", type=int, default=UNSET, help="seed of data order, augmentation and init")
    p.add_argument("--workers", type=int, default=UNSET, help=f"data loader processes (default {d.workers})")
    p.add_argument("--log-every", type=int, default=UNSET,
                   help=f"write loss, lr, images/s and memory to OUT/log.jsonl every N steps (default {d.log_every})")
    p.add_argument("--tensorboard", action="store_true", default=UNSET,
                   help="also write the logged scalars to OUT/tensorboard (needs the tensorboard package)")
    add_runtime_args(p, device_help="cpu, cuda or cuda:N (default: cuda when present; under torchrun, "
                     "cuda:LOCAL_RANK, one process per GPU)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=UNSET, help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's checkpoints, metrics.json and model.safetensors in --out "
                        "(without it, train refuses such a folder; other files there are never touched)")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser(
        "predict", help="segment images: label, colour, overlay and legend PNGs",
        description="Segment images. Per image: <stem>_label.png (palette PNG: pixel values are the class ids, "
        "viewers show the colours), <stem>_color.png, <stem>_overlay.png (colours over the photo) and "
        "<stem>_legend.png (colour and name of each class present; names from the model's id2label).",
        formatter_class=HelpFormatter)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing <stem>_label/_color/_overlay/_legend.png files in --out (default: refuse)")
    _inference_options(p)
    resize = p.add_mutually_exclusive_group()
    resize.add_argument("--size", type=_positive, default=None, metavar="SHORT",
                        help="resize each image so its shorter side is SHORT before inference (aspect kept); "
                             "labels come back at the image's size (default: the image's own size)")
    resize.add_argument("--scale", type=_ints, default=None, metavar="LONG,SHORT",
                        help="resize each image to fit LONG,SHORT, aspect kept, as evaluate --scale does "
                             "(e.g. 2048,512 for ADE20K, 2048,1024 for Cityscapes)")
    p.add_argument("--alpha", type=_fraction, default=0.5, help="overlay colour weight, 0 (photo) to 1 (colours)")
    p.add_argument("--no-background-paint", action="store_true",
                   help="leave the background class unpainted in the overlay (the photo shows through)")
    p.add_argument("--background-class", type=_background, default="auto", metavar="ID",
                   help="class drawn in neutral grey: a class id, 'none', or 'auto' (a class named background; "
                        "else 0 when the model has no class names, none when it has)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

    p = subparsers.add_parser("evaluate", help="mIoU, per-class IoU and pixel accuracy on a dataset folder",
                              formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="a dataset folder, or 'synthetic'")
    p.add_argument("--layout", default="auto", choices=("auto", "ade", "cityscapes", "generic"),
                   help="dataset folder layout (auto: detected)")
    p.add_argument("--split", default="val", choices=("train", "val"), help="which split of the folder to evaluate")
    p.add_argument("--scale", type=_ints, default=None, help="LONG,SHORT test scale (default: the layout's)")
    p.add_argument("--synthetic-val", type=int, default=d.synthetic_val, help="synthetic validation images")
    p.add_argument("--synthetic-size", type=int, default=d.synthetic_size, help="synthetic image side")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the synthetic data")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _inference_options(p)
    p.set_defaults(func=_cmd_evaluate)

    p = subparsers.add_parser("export", help="write the model as an ONNX graph (dynamic batch and image size)",
                              description="Export a SegFormer or SETR to ONNX (opset of torch's dynamo exporter), "
                              "with a dynamic batch and image size unless --static; needs onnx and onnxscript "
                              "(pip install onnx onnxscript; --verify also onnxruntime).",
                              formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    _model_options(p)
    p.add_argument("--size", type=int, default=512, help="height of the tracing image (and width unless --width); "
                   "a SETR takes multiples of its patch size")
    p.add_argument("--width", type=int, default=None, help="width of the tracing image (default: --size)")
    p.add_argument("--batch", type=int, default=2, help="batch of the tracing input (2: a batch of 1 is specialised)")
    p.add_argument("--static", action="store_true", help="fix the batch and image size to the tracing input's")
    p.add_argument("--verify", action="store_true",
                   help="run the graph in onnxruntime on a random image and print its largest difference from PyTorch")
    add_runtime_args(p)
    p.set_defaults(func=_cmd_export)
