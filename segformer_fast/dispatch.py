"""Which implementation of a fused op runs for a given input, and why the others do not.

Every fused op declares an :class:`OpSpec`: its implementations (:class:`Impl`), each naming its
backend, the compiled functions it needs, the dtypes it takes, the conditions under which it runs
(with the reason it does not), an optional declared fallback, and its forward/backward functions.
One resolver, :meth:`OpSpec.resolve`, picks per call, in this order:

1. an explicit backend ("torch", "triton", "cuda", "cpp"): that implementation, or an error saying
   why it cannot run for this input -- or its declared fallback, which :func:`explain` shows;
2. "auto" with ``SEGFORMER_FAST_BACKEND`` set (read by :func:`segformer_fast.backends.default_backend`
   only): that backend where the op has it and it can run for this input, else as 3;
3. "auto": the op's preference for the input's device type (the fastest measured first), the first
   implementation that can run.

:func:`explain` answers "which kernel runs for this tensor, and why" for an op or a whole model::

    >>> import segformer_fast as sf
    >>> print(sf.explain(sf.segformer("b0"), torch.randn(1, 3, 64, 64)))
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .backends import BACKENDS, ENV_VAR, available_backends, default_backend, runs_on, validate_backend
from .testing.cuda_standin import ENV_VAR as STANDIN_ENV

__all__ = ["Impl", "OpSpec", "Decision", "Explanation", "NoImplementationError", "KERNEL_PREFERENCE", "register",
           "get_spec", "specs", "explain", "resolve_ops", "clear_caches"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# auto's order for an op with kernels in every backend (dwconv3x3_gelu, upsample_sum, upsample_cross_entropy).
# On a GPU: Triton, then the compiled CUDA kernels. Not yet measured on a GPU; chosen because the Triton
# kernels hold the newer algorithms (the loss backward without the window recompute, the upsample_sum backward
# reading the gradient once for all maps, the dwconv backward's gz in the input's dtype, not an fp32 scratch:
# 10 bytes per element in 16 bits against 14), are the ones the roofline models and the
# ahead-of-time report compiles without spills, are executed by every CI run (interpreter), and only a Triton
# conv lets mix_ffn run its fused kernels. On the CPU the C++ kernels (Triton's interpreter is never auto's
# choice).
KERNEL_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


class NoImplementationError(NotImplementedError):
    """An op asked for a backend it has no implementation in (a user error, not an unfinished op)."""


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    Attributes:
        backend: the backend it belongs to ("torch", "triton", "cuda", "cpp").
        forward, backward: the op's forward / backward functions for this backend (an op-specific contract).
        dtypes: the input dtypes it takes.
        needs: functions the backend's compiled extension must have (an extension built before the
            op lacks them).
        conditions: ``cond(x, facts) -> reason or None`` checks on the call (e.g. head dims); the
            reason says why it cannot run.
        fallback: the backend that runs instead when a condition fails (declared, shown by explain);
            None means such a call is an error when this backend is asked for.
        note: what it is, for the explanation.
        name: its name in the spec when it is not the backend's (a second implementation in one
            backend, e.g. the attention core's "aten" next to "torch"); resolve() takes it as a request.
    """

    backend: str
    forward: Optional[Callable] = None
    backward: Optional[Callable] = None
    dtypes: tuple[torch.dtype, ...] = _FLOAT_DTYPES
    needs: tuple[str, ...] = ()
    conditions: tuple[Callable[[torch.Tensor, dict], Optional[str]], ...] = ()
    fallback: Optional[str] = None
    note: str = ""
    name: Optional[str] = None

    @property
    def key(self) -> str:
        """Its name in the spec: ``name``, else its backend."""
        return self.name or self.backend


@dataclass(frozen=True)
class Decision:
    """One implementation's verdict for one call: whether it runs and why (not)."""

    op: str
    backend: str
    runs: bool
    reason: str


@dataclass
class _Resolution:
    impl: Impl
    decisions: tuple[Decision, ...]


