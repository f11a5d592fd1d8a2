"""fp16 safety run: train a SegFormer under ``torch.autocast(fp16)`` + ``GradScaler`` and watch our fused
layers for inf/NaN, beside the pure-PyTorch reference model on identical weights and data.

The question (from the issue): does a model trained for a few hundred steps under fp16 autocast with
GradScaler on the synthetic data ever see inf/NaN in activations or gradients from our layers?

Both models (``backend`` "auto" unless --backend says otherwise, and ``backend="torch"``) start from
the same weights (the reference loads the fused model's state dict) and see the same batches (the
trainer's stateless sampler and augmentation). Training is the trainer's: AdamW with its parameter
groups, the poly schedule with warmup, the N(0, 0.01) classifier init, ``torch.autocast(device,
float16)`` around the forward and the loss, ``GradScaler(device)``. Dropout and drop-path masks are
drawn from the same seed, but the two models consume the RNG differently, so those masks differ.

Per step it records the loss, the scale the backward ran with, and whether the scaler skipped the
step. On every fused layer (modules whose class name starts with "Fused"; in the reference model, the
modules of the same name, which the fused ones replace):

- a forward hook checks every output tensor for non-finite values (and keeps the largest |value|,
  the headroom to fp16's 65504);
- identity probes on the layer's inputs and outputs see the gradient flowing out of and into it in
  backward; after backward (before the scaler unscales) every parameter's gradient is checked and
  attributed to the fused layer that owns it, or to "elsewhere".

A step's non-finite gradients *originate* in a fused layer when the gradient reaching its output is
finite but the one it sends to its inputs, or its parameters' gradients, are not; otherwise they come
from elsewhere (the loss scale overflowing in modules we did not replace, usually).

Exit status 1 when (a) a fused layer ever outputs a non-finite value, (b) the fused model's loss is
ever non-finite on a step the scaler did not skip, (c) the fused model skips more steps than the
reference + slack (see ``skip_slack``), or (d) non-finite gradients originate inside fused layers on
more steps than inside their counterparts in the reference + slack (on any step, without a
reference). The first steps normally skip: GradScaler starts at 65536 and halves the scale after
each overflow until the scaled gradients fit in fp16. That is expected and is not a failure; it is
reported as "initial back-off".

    python benchmarks/fp16_safety.py                     # B2, defaults sized for a 2-core CPU
    python benchmarks/fp16_safety.py --size 512 --batch 8 --steps 300 --out /tmp/fp16.json  # on a GPU
    python benchmarks/fp16_safety.py --out benchmarks/results/fp16_safety_cpu-x86_64-2cores.json \\
        --markdown benchmarks/results/fp16_safety_cpu-x86_64-2cores.md
    python benchmarks/fp16_safety.py --render result.json --markdown summary.md   # re-render a saved run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from collections import defaultdict

import torch
from torch import nn

FP16_MAX = 65504.0
MODELS = ("fused", "reference")
MAX_EVENTS = 50  # events kept per list in the JSON (counts are always complete)

# CPU defaults: fp16 on a CPU takes slow paths (torch's fp16 conv backward: the reference decoder's
# 1x1 fuse conv alone took 45 s per backward at 16x16 features, batch 2). Measured on the 2-core
# x86-64 machine (shared, load ~5): B2 at 32x32 (the model's smallest input), batch 2, ~14 s/step
# fused and ~20 s/step reference, so 300 steps of both would take ~3 h; 30 steps fit in ~15 min.
# On CUDA the defaults are the few hundred steps.
CPU_DEFAULTS = {"size": 32, "batch": 2, "steps": 30}
GPU_DEFAULTS = {"size": 256, "batch": 8, "steps": 300}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="b2", help="SegFormer variant (b0..b5), default b2")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {GPU_DEFAULTS['steps']} on CUDA, {CPU_DEFAULTS['steps']} on CPU)")
    p.add_argument("--size", type=int, default=None,
                   help=f"square crop and synthetic image side (>= 32; default {GPU_DEFAULTS['size']} on CUDA, "
                        f"{CPU_DEFAULTS['size']} on CPU)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch size (default {GPU_DEFAULTS['batch']} on CUDA, {CPU_DEFAULTS['batch']} on CPU)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: the trainer's, 1e-3 on synthetic data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--backend", default="auto", help="backend of the fused model (default auto)")
    p.add_argument("--models", default="fused,reference",
                   help="which models to run, comma-separated (default both; the skip comparison needs both)")
    p.add_argument("--init-scale", type=float, default=65536.0, help="GradScaler's initial scale (its default)")
    p.add_argument("--out", default=None, help="JSON result path (written atomically)")
    p.add_argument("--markdown", default=None, help="also write a markdown summary here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="train nothing: recompute the verdict and summary of a saved result (with --out / --markdown)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if not args.models or set(args.models) - set(MODELS):
        p.error(f"--models takes a comma-separated subset of {MODELS}, got {args.models}")
    if args.size < 32 or args.batch < 1 or args.steps < 1:
        p.error("--size must be >= 32, --batch and --steps positive")
    return args


def skip_slack(steps: int) -> int:
    """How many more skipped steps than the reference the fused model may have.

    On identical weights and data the two models' gradients differ only by fp16 rounding (the fused
    ops accumulate in fp32 and round once, the reference rounds per op), so the largest scaled
    gradient of a step can land on either side of fp16's overflow threshold when it is close to it.
    That moves the initial back-off by one halving, and can flip an isolated later step either way.
    2 covers the back-off; one more per 100 steps covers isolated borderline steps. A layer that
    really overflows skips on most steps and is far outside this.
    """
    return 2 + steps // 100


def fused_layer_names(model: nn.Module) -> dict[str, str]:
    """{qualified name: class name} of every module whose class name starts with "Fused"."""
    return {name: type(m).__name__ for name, m in model.named_modules() if type(m).__name__.startswith("Fused")}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _tensors(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from _tensors(item)


def _nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0


class _Probe(torch.autograd.Function):
    """Identity whose backward reports the gradient passing through it (a tensor hook that sees only
    the one use it wraps, unlike a hook on a tensor that several modules read)."""

    @staticmethod
    def forward(ctx, x, report):
        ctx.report = report
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad is not None:
            ctx.report(grad)
        return grad, None


def _probe(x, report):
    """``x`` (a tensor or a list/tuple of them) with each grad-requiring tensor wrapped by a probe."""
    if isinstance(x, torch.Tensor):
        return _Probe.apply(x, report) if x.requires_grad and x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_probe(item, report) for item in x)
    return x


class NonFiniteMonitor:
    """Watches the named layers of a model for non-finite forward outputs and gradients.

    Args:
        model: the model.
        layers: qualified module names to watch (the fused layers, or their reference counterparts).
    Use: ``monitor.begin(step)`` before the forward, ``monitor.after_backward()`` after the backward
    and before the scaler unscales; ``monitor.summary()`` at the end; ``monitor.remove()`` to detach.
    """

    def __init__(self, model: nn.Module, layers):
        self.model, self.layers = model, list(layers)
        self.step = -1
        self.activation_events: list[dict] = []  # (step, layer, non-finite count)
        self.activation_count = 0  # non-finite outputs, (step, layer) pairs
        self.max_abs: dict[str, float] = defaultdict(float)  # largest finite |output| per layer
        self._grad_in_bad: set[str] = set()  # this step: layers that sent a non-finite gradient to an input
        self._grad_out_bad: set[str] = set()  # this step: layers that received a non-finite output gradient
        self.gradient_events = {"fused_layers": [], "elsewhere": []}  # per step: who has non-finite grads
        self.gradient_counts = {"fused_layers": 0, "elsewhere": 0}  # (step, owner) pairs
        self.origin_counts = {"fused_layers": 0, "elsewhere": 0}  # steps
        self.origin_events: list[dict] = []
        self.nonfinite_grad_steps: list[int] = []
        self._owner = {}  # parameter name -> watched layer owning it, or None
        for pname, _ in model.named_parameters():
            owner = max((l for l in self.layers if pname.startswith(l + ".")), key=len, default=None)
            self._owner[pname] = owner
        self._handles = []
        for name in self.layers:
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._post_hook(name)))

    def _pre_hook(self, name):
        def report(grad):
            if _nonfinite(grad):
                self._grad_in_bad.add(name)

        def hook(module, args):
            if torch.is_grad_enabled():
                return _probe(args, report)
            return None

        return hook

    def _post_hook(self, name):
        def report(grad):
            if _nonfinite(grad):
                self._grad_out_bad.add(name)

        def hook(module, args, output):
            bad = 0
            for t in _tensors(output):
                if t.is_floating_point() and t.numel():
                    n = _nonfinite(t)
                    bad += n
                    finite = t.detach().abs().nan_to_num(0.0, 0.0, 0.0) if n else t.detach().abs()
                    self.max_abs[name] = max(self.max_abs[name], float(finite.max()))
            if bad:
                self.activation_count += 1
                if len(self.activation_events) < MAX_EVENTS:
                    self.activation_events.append({"step": self.step, "layer": name, "class": type(module).__name__,
                                                   "nonfinite": bad})
            if torch.is_grad_enabled():
                return _probe(output, report)
            return None

        return hook

    def begin(self, step: int) -> None:
        self.step = step
        self._grad_in_bad.clear()
        self._grad_out_bad.clear()

    def after_backward(self) -> bool:
        """Check every parameter's (still scaled) gradient; returns whether any is non-finite."""
        bad_params: dict[str | None, list[str]] = defaultdict(list)
        for pname, p in self.model.named_parameters():
            if p.grad is not None and _nonfinite(p.grad):
                bad_params[self._owner[pname]].append(pname)
        if not bad_params and not self._grad_in_bad and not self._grad_out_bad:
            return False
        self.nonfinite_grad_steps.append(self.step)
        fused = {l: ps for l, ps in bad_params.items() if l is not None}
        if fused:
            self.gradient_counts["fused_layers"] += len(fused)
            if len(self.gradient_events["fused_layers"]) < MAX_EVENTS:
                self.gradient_events["fused_layers"].append(
                    {"step": self.step, "layers": sorted(fused), "parameters": sum(len(v) for v in fused.values())})
        if None in bad_params:
            self.gradient_counts["elsewhere"] += 1
            if len(self.gradient_events["elsewhere"]) < MAX_EVENTS:
                self.gradient_events["elsewhere"].append(
                    {"step": self.step, "parameters": len(bad_params[None]), "first": bad_params[None][:5]})
        origins = sorted(l for l in self.layers if l not in self._grad_out_bad and (l in self._grad_in_bad or l in fused))
        key = "fused_layers" if origins else "elsewhere"
        self.origin_counts[key] += 1
        if len(self.origin_events) < MAX_EVENTS:
            self.origin_events.append({"step": self.step, "origin": origins or "elsewhere"})
        return bool(bad_params)

    def summary(self) -> dict:
        headroom = sorted(((v, k) for k, v in self.max_abs.items()), reverse=True)[:5]
        return {
            "nonfinite_activations": {"count": self.activation_count, "events": self.activation_events},
            "nonfinite_gradients": {
                "steps": len(self.nonfinite_grad_steps),
                "step_indices": self.nonfinite_grad_steps[:MAX_EVENTS],
                "parameter_events": {"in_fused_layers": self.gradient_counts["fused_layers"],
                                     "elsewhere": self.gradient_counts["elsewhere"]},
                "origin_steps": {"in_fused_layers": self.origin_counts["fused_layers"],
                                 "elsewhere": self.origin_counts["elsewhere"]},
                "events_in_fused_layers": self.gradient_events["fused_layers"],
                "events_elsewhere": self.gradient_events["elsewhere"],
                "origins": self.origin_events,
            },
            "largest_abs_output": [{"layer": k, "max_abs": v, "fraction_of_fp16_max": v / FP16_MAX} for v, k in headroom],
        }

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _batches(args, num_steps: int):
    """The trainer's batches for steps [0, num_steps): its dataset, sampler and augmentation."""
    from segformer_fast.train.trainer import StepBatches, TrainConfig, _Augmented, build_datasets
    from segformer_fast.train.transforms import TrainTransform

    cfg = TrainConfig(data="synthetic", crop=args.size, synthetic_size=args.size, batch=args.batch, seed=args.seed)
    train_set, _, num_classes, scale = build_datasets(cfg)
    transform = TrainTransform(crop=(args.size, args.size), scale=scale, cat_max_ratio=cfg.cat_max_ratio, ignore_index=255)
    sampler = StepBatches(len(train_set), args.batch, 1, 0, 1, args.seed, 0, num_steps)
    loader = torch.utils.data.DataLoader(_Augmented(train_set, transform, args.seed), batch_sampler=sampler,
                                         num_workers=0)
    return list(loader), num_classes, cfg


