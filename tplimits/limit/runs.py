"""What a run of the limit and the finite-width runs it is checked against share: the schedule of
training rows, the default dtype during instantiation, standard errors over independent runs, and
when a run counts as diverged.

Divergence (the same criterion for the limit and for every finite run): at some step the outputs
have a non-finite entry, or their root mean square exceeds :data:`EXPLOSION` times the targets'
scale (``max(1, RMS(y))`` for real targets, 1 for class labels). Trained outputs live on the targets'
scale; a thousandfold excursion beyond it is a blow-up, never a result.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
import torch

from tplimits.errors import BatchSizeError, Diverged, TplimitsError

if TYPE_CHECKING:  # Examples.of reads a program's batch spec
    from tplimits.core.program import Program

EXPLOSION = 1e3
FLOAT_DTYPES = (torch.float32, torch.float64)


@attrs.frozen
class Examples:
    """Where a program's examples lie: along axis ``inputs`` of its data ``X`` and axis ``outputs`` of its outputs
    and targets ``y`` (0 and 0 for a batch-first model; 1 and 1 for a sequence-first one, data ``[time, batch,
    ...]``). Every selection of examples a run makes (training rows, a step's batch, test rows) goes through it;
    the loss sees outputs and targets batch-first, as a batch-first model gives them."""

    inputs: int = 0
    outputs: int = 0

    @classmethod
    def of(cls, program: Program) -> Examples:
        """The batch axes of ``program``'s first input and its output (axis 0 where it records none: a program
        specific to its batch size)."""
        spec = program.batch if program.batch_generic else None
        if spec is None or not program.inputs or len(program.outputs) != 1:
            return cls()
        inputs = spec.example_axis(program.inputs[0])
        outputs = spec.example_axis(program[program.outputs[0]])
        return cls(inputs or 0, outputs or 0)

    def count(self, X: torch.Tensor) -> int:
        """The number of examples of data ``X``."""
        return _length("X", X, self.inputs)

    def count_targets(self, y: torch.Tensor) -> int:
        """The number of examples of targets ``y``."""
        return _length("y", y, self.outputs)

    def matched(self, X: torch.Tensor, y: torch.Tensor) -> int:
        """The number of examples of ``X``, which must equal that of its targets ``y`` (else a named error)."""
        rows, targets = self.count(X), self.count_targets(y)
        if rows != targets:
            where = "" if self == BATCH_FIRST else (f" (along axis {self.inputs} of X and {self.outputs} of y, the "
                                                   "batch axes of the inputs and outputs)")
            raise TplimitsError(f"X has {rows} rows but y has {targets}{where}: one target per input")
        return rows

    def join(self, X: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``X`` followed by the examples of ``other``."""
        return torch.cat([X, other], dim=self.inputs)

    def after(self, Z: torch.Tensor, count: int) -> torch.Tensor:
        """The examples of data ``Z`` after its first ``count`` (the test examples)."""
        return Z[count:] if self.inputs == 0 else Z.narrow(self.inputs, count, Z.shape[self.inputs] - count)

    def first(self, outputs: torch.Tensor, count: int, lead: int = 0) -> torch.Tensor:
        """The first ``count`` examples of ``outputs`` (with ``lead`` axes before the output's own: steps,
        systems)."""
        axis = lead + self.outputs
        return outputs[(slice(None),) * axis + (slice(None, count),)]

    def rest(self, outputs: torch.Tensor, count: int, lead: int = 0) -> torch.Tensor:
        """The examples of ``outputs`` after the first ``count``."""
        axis = lead + self.outputs
        return outputs[(slice(None),) * axis + (slice(count, None),)]

    def batch_first(self, outputs: torch.Tensor) -> torch.Tensor:
        """``outputs`` (or targets) with their examples along axis 0, as a batch-first model gives them."""
        return outputs if self.outputs == 0 else outputs.movedim(self.outputs, 0)

    def loss(self, loss: Callable, outputs: torch.Tensor, targets: torch.Tensor,
             rows: torch.Tensor | None = None) -> torch.Tensor:
        """``loss`` of the examples ``rows`` (all of them: None) of ``outputs`` against ``targets``."""
        outputs, targets = self.batch_first(outputs), self.batch_first(targets)
        return loss(outputs, targets) if rows is None else loss(outputs[rows], targets[rows])

    def error_signal(self, loss: Any, outputs: torch.Tensor, targets: torch.Tensor,
                     rows: torch.Tensor) -> torch.Tensor:
        """``∂loss(outputs[rows], targets[rows]) / ∂outputs`` (``loss`` a :class:`~tplimits.training.loss.Loss`),
        rows counted along the outputs' batch axis."""
        chi = loss.error_signal(self.batch_first(outputs), self.batch_first(targets), rows)
        return chi if self.outputs == 0 else chi.movedim(0, self.outputs)


