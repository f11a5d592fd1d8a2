"""The training loop behind ``segformer-fast train``: one process, or one per device under torchrun.

Data order and augmentation are stateless: the sample at global position p (step s, micro-batch a,
rank r, slot j; p = ((s * accum + a) * world + r) * batch + j) is item perm_e[p mod N] of epoch
e = p // N, with perm_e and the augmentation drawn from generators seeded by (seed, e) and
(seed, p). Each rank therefore reads a disjoint shard of every global batch (DistributedSampler's
contract), the stream does not depend on the number of data workers, and resuming at step s needs
only s. Everything else that evolves (weights, optimizer, schedule, GradScaler, every rank's RNG
state for dropout and drop-path) is in the checkpoint, so k steps + resume + m steps gives the same
weights as k + m steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .build import (build_model, classifier_names, is_setr, load_into, memory_modes, model_record,
                    save_model)
from .checkpoint import (JSON_NAME, MANIFEST_NAME, capture_rng, flatten_optimizer, read_checkpoint, restore_rng,
                         run_checkpoint_files, unflatten_optimizer, write_checkpoint)
from .log import CURVES_NAME, LOG_NAME, TENSORBOARD_DIR, StepLog, tensorboard_writer_class, write_curves
from .config import RESUMABLE, TrainConfig
from .metrics import metrics_from_confusion

__all__ = ["TrainConfig", "train", "build_datasets", "PolyWithWarmup", "param_groups", "NonFiniteLossError",
           "TrainingInterrupted", "check_config", "RUN_FILES"]

# besides checkpoint-*.safetensors (and tensorboard/, whose old events a new run purges instead)
RUN_FILES = (JSON_NAME, MANIFEST_NAME, "metrics.json", "model.safetensors", LOG_NAME, CURVES_NAME)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run diverged and was stopped."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the run. ``step``: the last step trained; ``checkpoint``: the step of the
    checkpoint in ``out`` that ``train(resume=out)`` continues from (None when there is none)."""

    def __init__(self, step: int, checkpoint: int | None, out: str):
        self.step, self.checkpoint, self.out = step, checkpoint, out
        if checkpoint == step:
            text = f"interrupted at step {step}: checkpoint saved to {out}"
        elif checkpoint is not None:
            text = f"interrupted at step {step}: the checkpoint of step {checkpoint} in {out} is kept"
        else:
            text = f"interrupted at step {step}: no checkpoint was written"
        super().__init__(text)


class PolyWithWarmup:
    """LR factor at step t: linear warmup from ``warmup_ratio`` to 1 over ``warmup`` steps, then
    (1 - t / total) ** power (mmsegmentation's poly schedule, min lr 0).

    A closed form of t, driven by ``LambdaLR``, rather than torch's ``SequentialLR(LinearLR,
    PolynomialLR)``, which cannot give the same rates: (1) here the poly factor spans the whole run
    and multiplies the warmup (mmseg's warmup scales the regular rate), whereas SequentialLR starts
    the poly decay at the end of the warmup, so every rate after it would differ; (2) a resumed run
    may extend ``--steps``: setting ``total`` makes the rate at step t that of a run planned for the
    new total, while PolynomialLR's chainable form multiplies the previous rate by a ratio of
    consecutive factors, so it would continue from the old curve and, once the old run reached its
    end (rate 0), stay at 0 for every added step.
    """

    def __init__(self, total: int, warmup: int, power: float = 1.0, warmup_ratio: float = 1e-6):
        self.total, self.warmup, self.power, self.warmup_ratio = total, warmup, power, warmup_ratio

    def __call__(self, t: int) -> float:
        poly = max(0.0, 1.0 - t / max(self.total, 1)) ** self.power
        if t < self.warmup:
            k = self.warmup_ratio + (1.0 - self.warmup_ratio) * t / self.warmup
            return poly * k
        return poly