class OpSpec:
    """An op's implementations and its auto preference per device type.

    Args:
        name: the op's name ("upsample_sum", ...).
        impls: its implementations, one per backend (or per name, see Impl.name).
        prefer: device type -> backends in auto's order of preference (measured fastest first);
            device types not listed use ``prefer["*"]``, else ("torch",) (the default: a torch-only op).
        prefer_gpu: (compute capability major, minor) -> auto's order on that CUDA GPU, overriding
            ``prefer["cuda"]``; filled from measurements on that GPU only (a GPU not listed: ``prefer``).
    """

    def __init__(self, name: str, impls: Sequence[Impl], prefer: Optional[dict[str, tuple[str, ...]]] = None,
                 prefer_gpu: Optional[dict[tuple[int, int], tuple[str, ...]]] = None):
        self.name = name
        self.impls = {i.key: i for i in impls}
        self.prefer = prefer or {}
        self.prefer_gpu = prefer_gpu if prefer_gpu is not None else {}
        self._cache: dict[tuple, _Resolution] = {}

    def order(self, device_type: str, capability: Optional[tuple[int, int]] = None) -> tuple[str, ...]:
        """Auto's order of preference for tensors of ``device_type`` (on a CUDA GPU of ``capability``)."""
        if device_type == "cuda" and capability in self.prefer_gpu:
            return self.prefer_gpu[capability]
        return self.prefer.get(device_type, self.prefer.get("*", ("torch",)))

    def _capability(self, x: torch.Tensor) -> Optional[tuple[int, int]]:
        # only looked up when this spec has a per-GPU table (a device query per call otherwise saved)
        if not self.prefer_gpu or x.device.type != "cuda":
            return None
        return tuple(torch.cuda.get_device_capability(x.device))

    def __repr__(self) -> str:
        return f"OpSpec({self.name!r}, backends={tuple(self.impls)})"

    # -- one implementation's verdict ------------------------------------------------------

    def why_not(self, impl: Impl, x: torch.Tensor, facts: dict) -> Optional[str]:
        """None when ``impl`` can run for input ``x`` (and ``facts``), else the reason it cannot."""
        return self._gate(impl, x) or self._condition(impl, x, facts)

    def _gate(self, impl: Impl, x: torch.Tensor) -> Optional[str]:
        # What no declared fallback covers: the backend missing, the device, the build, the dtype.
        status = available_backends()[impl.backend]
        if not status.available:
            return status.reason
        dev = x.device.type
        if not runs_on(impl.backend, dev):
            return f"the {impl.backend} backend does not run on {dev} tensors"
        if impl.needs:
            from .backends import cpu_extension, cuda_extension

            ext = cpu_extension() if impl.backend == "cpp" else cuda_extension()
            missing = [f for f in impl.needs if not hasattr(ext, f)]
            if missing:
                return (f"its compiled extension lacks {', '.join(missing)} (built before this op); rebuild with "
                        "`pip install --no-build-isolation -e .`")
        if x.dtype not in impl.dtypes:
            return f"it takes {', '.join(str(d).replace('torch.', '') for d in impl.dtypes)}, not {x.dtype}"
        return None

    @staticmethod
    def _condition(impl: Impl, x: torch.Tensor, facts: dict) -> Optional[str]:
        for cond in impl.conditions:
            reason = cond(x, facts)
            if reason:
                return reason
        return None

    # -- the resolver ----------------------------------------------------------------------

    def resolve(self, backend: str, x: torch.Tensor, *, use_env: bool = True, **facts) -> Impl:
        """The implementation that runs ``backend`` ("auto" or a name) for input ``x``; raises when an
        explicitly named backend cannot run (unless it declares a fallback). ``use_env=False``: "auto"
        ignores SEGFORMER_FAST_BACKEND (for a sub-choice inside an implementation already chosen)."""
        environ = os.environ  # the cache key: everything a resolution depends on, read cheaply (a few us per call)
        capability = self._capability(x)
        key = (backend, use_env and backend == "auto" and environ.get(ENV_VAR), x.device.type, x.dtype,
               tuple(facts.items()), environ.get("TRITON_INTERPRET"), environ.get(STANDIN_ENV), capability)
        res = self._cache.get(key)
        if res is None:
            env = default_backend() if backend == "auto" and use_env else "auto"
            res = self._resolve(backend, env, x, facts, capability)
            self._cache[key] = res
        if _RECORDERS:
            for rec in _RECORDERS:
                rec.append((self.name, backend, res.decisions))
        return res.impl

    def _resolve(self, backend: str, env: str, x: torch.Tensor, facts: dict,
                 capability: Optional[tuple[int, int]] = None) -> _Resolution:
        name = backend if backend in self.impls else validate_backend(backend, check_available=False)
        verdicts = {b: self.why_not(i, x, facts) for b, i in self.impls.items()}

        order = self.order(x.device.type, capability)
        not_chosen = (f"backend={name!r} was asked for" if name != "auto"
                      else f"a preferred backend runs first on {x.device.type} {order}")

        def done(chosen: str, how: str) -> _Resolution:
            decisions = []
            for b in self.impls:
                if b == chosen:
                    decisions.append(Decision(self.name, b, True, how))
                else:
                    decisions.append(Decision(self.name, b, False, verdicts[b] or "not chosen: " + not_chosen))
            for b in BACKENDS:
                if b not in self.impls:
                    decisions.append(Decision(self.name, b, False, f"{self.name} has no {b} implementation"))
            return _Resolution(self.impls[chosen], tuple(decisions))

        if name != "auto":
            return self._explicit(name, x, verdicts, done)
        if env != "auto" and env in self.impls and verdicts[env] is None:
            return done(env, f"SEGFORMER_FAST_BACKEND={env}")
        for b in order:
            if b in self.impls and verdicts[b] is None:
                lead = (f"SEGFORMER_FAST_BACKEND={env} cannot run it ({verdicts.get(env) or 'no such implementation'}); "
                        if env != "auto" else "")
                return done(b, f"{lead}auto: first that can run in the {x.device.type} preference {order}")
        raise RuntimeError(f"{self.name}: no implementation can run for a {x.dtype} tensor on {x.device}: "
                           + "; ".join(f"{b}: {r}" for b, r in verdicts.items() if r))

    def _explicit(self, name, x, verdicts, done):
        impl = self.impls.get(name)
        if impl is None:
            raise NoImplementationError(f"{self.name} has no {name!r} implementation; it has {tuple(self.impls)}")
        if verdicts[name] is None:
            return done(name, f"asked for (backend={name!r})")
        gated_on_dtype = available_backends()[impl.backend].available and runs_on(impl.backend, x.device.type)
        if gated_on_dtype and x.dtype not in impl.dtypes:
            takes = ", ".join(str(d).replace("torch.", "") for d in impl.dtypes)
            others = [b for b, v in verdicts.items() if v is None]
            raise TypeError(f"{self.name}: backend {name!r} does not take {str(x.dtype).replace('torch.', '')}: it takes "
                            f"{takes}" + (f"; use backend {' or '.join(map(repr, others))} (or 'auto')" if others else ""))
        if self._gate(impl, x) is None and impl.fallback is not None and verdicts.get(impl.fallback) is None:
            # the gate passed, so the verdict is the failed condition's reason
            return done(impl.fallback, f"declared fallback of {name}: {verdicts[name]}")
        status = available_backends()[impl.backend]
        if not status.available:
            raise RuntimeError(f"backend {name!r} is not available: {status.reason}")
        raise ValueError(f"{self.name}: backend {name!r} cannot run here: {verdicts[name]}")

    def explain(self, backend: str, x: torch.Tensor, **facts) -> "Explanation":
        """Every implementation's verdict for one call (see :func:`explain`)."""
        with record() as log:
            try:
                self.resolve(backend, x, **facts)
            except (RuntimeError, ValueError, NoImplementationError) as exc:
                return Explanation([(self.name, backend, (Decision(self.name, backend, False, str(exc)),))])
        return Explanation(log)


