"""What every ``segformer-fast`` subcommand shares: the help formatter, and ``--device``/``--threads`` with
the thread count and oversubscription check behind them. Imports nothing heavy, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["HelpFormatter", "add_runtime_args", "apply_runtime_args", "default_threads", "physical_cores",
           "resolve_device"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that adds ``(default: X)`` only where X says something: not for
    ``None`` (the help text says what happens instead), not for a flag's ``False``, and never twice."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "(default" in text:
            return text
        return super()._get_help_string(action)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on: ``os.sched_getaffinity`` (a container's or
    taskset's limit), counted once per (socket, core) pair from /proc/cpuinfo so hyperthread siblings do
    not double the count. Falls back to the allowed CPUs where /proc/cpuinfo has no core ids."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        allowed = set(range(os.cpu_count() or 1))
    cores = set()
    try:
        with open("/proc/cpuinfo") as f:
            blocks = f.read().split("\n\n")
    except OSError:
        blocks = []
    for block in blocks:
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if "processor" in fields and "core id" in fields and fields["processor"].isdigit() \
                and int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return max(1, min(len(allowed), len(cores)) if cores else len(allowed))


def add_runtime_args(parser: argparse.ArgumentParser, device_help: str = "cpu, cuda or cuda:N (default: cuda when "
                     "present)") -> None:
    """Add what every subcommand takes: ``--device``, ``--threads`` and ``--debug``. The command calls
    ``apply_runtime_args`` (and :func:`resolve_device`) before any work; ``main`` reads ``--debug``."""
    parser.add_argument("--device", default=None, help=device_help)
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch CPU threads (default: the {physical_cores()} physical cores this process may "
                        "use, less those the load average says other processes keep busy; or OMP_NUM_THREADS)")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of the one-line message "
                        "(also SEGFORMER_FAST_TRACEBACK=1)")


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return None


def default_threads(load: float | None = None) -> int:
    """torch's CPU threads when neither ``--threads`` nor OMP_NUM_THREADS says: the physical cores this
    process may use, less the cores the load average says other processes already keep busy (at least
    one). OpenMP's threads wait for each other at every parallel region, so a thread on a core another
    process holds stalls all of them: on a 2-core machine at load 11, B0 training ran 5x faster on one
    thread than on two (5.7 vs 1.1 images/s)."""
    cores = physical_cores()
    if load is None:
        load = _load_average()
    if load is None:
        return cores
    return max(1, min(cores, (os.cpu_count() or cores) - int(load)))


def apply_runtime_args(args: argparse.Namespace, warn: bool = True) -> None:
    """Set torch's CPU threads from ``--threads`` (default: :func:`default_threads`) and, with ``warn``,
    say in one stderr line when the machine's load average is above its core count: other processes
    then compete for the cores and timings suffer. Commands call it before any work."""
    import torch

    load = _load_average()
    threads = args.threads
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):  # torchrun sets it per process: keep it
        threads = default_threads(load)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    cpus = os.cpu_count() or 1
    if warn and load is not None and load > cpus:
        print(f"segformer-fast {getattr(args, 'command', '')}: warning: load average {load:.1f} is above the "
              f"{cpus} CPU cores: other processes compete for them, so this run is slower and its timings noisier "
              f"({torch.get_num_threads()} torch threads)", file=sys.stderr)


def resolve_device(device: str | None):
    """The ``torch.device`` of ``--device``: cuda when present for None, else what was named, refused with a
    ValueError that says why when it cannot run here (a malformed name, cuda without a CUDA device, an
    index past the device count)."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {device}: no CUDA device is available (torch {torch.__version__}, {build})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: segformer-fast runs on cpu or cuda, not {dev.type}")
    return dev
