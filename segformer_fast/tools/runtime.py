"""What every ``segformer-fast`` subcommand shares: the help formatter, and ``--device``/``--threads`` with
the thread count and oversubscription check behind them. Imports nothing heavy, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["HelpFormatter", "add_runtime_args", "apply_runtime_args", "physical_cores"]


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


def add_runtime_args(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """Add ``--threads`` and, where the command can run on a GPU, ``--device``; the command calls
    ``apply_runtime_args`` before any work."""
    if device:
        parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch CPU threads (default: {physical_cores()}, the physical cores this process "
                        "may use, or OMP_NUM_THREADS when set)")


def apply_runtime_args(args: argparse.Namespace, warn: bool = True) -> None:
    """Set torch's CPU threads from ``--threads`` and, with ``warn``, say in one stderr line when the
    machine's load average is above its core count: other processes then compete for the cores and
    timings suffer. Commands call it before any work."""
    import torch

    threads = args.threads
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):  # torchrun sets it per process: keep it
        threads = physical_cores()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    if not warn:
        return
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return
    cpus = os.cpu_count() or 1
    if load > cpus:
        print(f"segformer-fast {getattr(args, 'command', '')}: warning: load average {load:.1f} is above the {cpus} CPU cores: "
              "other processes compete for them, so this run is slower and its timings noisier", file=sys.stderr)
