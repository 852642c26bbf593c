"""Named per-row transforms of training rows: the interventions of the Pythia paper, and yours.

A *row transform* maps one training row (integer token ids ``[seq_len + 1]``, the row before the
input/label shift) to a row of the same shape and dtype. It must be deterministic and
order-preserving: the pipeline applies it to the rows of the steps in a window ``[start, stop)``
and leaves every other row byte-identical (``pythia_jax.data.pipeline``).

Built in (``available_transforms()``):

- ``gender_swap`` (corrected): whole words only, every form of he / him / his / himself in any
  case (lower, Title, UPPER), next to punctuation too, never a piece of a longer word; the row
  keeps its length exactly (see :class:`GenderSwap`). ``direction="f2m"`` swaps the other way;
  ``word_pairs="winobias"`` adds WinoBias's gendered word pairs (actor/actress, ...).
- ``gender_swap_tokenmap_2022``: the historical token-id map of the Pythia intervention runs
  (Dec 2022, unmerged GPT-NeoX branch): ten ids replaced, flaws included (`` Him`` and
  `` himself`` are missed; the three ids without a leading space are sub-word pieces, so other
  words containing them change too).
- ``gender_swap_text_2023``: the historical text variant (Jan 2023): decode the row, replace the
  space-delimited words " he ", " him ", " his ", " He ", " Him ", " His " by the feminine ones,
  re-tokenize, then pad with id 1 or truncate to the row length.

User transforms are given by import path, ``"package.module:function"``; the function is called as
``function(row, **params)`` and must return the new row.

Source of the historical variants: Biderman et al. (2023), "Pythia: A Suite for Analyzing Large
Language Models Across Training and Scaling", Section 3.1 (gender-bias intervention), and the
intervention branches of EleutherAI/gpt-neox that trained those models.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pythia_jax.config import ConfigError
from pythia_jax.errors import TransformError

log = logging.getLogger(__name__)

RowTransform = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[..., RowTransform]] = {}


def register_transform(name: str) -> Callable:
    """Decorator: register ``factory(**params) -> RowTransform`` under ``name``."""
    def deco(factory: Callable[..., RowTransform]) -> Callable[..., RowTransform]:
        _REGISTRY[name] = factory
        return factory
    return deco


def available_transforms() -> list[str]:
    """The names of the built-in (and registered) transforms."""
    return sorted(_REGISTRY)


def build_transform(name: str, params: Mapping[str, Any] | None = None) -> RowTransform:
    """The row transform called ``name`` (a registered name or ``"package.module:function"``).

    The result checks every output row: same shape and dtype as the input, else TransformError.
    Raises ConfigError for an unknown name, an import path that does not resolve, or parameters
    the transform does not take.
    """
    params = dict(params or {})
    if name in _REGISTRY:
        try:
            fn = _REGISTRY[name](**params)
        except TypeError as e:
            raise ConfigError(f"transform {name!r}: bad parameters {params}: {e}") from None
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            target = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"transform {name!r}: cannot import it ({e}); expected "
                              "'package.module:function'") from None
        fn = functools.partial(target, **params) if params else target
    else:
        raise ConfigError(f"unknown transform {name!r}; available: "
                          f"{', '.join(available_transforms())}, or 'package.module:function'")
    return _Checked(name, fn)


class _Checked:
    """Wraps a transform and refuses outputs of another shape or dtype, and turns an exception the
    transform raises into a one-line TransformError naming it (the cause chained)."""

    def __init__(self, name: str, fn: RowTransform):
        self.name, self.fn = name, fn

    def __call__(self, row: np.ndarray) -> np.ndarray:
        try:
            new = self.fn(row.copy())
        except TransformError:
            raise
        except Exception as e:  # noqa: BLE001 - a user's function: one line naming it, the cause chained
            raise TransformError(f"transform {self.name!r} raised {type(e).__name__}: {e} (on a row of "
                                 f"{row.size} tokens starting {row[:8].tolist()})") from e
        if not isinstance(new, np.ndarray):
            raise TransformError(f"transform {self.name!r} returned {type(new).__name__}, "
                                 "expected a numpy array")
        if new.shape != row.shape or new.dtype != row.dtype:
            raise TransformError(f"transform {self.name!r} changed the row from {row.dtype}"
                                 f"{list(row.shape)} to {new.dtype}{list(new.shape)}; a row "
                                 "transform must keep the row's length and dtype")
        return new

    @property
    def skipped(self) -> int:
        return int(getattr(self.fn, "skipped", 0))


@dataclasses.dataclass(frozen=True)
class TransformSpec:
    """A transform by name, its parameters, and the step window ``[start, stop)`` it applies to.

    ``steps=None`` means every step. Recorded in each checkpoint (``to_dict``) so a resume with
    another transform can be refused.
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    steps: tuple[int, int] | None = None

    @classmethod
    def create(cls, name: str, params: Mapping[str, Any] | None = None,
               steps: Sequence[int] | None = None) -> "TransformSpec":
        if steps is not None:
            if len(steps) != 2 or int(steps[0]) < 0 or int(steps[1]) <= int(steps[0]):
                raise ConfigError(f"transform_steps must be (start, stop) with 0 <= start < stop, "
                                  f"got {tuple(steps)}")
            steps = (int(steps[0]), int(steps[1]))
        items = tuple(sorted((str(k), _freeze(v)) for k, v in dict(params or {}).items()))
        return cls(str(name), items, steps)

    def applies_to(self, step: int) -> bool:
        return self.steps is None or self.steps[0] <= step < self.steps[1]

    def build(self) -> RowTransform:
        return build_transform(self.name, dict(self.params))

    def check_within(self, num_steps: int) -> None:
        """ConfigError when the step window lies outside a run of ``num_steps`` steps."""
        if self.steps is not None and self.steps[1] > num_steps:
            raise ConfigError(f"transform_steps {self.steps} reach beyond the run's {num_steps} "
                              f"steps; use a window within [0, {num_steps})")

    def to_dict(self) -> dict:
        return {"name": self.name, "params": {k: v for k, v in self.params},
                "steps": list(self.steps) if self.steps is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "TransformSpec | None":
        if not d:
            return None
        return cls.create(d["name"], d.get("params"), d.get("steps"))


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return v


# ------------------------------------------------------------------------- applying to row blocks
@dataclasses.dataclass
class TransformStats:
    """What a transform changed in a block of rows: rows with any change, token positions changed,
    and occurrences the transform recognised but could not change (``skipped``)."""

    rows_changed: int = 0
    tokens_changed: int = 0
    skipped: int = 0

    def __iadd__(self, other: "TransformStats") -> "TransformStats":
        self.rows_changed += other.rows_changed
        self.tokens_changed += other.tokens_changed
        self.skipped += other.skipped
        return self


def apply_to_rows(rows: np.ndarray, transform: RowTransform) -> tuple[np.ndarray, TransformStats]:
    """Apply ``transform`` to each row of ``rows`` [b, L+1]; return the new rows and the counts."""
    out = np.empty_like(rows)
    before = getattr(transform, "skipped", 0)
    for i, row in enumerate(rows):
        new = np.asarray(transform(row))
        if new.shape != row.shape:
            raise TransformError(f"the row transform changed a row's shape {row.shape} to "
                                 f"{new.shape}; a row transform must keep the row's length")
        out[i] = new
    diff = out != rows
    stats = TransformStats(int(diff.any(axis=1).sum()), int(diff.sum()),
                           int(getattr(transform, "skipped", 0)) - int(before))
    return out, stats


# ----------------------------------------------------------------------------------- built-ins
from pythia_jax.data.gender_swap import (  # noqa: E402  (registered below)
    PRONOUNS_F2M,
    PRONOUNS_M2F,
    TEXT_REPLACEMENTS_2023,
    TOKENMAP_2022,
    GenderSwap,
    gender_swap,
    gender_swap_text_2023,
    gender_swap_tokenmap_2022,
    winobias_pairs,
)

register_transform("gender_swap_tokenmap_2022")(gender_swap_tokenmap_2022)
register_transform("gender_swap_text_2023")(gender_swap_text_2023)
register_transform("gender_swap")(gender_swap)

__all__ = ["RowTransform", "TransformError", "TransformSpec", "TransformStats", "GenderSwap",
           "register_transform", "available_transforms", "build_transform", "apply_to_rows",
           "winobias_pairs", "TOKENMAP_2022", "TEXT_REPLACEMENTS_2023", "PRONOUNS_M2F",
           "PRONOUNS_F2M"]
