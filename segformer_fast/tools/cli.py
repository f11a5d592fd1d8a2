"""The ``segformer-fast`` command: the parsers of ``info``, ``benchmark``, ``memory`` and ``export`` here,
``train``, ``predict`` and ``evaluate`` in train/cli.

Building the parser imports no torch (``segformer-fast --help`` answers at once); each command imports
what it needs when it runs."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from .runtime import HelpFormatter, add_runtime_args, apply_runtime_args, resolve_device

__all__ = ["main"]

def _version() -> str:
    """The installed distribution's version; the package's own when it runs from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("segformer_fast")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def _cmd_info(args) -> int:
    import torch

    from .. import __version__
    from ..backends import available_backends, default_backend

    apply_runtime_args(args, warn=False)
    device = resolve_device(args.device)

    print(f"segformer_fast {__version__}")
    print(f"python         {platform.python_version()} ({sys.platform})")
    print(f"torch          {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    if device.type == "cuda":
        print(f"device         {torch.cuda.get_device_name(device)} ({device})")
    else:
        print(f"device         cpu ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)")
    print(f"default        backend={default_backend()!r} (SEGFORMER_FAST_BACKEND)")
    print("backends:")
    for name, st in available_backends().items():
        mark = "yes" if st.available else "no "
        print(f"  {name:<7}{mark}  {st.reason}")
    return 0


def _cmd_benchmark(args) -> int:
    import torch

    from ..utils.amp import amp_name
    from .benchmark import build_providers, format_table, have_transformers, run_benchmark

    apply_runtime_args(args)
    device = str(resolve_device(args.device))
    hw = (args.size, args.width or args.size)
    providers = build_providers(
        args.model, num_classes=args.num_classes, backend=args.backend, compile=args.compile, device=device
    )
    amp = None if args.amp == "none" else args.amp
    mode = "train step (forward + loss + backward)" if args.train else "inference (forward, no grad)"
    if args.train and amp == "fp16":
        mode = "train step (forward + loss + GradScaler-scaled backward)"
    label = args.model.upper() if args.model.startswith("setr-") else f"SegFormer-{args.model.upper()}"
    print(f"{label} {hw[0]}x{hw[1]} batch {args.batch}, {mode}, {amp_name(amp)}, on {device}; "
          f"median of {args.repeat} after {args.warmup} warm-up")
    if not have_transformers():
        print("(transformers not installed: no Hugging Face comparison; pip install transformers)")
    rows = run_benchmark(providers, size=hw, batch=args.batch, train=args.train, warmup=args.warmup,
                         repeat=args.repeat, progress=not args.no_progress, amp=amp)
    print(format_table(rows))
    fast = providers["fast"].module
    ops = ", ".join(f"{k}={v}" for k, v in fast.op_backends().items())
    print(f"fast: backend={fast.backend!r} ({ops})")
    if args.json:
        record = {
            "model": args.model, "size": list(hw), "batch": args.batch, "train": args.train, "device": device,
            "amp": amp, "torch": torch.__version__,
            "rows": [{"provider": r.provider, "mode": r.mode, "amp": r.amp, "times_s": r.times_s,
                      "median_s": r.median_s, "images_per_s": r.images_per_s, "saved_bytes": r.saved_bytes}
                     for r in rows],
        }
        from ..utils.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(record, indent=2))
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ..configs import MODEL_CHOICES
    from ..utils.amp import AMP_CHOICES

    parser = argparse.ArgumentParser(
        prog="segformer-fast",
        description="Fast, memory-lean SegFormer and SETR for PyTorch: check the backends, benchmark, measure "
        "activation memory, train, segment images and evaluate.",
        epilog="`segformer-fast COMMAND --help` shows a command's options and their defaults.",
    )
    parser.add_argument("--version", action="version", version=f"segformer-fast {_version()}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    p = sub.add_parser("info", help="torch version, device and which backends are available (and why not)",
                       formatter_class=HelpFormatter)
    add_runtime_args(p, device_help="the device to describe (default: cuda when present)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "benchmark",
        help="time the fast model against the PyTorch reference and Hugging Face (same weights, one run)",
        description="Time SegFormer (fast backend) against the pure-PyTorch reference and, when transformers "
        "is installed, the Hugging Face model, in one interleaved run with the same weights. --train times a "
        "training step and reports saved-activation memory.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default="b0", choices=MODEL_CHOICES,
                   help="SegFormer variant, or a SETR: setr-{naive,pup,mla} (ViT-L/16), ...-b16 (ViT-B/16)")
    p.add_argument("--size", type=int, default=512, help="image height (and width unless --width)")
    p.add_argument("--width", type=int, default=None, help="image width (default: --size)")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--train", action="store_true", help="time forward+loss+backward and report saved activations")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd fast and HF models")
    p.add_argument("--amp", default="none", choices=AMP_CHOICES,
                   help="run every model under torch.autocast with this dtype (none: fp32); "
                   "fp16 training steps scale the loss with a GradScaler")
    p.add_argument("--backend", default="auto", help="backend of the fast model (auto, torch, triton, cuda, cpp)")
    p.add_argument("--num-classes", type=int, default=150, help="classes (ADE20K has 150)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds")
    add_runtime_args(p)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_benchmark)
    _add_memory(sub)
    from ..train.cli import register as register_train

    register_train(sub)  # train, predict, evaluate, export
    return parser