# ---------------------------------------------------------------------------------------------
# the registry and explain()

_REGISTRY: dict[str, OpSpec] = {}
_RECORDERS: list[list] = []


def register(spec: OpSpec) -> OpSpec:
    """Adds an op's spec to the registry (each op module registers its own at import)."""
    _REGISTRY[spec.name] = spec
    return spec


def clear_caches() -> None:
    """Forgets every memoised resolution (they assume the extensions do not change while running)."""
    for spec in _REGISTRY.values():
        spec._cache.clear()


def get_spec(name: str) -> OpSpec:
    _import_ops()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no fused op named {name!r}; the ops are {sorted(_REGISTRY)}") from None


def specs() -> dict[str, OpSpec]:
    """Every registered op spec, by name."""
    _import_ops()
    return dict(_REGISTRY)


@functools.lru_cache(maxsize=None)
def _import_ops() -> None:
    from . import ops  # noqa: F401  (each op module registers its spec)


def resolve_ops(asked: dict[str, str], like: torch.Tensor) -> dict[str, str]:
    """{op: backend asked} -> {op: the backend that runs it} for inputs like ``like`` (device, dtype)."""
    return {op: get_spec(op).resolve(backend, like).backend for op, backend in asked.items()}


@contextlib.contextmanager
def record() -> Iterator[list]:
    """Collects (op, backend asked, decisions) of every resolution made inside the block."""
    log: list = []
    _RECORDERS.append(log)
    try:
        yield log
    finally:
        _RECORDERS.remove(log)