def param_groups(model: nn.Module, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
    """AdamW groups: the heads (everything outside ``encoder.``: SegFormer's decoder, SETR's neck, decode
    and auxiliary heads) at ``lr * head_lr_mult``; norms and biases (1-d tensors) without decay."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((not name.startswith("encoder."), p.ndim <= 1), []).append(p)
    return [{"params": ps, "lr": lr * (head_lr_mult if head else 1.0), "weight_decay": 0.0 if flat else weight_decay}
            for (head, flat), ps in sorted(groups.items())]


def build_datasets(cfg: TrainConfig):
    """(train dataset, val dataset, num_classes, scale) for ``cfg.data``."""
    from .datasets import SegmentationFolder
    from .synthetic import SyntheticSegmentation

    if cfg.data == "synthetic":
        size = (cfg.synthetic_size, cfg.synthetic_size)
        train = SyntheticSegmentation("train", cfg.synthetic_train, size, seed=cfg.seed)
        val = SyntheticSegmentation("val", cfg.synthetic_val, size, seed=cfg.seed)
        if cfg.num_classes not in (None, train.num_classes):
            raise ValueError(f"the synthetic dataset has {train.num_classes} classes, not {cfg.num_classes}")
        return train, val, train.num_classes, cfg.scale
    train = SegmentationFolder(cfg.data, "train", cfg.layout, cfg.num_classes)
    val = SegmentationFolder(cfg.data, "val", cfg.layout, cfg.num_classes)
    return train, val, train.num_classes, cfg.scale if cfg.scale is not None else train.scale


class _Augmented(torch.utils.data.Dataset):
    """Items keyed by (index, global position): the position seeds the augmentation."""

    def __init__(self, base, transform, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, position = key
        image, mask = self.base[index]
        return self.transform(image, mask, np.random.default_rng([self.seed, 2, position]))


class StepBatches:
    """Batch sampler: the keys of this rank's micro-batches for steps [start, total), in order."""

    def __init__(self, n: int, batch: int, accum: int, rank: int, world: int, seed: int, start: int, total: int):
        self.n, self.batch, self.accum, self.rank, self.world = n, batch, accum, rank, world
        self.seed, self.start, self.total = seed, start, total
        self._perm: tuple[int, np.ndarray] | None = None

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 1, epoch]).permutation(self.n))
        return int(self._perm[1][position % self.n])

    def __len__(self):
        return (self.total - self.start) * self.accum

    def __iter__(self):
        for step in range(self.start, self.total):
            for a in range(self.accum):
                base = ((step * self.accum + a) * self.world + self.rank) * self.batch
                yield [(self._index(base + j), base + j) for j in range(self.batch)]


def _memory_bytes(device: torch.device) -> int:
    """CUDA: the most bytes allocated so far; CPU: the process's resident set (its peak where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _ignore_sigint(worker_id: int) -> None:
    # data workers share the terminal's process group: Ctrl-C is the main process's to handle
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Interrupts:
    """SIGINT during training: the first one asks the loop to stop after the step in progress (whose
    checkpoint it then writes); while validating, or on a second SIGINT, KeyboardInterrupt is raised at
    once. Installed only over Python's default handler, in the main thread."""

    def __init__(self):
        self.requested, self.immediate, self.while_validating, self._previous = False, False, False, None

    def _handle(self, signum, frame):
        first, self.requested = not self.requested, True
        if first and self.immediate:
            self.while_validating = True
            raise KeyboardInterrupt
        if not first:
            self.while_validating = False
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def agreed(self, world: int, device: torch.device) -> bool:
        """Whether any rank was interrupted (every rank must stop at the same step)."""
        if world == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


