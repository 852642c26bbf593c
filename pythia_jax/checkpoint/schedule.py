"""Which steps are saved: Pythia's checkpoint schedule (0, powers of two, then every 1000 steps).

The released Pythia suite has 154 checkpoints per model: step 0, the log-spaced steps
1, 2, 4, …, 512 and every 1000 steps up to 143000 (the Pythia paper, Biderman et al. 2023,
arXiv 2304.01373; the ``step<N>`` revisions of the EleutherAI/pythia-* repositories on the HF Hub).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Collection

from pythia_jax.config import ConfigError


def pythia_steps(max_step: int = 143000, log_until: int = 512, every: int = 1000) -> list[int]:
    """Pythia's checkpoint steps: 0, the powers of two up to ``log_until``, then every ``every``.

    With the defaults this is the 154 steps of the released suite (0, 1, 2, 4, …, 512, 1000,
    2000, …, 143000). Scaled-down schedules for short runs: e.g. ``pythia_steps(200, 16, 50)``.
    """
    return CheckpointSchedule(max_step=max_step, log_until=log_until, every=every).steps()


@dataclasses.dataclass(frozen=True)
class CheckpointSchedule:
    """Which steps to save: Pythia's log-spaced early steps, a fixed interval, extra steps.

    ``every=0`` disables the interval; ``log_until=-1`` disables the log-spaced steps (and 0).
    """

    max_step: int = 143000
    log_until: int = 512
    every: int = 1000
    extra_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_step < 0 or self.every < 0:
            raise ConfigError(f"CheckpointSchedule: max_step and every must be >= 0, got {self}")

    def steps(self) -> list[int]:
        steps = set(int(s) for s in self.extra_steps)
        if self.log_until >= 0:
            steps.add(0)
            p = 1
            while p <= self.log_until:
                steps.add(p)
                p *= 2
        if self.every > 0:
            steps.update(range(self.every, self.max_step + 1, self.every))
        return sorted(s for s in steps if 0 <= s <= self.max_step)

    def should_save(self, step: int) -> bool:
        step = int(step)
        if step in self.extra_steps:
            return True
        if step < 0 or step > self.max_step:
            return False
        if self.log_until >= 0 and (step == 0 or (step <= self.log_until and step & (step - 1) == 0)):
            return True
        return self.every > 0 and step > 0 and step % self.every == 0


SaveSteps = CheckpointSchedule | Collection[int] | Callable[[int], bool]


def _as_predicate(save_steps: SaveSteps | None) -> Callable[[int], bool]:
    if save_steps is None:
        return CheckpointSchedule().should_save
    if isinstance(save_steps, CheckpointSchedule):
        return save_steps.should_save
    if callable(save_steps):
        return save_steps
    steps = frozenset(int(s) for s in save_steps)
    return steps.__contains__