@dataclass
class Explanation:
    """What :func:`explain` found: per op, the backend asked for and every implementation's verdict."""

    calls: list = field(default_factory=list)  # (op, backend asked, decisions)

    def chosen(self) -> dict[str, str]:
        """op -> the backend that runs it (the last call's, for an op called several times)."""
        return {op: next((d.backend for d in ds if d.runs), "none") for op, _, ds in self.calls}

    def rows(self) -> list[tuple[str, str, str, bool, str]]:
        """(op, asked, backend, runs, reason), one row per op and implementation (distinct calls merged)."""
        seen, rows = set(), []
        for op, asked, ds in self.calls:
            key = (op, asked, ds)
            if key in seen:
                continue
            seen.add(key)
            rows += [(op, asked, d.backend, d.runs, d.reason) for d in ds]
        return rows

    def __str__(self) -> str:
        if not self.calls:
            return "no fused op ran"
        lines = []
        for op, asked, backend, runs, reason in self.rows():
            mark = "runs " if runs else "     "
            lines.append(f"{op:<24} {mark}{backend:<7} {reason}  [asked {asked!r}]" if runs
                         else f"{op:<24} {mark}{backend:<7} {reason}")
        return "\n".join(lines)


def explain(target: Any, *args, backend: str = "auto", **facts) -> Explanation:
    """Which implementation of each fused op runs for this input, and why the others do not.

    Args:
        target: a model or module (it is run on ``args`` under ``torch.no_grad()``, in its current
            mode, and every fused op it calls is reported), an op name ("upsample_sum"), or an
            :class:`OpSpec`.
        args: the model's inputs, or for an op its primary input tensor.
        backend: for an op, the backend asked for ("auto" by default).
        facts: for an op, what its conditions look at (``head_dim=...`` for sr_attention).
    Returns:
        An :class:`Explanation`; ``print`` it for a table, ``.chosen()`` for op -> backend.

    Example:
        >>> print(explain("upsample_sum", torch.randn(1, 8, 8, 16)))
        >>> explain(model, images).chosen()
        {'sr_attention': 'torch', 'dwconv3x3_gelu': 'cpp', 'upsample_sum': 'cpp'}
    """
    if isinstance(target, str):
        target = get_spec(target)
    if isinstance(target, OpSpec):
        (x,) = args
        return target.explain(backend, x, **facts)
    if isinstance(target, torch.nn.Module):
        with record() as log, torch.no_grad():
            target(*args)
        return Explanation(log)
    raise TypeError(f"explain() takes a model, an op name or an OpSpec, got {type(target).__name__}")