def _cmd_memory(args) -> int:
    from .memory_report import run_memory_command

    return run_memory_command(args)


def _add_memory(sub) -> None:
    from ..configs import MODEL_CHOICES
    from ..utils.amp import AMP_CHOICES

    p = sub.add_parser(
        "memory",
        help="saved-activation bytes per component and memory mode, and the largest training size for a budget",
        description="Measure what one training forward keeps for backward, per component (patch embed, "
        "attention, Mix-FFN, decoder, loss), for each memory mode next to the reference and Hugging Face, "
        "and estimate the largest square training size that fits --budget from those measurements.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default="b2", choices=MODEL_CHOICES,
                   help="SegFormer variant or a SETR (setr-pup, setr-mla-b16, ...; no Hugging Face twin)")
    p.add_argument("--size", type=int, default=1024, help="square image side")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--budget", default=None, help="memory budget, e.g. 16GiB, for the largest-size estimate")
    p.add_argument("--num-classes", type=int, default=150, help="classes (ADE20K has 150)")
    p.add_argument("--backend", default="auto", help="backend of our model (auto, torch, triton, cuda, cpp)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face model")
    p.add_argument("--amp", default="none", choices=AMP_CHOICES,
                   help="run every model's forward and loss under torch.autocast with this dtype (none: fp32)")
    add_runtime_args(p)
    p.set_defaults(func=_cmd_memory)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a bad input or setting, shown as one ``error:`` line instead of a traceback."""
    from safetensors import SafetensorError

    from ..train.checkpoint import CheckpointError
    from ..train.trainer import NonFiniteLossError

    return (ValueError, TypeError, OSError, SafetensorError, CheckpointError, NonFiniteLossError)


def main(argv: list[str] | None = None) -> int:
    """Run ``segformer-fast``; a bad input ends with ``segformer-fast <cmd>: error: <message>`` and exit
    status 2 (1 for a diverged training run) instead of a traceback; ``--debug`` (or
    SEGFORMER_FAST_TRACEBACK=1) shows the traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `segformer-fast`: say what there is
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except _user_errors() as exc:
        if getattr(args, "debug", False) or os.environ.get("SEGFORMER_FAST_TRACEBACK", "0") == "1":
            raise
        from ..train.trainer import NonFiniteLossError

        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in message:
            message = f"{message}: {exc.filename}"
        print(f"segformer-fast {args.command}: error: {message}", file=sys.stderr)
        return 1 if isinstance(exc, NonFiniteLossError) else 2


if __name__ == "__main__":
    sys.exit(main())