BATCH_FIRST = Examples()
"""Examples along axis 0 of the data and of the outputs."""


def _length(name: str, value: torch.Tensor, axis: int) -> int:
    if value.dim() <= axis:
        raise BatchSizeError(f"{name} has shape {tuple(value.shape)}, but the model's examples lie along its axis "
                            f"{axis} (a sequence-first model takes data [time, batch, ...]): pass {name} with its "
                            f"examples along axis {axis}")
    return int(value.shape[axis])


def batch_schedule(n_train: int, batch_size: int | None, steps: int, seed: int) -> list[torch.Tensor]:
    """The rows trained on at each step: all of them (``batch_size=None``), or consecutive batches of
    a fresh random permutation per epoch (the last, smaller batch of an epoch included)."""
    everything = torch.arange(n_train)
    if batch_size is None or batch_size >= n_train:
        return [everything] * steps
    if batch_size < 1:
        raise TplimitsError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    schedule: list[torch.Tensor] = []
    while len(schedule) < steps:
        schedule.extend(torch.randperm(n_train, generator=generator).split(batch_size))
    return schedule[:steps]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` for the duration of the block."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def standard_error(samples: torch.Tensor) -> torch.Tensor:
    """The standard error of the mean over the first axis; NaN for a single sample, which has none."""
    if samples.shape[0] < 2:
        return torch.full_like(samples[0], float("nan"))
    return samples.std(dim=0, unbiased=True) / math.sqrt(samples.shape[0])


def student_t_tail(x: float, df: float) -> float:
    """``P(T > x)`` for Student's t with ``df`` degrees of freedom (``x >= 0``), by Simpson's rule on an
    incomplete beta integral (torch has no ``betainc``). With ``w = df / (df + x²)`` and ``s = r²``:
    ``P(T > x) = ½ I_w(df/2, ½)``, whose integrand ``2 r^{df-1} / √(1 - r²)`` is smooth unless ``w`` is
    near 1; there ``½ − ½ I_{1-w}(½, df/2)`` is used, unless that difference is too small to be exact."""
    if not (df > 0 and x >= 0):
        raise TplimitsError(f"student_t_tail needs x >= 0 and df > 0, got x={x!r}, df={df!r}")
    beta = math.exp(math.lgamma(df / 2) + math.lgamma(0.5) - math.lgamma(df / 2 + 0.5))
    w = df / (df + x * x)
    if w > 0.5:
        tail = 0.5 - 0.5 * _simpson(lambda r: 2 * (1 - r.square()).pow(df / 2 - 1), math.sqrt(1 - w)) / beta
        if tail > 1e-3:
            return tail
    return 0.5 * _simpson(lambda r: 2 * r.pow(df - 1) / (1 - r.square()).sqrt(), math.sqrt(w), 40000) / beta


def _simpson(fn: Any, upper: float, intervals: int = 4000) -> float:
    """``∫_0^upper fn(r) dr`` by Simpson's rule (``intervals`` even)."""
    r = torch.linspace(0.0, upper, intervals + 1, dtype=torch.float64)
    weights = torch.ones_like(r)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    return float((weights * fn(r)).sum()) * upper / (3 * intervals)


def student_t_quantile(tail: float, df: float) -> float:
    """The ``x >= 0`` with ``P(T > x) = tail`` for Student's t with ``df`` degrees of freedom (bisection)."""
    if not 0 < tail < 0.5:
        raise TplimitsError(f"student_t_quantile needs 0 < tail < 0.5, got {tail!r}")
    low, high = 0.0, 1.0
    while student_t_tail(high, df) > tail:
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_tail(mid, df) > tail else (low, mid)
    return (low + high) / 2


def rms(x: torch.Tensor) -> float:
    """The root mean square of ``x`` (non-finite if an entry is; 0 for an empty tensor), in one pass."""
    return float(x.detach().double().square().mean().sqrt()) if x.numel() else 0.0


def explosion_bound(targets: torch.Tensor) -> float:
    """The largest RMS of the outputs a run may reach before it counts as diverged."""
    scale = max(1.0, rms(targets)) if targets.is_floating_point() else 1.0
    return EXPLOSION * scale


def blown_up(x: torch.Tensor, bound: float) -> bool:
    """Whether ``x`` has a non-finite entry or an RMS beyond ``bound`` (a NaN compares false: blown up)."""
    return not rms(x) <= bound


def check_outputs(outputs: torch.Tensor, bound: float, step: int, what: str) -> None:
    """Raise :class:`Diverged` when the outputs of ``what`` at ``step`` have blown up."""
    size = rms(outputs)
    if not size <= bound:
        kind = f"RMS {size:.3g} > {bound:.3g}" if math.isfinite(size) else "non-finite values"
        raise Diverged(f"{what} diverged at step {step}: its outputs have {kind}. Try a smaller lr (or fewer "
                       "steps); see docs/limit.md, 'Divergence'.", step=step, value="outputs")


def digest(t: torch.Tensor) -> str:
    """A tensor's dtype, shape and a hash of its entries: its identity in a checkpoint or a trajectory."""
    t = t.detach().cpu().contiguous()
    return f"{t.dtype}{tuple(t.shape)}:" + hashlib.sha256(t.numpy().tobytes()).hexdigest()


def data(name: str, value: Any) -> torch.Tensor:
    """``value`` as a tensor with at least one row and only finite entries."""
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TplimitsError(f"{name} must be a tensor (or array) of numbers, got {type(value).__name__}") from None
    if t.ndim == 0 or len(t) == 0:
        raise TplimitsError(f"{name} has no rows (shape {tuple(t.shape)})")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise TplimitsError(f"{name} has non-finite entries (NaN or inf): clean the data first")
    return t


def limit_dtype(dtype: torch.dtype | None, device: Any) -> torch.dtype:
    """``dtype`` as given, or the limit engine's default, float64 on every device: over long training a float32
    system's hat bases cannot stay orthonormal (its sums over particles round at ``eps·√P`` of a ket, while a
    ket's new directions per step hold ``10⁻³`` of its norm), and its standard errors grew fivefold over the 50
    steps of the reference case (docs/limit.md, "Monte Carlo error, determinism, checkpoints")."""
    del device  # the same default everywhere; check_dtype_device names a bad device
    return torch.float64 if dtype is None else dtype


def check_dtype_device(dtype: Any, device: Any) -> None:
    """A dtype and a device a run (the limit or a finite model) can use, or a named error."""
    if dtype not in FLOAT_DTYPES:
        raise TplimitsError(f"dtype={dtype!r}: the limit engine runs in {[str(d) for d in FLOAT_DTYPES]} "
                            "(half precision cannot hold the Gram matrices of the hats)")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise TplimitsError(f"device={device!r} is not a torch device (use 'cpu' or 'cuda')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TplimitsError(f"device={str(device)!r}, but CUDA is not available here; use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise TplimitsError(f"device={str(device)!r}: the limit engine runs on 'cpu' or 'cuda'")