def _setup_distributed(device: str | torch.device | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun (WORLD_SIZE > 1).

    ``device``: None is cuda when present, else cpu; "cuda" without an index is this process's GPU
    (torchrun's LOCAL_RANK, else 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def _load_init_weights(model, path: str, log) -> None:
    from ..io.weights import CheckpointMismatchError

    classifiers = tuple(f"{name}." for name in classifier_names(model))
    try:
        report = load_into(model, path)
    except CheckpointMismatchError as exc:
        # a head trained for another number of classes: take everything else, keep the classifier fresh
        if exc.missing or exc.unexpected or not all(s.startswith(classifiers) for s in exc.shape_conflicts):
            raise
        report = load_into(model, path, strict=False)
        log(f"weights: classifier of {path} has another number of classes; it starts fresh")
    log(f"weights: {report.loaded} tensors from {path} (layout {report.layout})")


def _amp_dtype(amp: str):
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def check_config(cfg: TrainConfig) -> None:
    """ValueError naming the first field of ``cfg`` (and its command-line flag) that cannot work."""
    def flag(name):
        return f"{name} (--{name.replace('_', '-')})"

    for name in ("crop", "batch", "steps", "accum", "val_every", "val_batch", "log_every", "synthetic_train",
                 "synthetic_val", "synthetic_size"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag(name)} must be a positive integer, got {value!r}")
    for name in ("save_every", "warmup", "num_classes"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (name != "warmup")):
            raise ValueError(f"{flag(name)} must be a {'non-negative' if name == 'warmup' else 'positive'} "
                             f"integer, got {value!r}")
    if isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 0:
        raise ValueError(f"{flag('workers')} must be 0 or more, got {cfg.workers!r}")
    for name, low in (("lr", 0.0), ("head_lr_mult", 0.0), ("weight_decay", None), ("power", None),
                      ("drop_path", None), ("cat_max_ratio", 0.0)):
        value = getattr(cfg, name)
        if value is None:
            continue
        if not math.isfinite(value) or (low is not None and value <= low) or (low is None and value < 0):
            raise ValueError(f"{flag(name)} must be a finite {'positive' if low is not None else 'non-negative'} "
                             f"number, got {value!r}")
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp (--amp) must be none, bf16 or fp16, got {cfg.amp!r}")


def _existing_run_files(out: str) -> list[str]:
    """The files of a previous run in ``out`` a new run would replace or prune."""
    if not os.path.isdir(out):
        return []
    names = set(os.listdir(out))
    found = [n for n in RUN_FILES if n in names]
    found += sorted(n for n in names if n.startswith("checkpoint-") and n.endswith(".safetensors"))
    return found


def _replaced_files(out: str, continuing: bool, overwrite: bool) -> list[str]:
    """The previous run's files in ``out`` to remove before training; FileExistsError without ``overwrite``.

    ``continuing``: ``out`` is the folder being resumed, whose files are this run's own. Only that
    run's files are listed: its checkpoints as its manifest names them, never another file.
    """
    existing = [] if continuing else _existing_run_files(out)
    if not existing:
        return []
    if not overwrite:
        shown = ", ".join(existing[:8]) + (f" and {len(existing) - 8} more" if len(existing) > 8 else "")
        raise FileExistsError(f"{out!r} already holds a run ({shown}); pass --overwrite (overwrite=True) to replace "
                              f"it, --resume {out} to continue it, or another --out")
    ours = run_checkpoint_files(out) + [n for n in RUN_FILES if n != MANIFEST_NAME] + [MANIFEST_NAME]
    return [os.path.join(out, name) for name in ours]


def train(cfg: TrainConfig | None = None, resume: str | None = None, stop_at: int | None = None,
          overwrite: bool = False, device: str | torch.device | None = None) -> dict:
    """Train a SegFormer or SETR as ``cfg`` says; returns {"step", "history", "metrics", "out", "model", "config"}.

    Args:
        cfg: the run configuration. With ``resume`` the saved configuration is used, except for the
            fields in ``RESUMABLE`` (steps, val_every, save_every, out, workers, progress, log_every),
            taken from ``cfg``; ``cfg=None`` continues with the saved run's settings unchanged.
        resume: a folder holding a checkpoint to continue from.
        stop_at: stop (and checkpoint) after this step, as if interrupted; the schedule still
            spans ``cfg.steps``.
        overwrite: replace a previous run's files in ``cfg.out`` (checkpoints it wrote, metrics.json,
            model.safetensors); without it such files make this a FileExistsError. Other files in
            ``cfg.out`` are never touched.
        device: where to train: None is cuda when present (under torchrun, cuda:LOCAL_RANK), else cpu.
    Raises:
        NonFiniteLossError: the loss became NaN or infinite (the run stops at the first such step and
            writes no checkpoint from then on; the last one before stays).
        ValueError: a setting that cannot work, or a resumed run with no step left to train.
    """
    from tqdm import tqdm

    from .inference import evaluate_dataset
    from .transforms import TrainTransform

    rank, world, device = _setup_distributed(device)
    main = rank == 0

    def log(msg):
        if main:
            tqdm.write(msg)

    start, saved = 0, None
    if resume is not None:
        saved_tensors, saved = read_checkpoint(resume)
        old = TrainConfig.from_json(saved["config"])
        if cfg is None:
            cfg = dataclasses.replace(old, out=resume)
        else:
            cfg = dataclasses.replace(old, **{k: getattr(cfg, k) for k in RESUMABLE})
        start = saved["step"]
    elif cfg is None:
        raise TypeError("train() needs a TrainConfig, or resume=DIR to continue a saved run")
    check_config(cfg)
    writer_class = tensorboard_writer_class() if cfg.tensorboard else None  # before anything is trained
    modes = memory_modes(cfg.model)
    if cfg.memory not in modes:
        raise ValueError(f"memory must be one of {modes} for {cfg.model}, got {cfg.memory!r}")
    if start >= cfg.steps:
        raise ValueError(f"the run in {resume!r} has already trained {start} of its {cfg.steps} steps: nothing left "
                         f"to train (pass --steps N with N > {start} to train further)")
    if stop_at is not None and not start < stop_at:
        raise ValueError(f"stop_at (--stop-at) must be after the starting step {start}, got {stop_at}")
    continuing = resume is not None and os.path.realpath(resume) == os.path.realpath(cfg.out)
    replaced = _replaced_files(cfg.out, continuing, overwrite)
    train_set, val_set, num_classes, scale = build_datasets(cfg)
    cfg = dataclasses.replace(cfg, num_classes=num_classes)
    if saved is None:
        torch.manual_seed(cfg.seed + rank)  # dropout and drop-path differ per rank, as with any DDP run

    setr_model = is_setr(cfg.model)
    overrides = {"drop_path_rate": cfg.resolved_drop_path(), **(cfg.model_overrides or {})}
    model = build_model(cfg.model, num_classes, cfg.backend, cfg.memory, overrides, img_size=cfg.crop,
                        id2label=getattr(train_set, "class_names", None))  # the dataset's names: config.id2label
    # mmsegmentation's decode-head init: classifier N(0, 0.01), so training starts from near-uniform
    # class probabilities instead of the He-initialised classifier's large logits.
    for name in classifier_names(model):
        classifier = model.get_submodule(name)
        nn.init.normal_(classifier.weight, 0.0, 0.01)
        nn.init.zeros_(classifier.bias)
    if setr_model and not model.config.uses_cls_token:
        # SETR-MLA's encoder never reads its cls token (kept for checkpoints): frozen, DDP waits for no gradient
        model.encoder.cls_token.requires_grad_(False)
    if cfg.weights and saved is None:
        _load_init_weights(model, cfg.weights, log)
    if world > 1 and model.backend == "torch":
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            warnings.warn("nn.SyncBatchNorm needs a GPU; the reference decoder's BatchNorm uses per-rank statistics "
                          "on CPU (the fused decoders and heads of other backends sync on CPU too)", stacklevel=2)
    model.to(device).train()
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model

    lr = cfg.resolved_lr()
    optimizer = torch.optim.AdamW(param_groups(model, lr, cfg.head_lr_mult, cfg.weight_decay), lr=lr,
                                  weight_decay=cfg.weight_decay)
    warmup = cfg.warmup if cfg.warmup is not None else max(1, min(1500, cfg.steps // 20))
    schedule = PolyWithWarmup(cfg.steps, warmup, cfg.power)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp_dtype = _amp_dtype(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    history: list[dict] = []
    loss_avg = float("nan")  # running average of the logged losses; checkpointed, so a resume continues it
    if saved is not None:
        model.load_state_dict({k[len("model."):]: v for k, v in saved_tensors.items() if k.startswith("model.")})
        optimizer.load_state_dict(unflatten_optimizer(saved_tensors, saved["optimizer"]))
        scheduler.load_state_dict(saved["scheduler"])
        for fn in scheduler.lr_lambdas:  # a resumed run may extend --steps: decay towards the new end
            fn.total = cfg.steps
        for group, fn, base in zip(optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs):
            group["lr"] = base * fn(scheduler.last_epoch)  # from the first resumed step on (LambdaLR's formula)
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        history = saved.get("history", [])
        if saved.get("loss_avg") is not None:
            loss_avg = float(saved["loss_avg"])

    transform = TrainTransform(crop=(cfg.crop, cfg.crop), scale=scale, cat_max_ratio=cfg.cat_max_ratio,
                               ignore_index=255)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    sampler = StepBatches(len(train_set), cfg.batch, cfg.accum, rank, world, cfg.seed, start, end)
    loader = torch.utils.data.DataLoader(
        _Augmented(train_set, transform, cfg.seed), batch_sampler=sampler, num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the loader off the global RNG
        pin_memory=device.type == "cuda", worker_init_fn=_ignore_sigint if cfg.workers else None,
    )
    batches = iter(loader)
    if saved is not None:
        restore_rng(saved["rng"][rank] if rank < len(saved["rng"]) else saved["rng"][0])

    last_saved = start if saved is not None else None

    def checkpoint(step):
        nonlocal last_saved
        rng = capture_rng()
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        if main:
            opt_tensors, opt_rest = flatten_optimizer(optimizer.state_dict())
            tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            tensors.update(opt_tensors)
            write_checkpoint(cfg.out, step, tensors, {
                "config": cfg.to_json(), "optimizer": opt_rest, "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": states,
                "world_size": world, "history": history, "model": model_record(model), "loss_avg": loss_avg,
            })
        last_saved = step
        if world > 1:
            dist.barrier()

    def validate(step, elapsed, loss):
        model.eval()
        indices = range(rank, len(val_set), world)
        interrupts.immediate = world == 1  # its step is complete: Ctrl-C need not wait for the validation
        try:
            conf = evaluate_dataset(model, val_set, scale=scale, device=device, indices=indices,
                                    batch=cfg.val_batch)
        finally:
            interrupts.immediate = False
        model.train()
        if world > 1:
            conf = conf.to(device)
            dist.all_reduce(conf)
        m = metrics_from_confusion(conf.cpu(), model.config.class_names)
        history.append({"step": step, "time_s": round(elapsed, 2), "loss": loss, "miou": m["miou"],
                        "pixel_accuracy": m["pixel_accuracy"], "per_class_iou": m["per_class_iou"],
                        "per_class_iou_by_name": m["per_class_iou_by_name"]})
        if main:
            from ..utils.atomic import atomic_write_json

            atomic_write_json(os.path.join(cfg.out, "metrics.json"), {"config": cfg.to_json(), "history": history})
            write_curves(os.path.join(cfg.out, CURVES_NAME), steplog.records, history)
            if writer is not None:
                writer.add_scalar("val/miou", m["miou"], step)
                writer.add_scalar("val/pixel_accuracy", m["pixel_accuracy"], step)
                writer.flush()
            per_class = " ".join(f"{v:.2f}" if not math.isnan(v) else "-" for v in m["per_class_iou"][:20])
            log(f"step {step}: val mIoU {m['miou']:.4f}  pixel acc {m['pixel_accuracy']:.4f}  "
                f"({elapsed:.0f}s)  per-class IoU {per_class}{' ...' if num_classes > 20 else ''}")
        return m

    steplog, writer = None, None
    if main:  # --overwrite: the previous run goes once this one is set up (a bad setting above keeps it)
        for path in replaced:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        steplog = StepLog(cfg.out, start, source=resume)
        if writer_class is not None:  # events of steps from `start` on, left by an earlier run here, are hidden
            writer = writer_class(os.path.join(cfg.out, TENSORBOARD_DIR), purge_step=start)
    label = cfg.model.upper() if setr_model else f"SegFormer-{cfg.model.upper()}"
    log(f"training {label} on {cfg.data} ({len(train_set)} train / {len(val_set)} val, "
        f"{num_classes} classes), crop {cfg.crop}, batch {cfg.batch}x{cfg.accum}x{world}, lr {lr:g}, "
        f"{cfg.steps} steps, device {device}, backend {model.backend}, memory {cfg.memory}, amp {cfg.amp}")
    elapsed0 = history[-1]["time_s"] if history else 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, disable=not (main and cfg.progress), desc="train",
               dynamic_ncols=True)
    images_seen, t_rate, metrics = 0, time.perf_counter(), None
    save_every = cfg.save_every or cfg.val_every
    # the first step whose (unscaled) loss is not finite, tracked on the device and read only where
    # the loop syncs anyway (logging, validation, checkpoints), so a healthy run pays no extra sync
    never = torch.iinfo(torch.int64).max
    first_bad = torch.full((), never, dtype=torch.int64, device=device)
    bad_loss = torch.zeros((), device=device)

    def stop_if_diverged():
        bad = first_bad.clone()
        if world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        bad_step = int(bad)
        if bad_step == never:
            return
        value = f"{float(bad_loss)}" if int(first_bad) == bad_step else "not finite (on another rank)"
        kept = (f"the checkpoint of step {last_saved} in {cfg.out} is kept" if last_saved is not None
                else "no checkpoint was written")
        raise NonFiniteLossError(f"training diverged: the loss is {value} at step {bad_step}; stopped there and "
                                 f"{kept}. Lower --lr (now {lr:g}) or use --amp bf16")

    interrupts = _Interrupts()

    def interrupted(trained: int, consistent: bool) -> TrainingInterrupted:
        # consistent: `trained` steps are complete and nothing of the next one has run, so it can be checkpointed
        if consistent:
            try:
                stop_if_diverged()
                if last_saved != trained:
                    checkpoint(trained)
            except KeyboardInterrupt:  # a second Ctrl-C while saving: the last checkpoint written stays
                pass
        return TrainingInterrupted(trained, last_saved, cfg.out)

    trained = start
    try:
        with interrupts:
            for step in range(start, end):
                loss_sum = torch.zeros((), device=device)
                for a in range(cfg.accum):
                    images, labels = next(batches)
                    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    sync = a == cfg.accum - 1 or world == 1
                    ctx = net.no_sync() if not sync else contextlib.nullcontext()
                    with ctx:
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            if setr_model:  # main + 0.4 x auxiliary CE, fused with the upsampling
                                loss = net(images, labels=labels).loss / cfg.accum
                            else:
                                logits = net(images)
                                loss = model.loss(logits.float(), labels) / cfg.accum
                        scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                done = step + 1
                # the unscaled loss: GradScaler's overflowing (scaled) fp16 gradients are skipped steps, not divergence
                newly = ~torch.isfinite(loss_sum) & (first_bad == never)
                first_bad = torch.where(newly, torch.full_like(first_bad, done), first_bad)
                bad_loss = torch.where(newly, loss_sum.float(), bad_loss)
                step_lrs = [g["lr"] for g in optimizer.param_groups]  # this step's; scheduler.step() sets the next
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                trained = done
                images_seen += cfg.batch * cfg.accum * world
                logged = done % cfg.log_every == 0 or done == cfg.steps  # the same steps whether interrupted or not
                validating = done % cfg.val_every == 0 or done == cfg.steps
                saving = done % save_every == 0 or done == end
                if logged or validating or saving:
                    stop_if_diverged()
                if logged or done == end:
                    if world > 1:
                        dist.all_reduce(loss_sum)
                        loss_sum /= world
                    now = time.perf_counter()
                    rate, memory = images_seen / (now - t_rate), _memory_bytes(device)
                    if logged:
                        loss_value = float(loss_sum)
                        loss_avg = loss_value if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss_value
                        epoch = done * cfg.batch * cfg.accum * world / len(train_set)
                        record = {"step": done, "epoch": round(epoch, 4), "loss": loss_value, "loss_avg": loss_avg,
                                  "lr": lr * schedule(step), "lr_groups": step_lrs, "images_per_s": round(rate, 3),
                                  "memory": memory, "time": round(elapsed0 + now - t0, 3)}
                        if steplog is not None:
                            steplog.write(record)
                        if writer is not None:
                            for key in ("loss", "loss_avg", "lr", "images_per_s", "epoch"):
                                writer.add_scalar(f"train/{key}", record[key], done)
                            writer.add_scalar("train/memory_gib", memory / 2**30, done)
                    bar.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{rate:.1f}", mem=f"{memory / 2**30:.2f}GiB",
                                    refresh=False)
                    images_seen, t_rate = 0, now
                bar.update(1)
                if validating:
                    metrics = validate(done, elapsed0 + time.perf_counter() - t0, loss_avg)
                if saving:
                    checkpoint(done)
                if validating or saving:  # the throughput counts training time only
                    images_seen, t_rate = 0, time.perf_counter()
                if done < end and interrupts.agreed(world, device):
                    raise interrupted(done, consistent=True)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:  # while validating (its step is complete), or a second Ctrl-C (anywhere)
        raise interrupted(trained, consistent=interrupts.while_validating) from None
    finally:
        bar.close()
        if steplog is not None:
            steplog.close()
        if writer is not None:
            writer.close()
    if main and end == cfg.steps:
        save_model(model, os.path.join(cfg.out, "model.safetensors"))
        log(f"wrote {os.path.join(cfg.out, 'model.safetensors')}")
    if world > 1:
        dist.barrier()
    return {"step": end, "history": history, "metrics": metrics, "out": cfg.out, "model": model, "config": cfg}