def _build(args, num_classes: int, cfg):
    """(fused model, reference model) with identical weights, initialised as the trainer does."""
    from segformer_fast.configs import get_config
    from segformer_fast.models.segformer import SegFormer
    from segformer_fast.train.build import classifier_names

    mcfg = get_config(args.model).replace(num_classes=num_classes, drop_path_rate=cfg.resolved_drop_path())
    torch.manual_seed(args.seed)
    fused = SegFormer(mcfg, backend=args.backend)
    for name in classifier_names(fused):  # the trainer's decode-head init
        nn.init.normal_(fused.get_submodule(name).weight, 0.0, 0.01)
        nn.init.zeros_(fused.get_submodule(name).bias)
    reference = SegFormer(mcfg, backend="torch")
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def _train_one(label, model, layers, batches, args, cfg, device, progress) -> dict:
    from segformer_fast.train.trainer import PolyWithWarmup, param_groups

    model.to(device).train()
    lr = args.lr if args.lr is not None else cfg.resolved_lr()
    optimizer = torch.optim.AdamW(param_groups(model, lr, cfg.head_lr_mult, cfg.weight_decay), lr=lr,
                                  weight_decay=cfg.weight_decay)
    warmup = max(1, min(1500, args.steps // 20))  # the trainer's default warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, PolyWithWarmup(args.steps, warmup, cfg.power))
    scaler = torch.amp.GradScaler(device.type, init_scale=args.init_scale)
    monitor = NonFiniteMonitor(model, layers)
    torch.manual_seed(args.seed)  # dropout / drop-path draws start from the same state for both models
    per_step, mismatches, loss_bad = [], [], []
    bar = progress(total=args.steps, desc=label)
    t0 = time.perf_counter()
    try:
        for step, (images, labels) in enumerate(batches):
            images, labels = images.to(device), labels.to(device)
            monitor.begin(step)
            with torch.autocast(device.type, dtype=torch.float16):
                logits = model(images)
                loss = model.loss(logits.float(), labels)
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            grads_bad = monitor.after_backward()
            scaler.step(optimizer)
            scaler.update()
            # update() halves the scale exactly when it found an inf/NaN gradient (it grows only
            # every growth_interval=2000 clean steps), so a lower scale means a skipped step
            skipped = scaler.get_scale() < scale
            if skipped != grads_bad:
                mismatches.append(step)
            value = float(loss.detach())
            if not math.isfinite(value) and not skipped:
                loss_bad.append(step)
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # a skipped first step makes LambdaLR warn about the call order
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
                scheduler.step()
            per_step.append({"step": step, "loss": value if math.isfinite(value) else str(value), "scale": scale,
                             "skipped": skipped})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", scale=f"{scaler.get_scale():g}", refresh=False)
    finally:
        bar.close()
        monitor.remove()
    wall = time.perf_counter() - t0
    skipped = [r["step"] for r in per_step if r["skipped"]]
    backoff = next((i for i, r in enumerate(per_step) if not r["skipped"]), len(per_step))
    losses = [r["loss"] for r in per_step if not r["skipped"] and isinstance(r["loss"], float)]
    k = min(10, max(1, len(losses) // 5))
    return {
        "backend": model.backend,
        "steps_run": len(per_step),
        "skipped_steps": len(skipped),
        "skipped_step_indices": skipped,
        "initial_backoff_skips": backoff,
        "later_skips": len(skipped) - backoff,
        "initial_scale": args.init_scale,
        "final_scale": scaler.get_scale(),
        "loss_start": losses[0] if losses else None,
        "loss_end": losses[-1] if losses else None,
        "loss_start_mean10": sum(losses[:k]) / k if losses else None,
        "loss_end_mean10": sum(losses[-k:]) / k if losses else None,
        "nonfinite_loss_unskipped_steps": loss_bad,
        "detector_scaler_mismatch_steps": mismatches,
        **monitor.summary(),
        "wall_time_s": round(wall, 2),
        "step_time_s": round(wall / max(1, len(per_step)), 3),
        "per_step": per_step,
    }


def _environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "machine": platform.machine(), "cpu_count": os.cpu_count(), "device": str(device),
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _op_backends(model, batches, device) -> dict:
    """Which implementation each fused op runs with under fp16 autocast, on the first batch."""
    from segformer_fast.dispatch import Explanation, record

    model.to(device).eval()
    with record() as log, torch.no_grad(), torch.autocast(device.type, dtype=torch.float16):
        model(batches[0][0][:1].to(device))
    return Explanation(log).chosen()


def verdict(result: dict) -> dict:
    """{"passed", "failures", "notes"} for a result of :func:`run`."""
    failures, notes = [], []
    models = result["models"]
    fused = models.get("fused")
    reference = models.get("reference")
    slack = result["config"]["skip_slack"]
    notes.append("GradScaler starts at scale 65536 and halves it after every step whose scaled gradients overflow "
                 "fp16; the skipped steps of that initial back-off are expected and are not a failure.")
    if fused is not None:
        n = fused["nonfinite_activations"]["count"]
        if n:
            first = fused["nonfinite_activations"]["events"][0]
            failures.append(f"a fused layer produced non-finite outputs {n} time(s); first: {first['layer']} "
                            f"({first['class']}) at step {first['step']}, {first['nonfinite']} values")
        if fused["nonfinite_loss_unskipped_steps"]:
            failures.append(f"the fused model's loss was non-finite on unskipped steps "
                            f"{fused['nonfinite_loss_unskipped_steps'][:10]}")
        if reference is not None and fused["skipped_steps"] > reference["skipped_steps"] + slack:
            failures.append(f"the fused model skipped {fused['skipped_steps']} steps, the reference "
                            f"{reference['skipped_steps']} (+ slack {slack})")
        if reference is None:
            notes.append("no reference run: the skipped-step comparison was not made")
        origin = fused["nonfinite_gradients"]["origin_steps"]["in_fused_layers"]
        allowed = reference["nonfinite_gradients"]["origin_steps"]["in_fused_layers"] + slack if reference else 0
        if origin > allowed:
            first = next(e for e in fused["nonfinite_gradients"]["origins"] if e["origin"] != "elsewhere")
            failures.append(f"non-finite gradients originated inside fused layers on {origin} step(s), more than "
                            f"{allowed} ({'the reference + slack' if reference else 'no reference to compare'}); "
                            f"first: step {first['step']}, {first['origin']}")
        elif origin:
            notes.append(f"non-finite gradients originated inside fused layers on {origin} step(s) (see 'origins'), "
                         f"within the reference's count + slack; the scaler skipped those steps")
    for label, m in models.items():
        if m["detector_scaler_mismatch_steps"]:
            notes.append(f"{label}: the gradient check and the scaler disagreed on steps "
                         f"{m['detector_scaler_mismatch_steps'][:10]}")
    return {"passed": not failures, "failures": failures, "notes": notes}


def run(args: argparse.Namespace, prepare=None) -> dict:
    """Train the models ``args.models`` names and return the result dict (see the module docstring).

    Args:
        args: from :func:`parse_args`.
        prepare: optional ``prepare(label, model)`` called on each model before it trains (tests use it
            to inject faults).
    """
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    def progress(total, desc):
        if tqdm is None or args.no_progress:
            return _NoBar()
        return tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)

    device = torch.device(args.device)
    batches, num_classes, cfg = _batches(args, args.steps)
    fused, reference = _build(args, num_classes, cfg)
    layers = fused_layer_names(fused)
    if not layers:
        raise RuntimeError(f"backend {args.backend!r} built no fused layers; nothing to watch")
    op_backends = _op_backends(fused, batches, device)
    result = {
        "benchmark": "fp16_safety",
        "command": "python benchmarks/fp16_safety.py " + " ".join(args.argv),
        "config": {"model": args.model, "steps": args.steps, "size": args.size, "batch": args.batch,
                   "lr": args.lr if args.lr is not None else cfg.resolved_lr(), "seed": args.seed,
                   "backend": args.backend, "num_classes": num_classes, "amp": "fp16 autocast + GradScaler",
                   "init_scale": args.init_scale, "drop_path_rate": cfg.resolved_drop_path(),
                   "warmup": max(1, min(1500, args.steps // 20)), "skip_slack": skip_slack(args.steps)},
        "environment": _environment(device),
        "op_backends_fp16": op_backends,
        "fused_layers": [{"name": n, "class": c} for n, c in layers.items()],
        "models": {},
    }
    for label, model in (("fused", fused), ("reference", reference)):
        if label not in args.models:
            continue
        if prepare is not None:
            prepare(label, model)
        result["models"][label] = _train_one(label, model, layers, batches, args, cfg, device, progress)
    result["verdict"] = verdict(result)
    return result


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    """A short markdown summary of a :func:`run` result."""
    c, env, models = result["config"], result["environment"], result["models"]
    lines = [f"# fp16 safety: SegFormer-{c['model'].upper()} under fp16 autocast + GradScaler", "",
             f"{c['steps']} steps, {c['size']}x{c['size']}, batch {c['batch']}, lr {c['lr']:g}, seed {c['seed']}, "
             f"device {env['device']}{' (' + env['device_name'] + ')' if 'device_name' in env else ''}, "
             f"torch {env['torch']}, {env['cpu_count']} CPUs.", ""]
    if result.get("command"):
        lines += ["```", result["command"], "```", ""]
    head = "| | " + " | ".join(models) + " |"
    lines += [head, "|---|" + "---|" * len(models)]

    def row(name, fn):
        lines.append(f"| {name} | " + " | ".join(fn(m) for m in models.values()) + " |")

    row("backend", lambda m: m["backend"])
    row("steps run", lambda m: str(m["steps_run"]))
    row("skipped steps (initial back-off + later)",
        lambda m: f"{m['skipped_steps']} ({m['initial_backoff_skips']} + {m['later_skips']})")
    row("final scale", lambda m: f"{m['final_scale']:g}")
    row("non-finite activations in fused layers*", lambda m: str(m["nonfinite_activations"]["count"]))
    row("steps with non-finite gradients", lambda m: str(m["nonfinite_gradients"]["steps"]))
    row("... originating in fused layers* / elsewhere", lambda m: "{in_fused_layers} / {elsewhere}".format(
        **m["nonfinite_gradients"]["origin_steps"]))
    row("... (layer, step) parameter events in fused layers* / steps elsewhere",
        lambda m: "{in_fused_layers} / {elsewhere}".format(**m["nonfinite_gradients"]["parameter_events"]))
    row("largest abs output of a fused layer* (fp16 max 65504)",
        lambda m: f"{m['largest_abs_output'][0]['max_abs']:.1f} ({m['largest_abs_output'][0]['layer']})"
        if m["largest_abs_output"] else "-")
    row("loss start -> end (mean of first / last <= 10 unskipped steps)",
        lambda m: f"{_fmt(m['loss_start_mean10'])} -> {_fmt(m['loss_end_mean10'])}")
    row("wall time", lambda m: f"{m['wall_time_s']:.0f} s ({m['step_time_s']:.2f} s/step)")
    lines += ["", "\\* in the reference model: the modules of the same name, which the fused layers replace "
              f"({len(result['fused_layers'])} layers: "
              + ", ".join(sorted({f['class'] for f in result['fused_layers']})) + ").", "",
              "Fused op implementations under fp16 autocast: "
              + ", ".join(f"{k}: {v}" for k, v in result["op_backends_fp16"].items()) + ".", ""]
    v = result["verdict"]
    lines.append(f"**{'PASS' if v['passed'] else 'FAIL'}**" + ("" if v["passed"] else ": " + "; ".join(v["failures"])))
    lines += [""] + [f"- {n}" for n in v["notes"]] + [f"- skipped-step slack: {c['skip_slack']} (see `skip_slack`)."]
    return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> None:
    from segformer_fast.utils.atomic import atomic_write_text

    atomic_write_text(path, text)


def main(argv=None, prepare=None) -> int:
    """Run, print the summary, write --out / --markdown; returns the exit status (0 pass, 1 fail)."""
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        result["verdict"] = verdict(result)
    else:
        result = run(args, prepare=prepare)
    text = markdown(result)
    print(text)
    if args.out:
        _write(args.out, json.dumps(result, indent=1) + "\n")
    if args.markdown:
        _write(args.markdown, text)
    return 0 if result["verdict"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
