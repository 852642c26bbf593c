"""A run's training rows, read exactly as that run read them.

Anything that reads the rows a run trained on (memorization, ``pythia-jax count``,
``pythia-jax batches --checkpoints``) needs the run's whole data configuration: the source
(dataset prefix), the order (``preshuffled`` or GPT-NeoX ``neox``), the GPT-NeoX seed, the global
batch, the sequence length, the number of training steps the GPT-NeoX index maps were built for
(``train_iters``: GPT-NeoX ``megatron/data/gpt2_dataset.py`` ``_build_index_mappings`` sizes the
maps for ``train_iters · global_batch`` samples, so another value gives other rows) and the row
transform. Guessing any of them (e.g. Pythia's 143,000 × 1,024, seed 1234, for a demo run) reads
rows the run never saw.

``pythia_jax.checkpoint.read_run_data(dir, step)`` takes them from the record every checkpoint
of this project holds (``RunData.from_record``); explicit values that disagree are refused
(``checked_against``: ``RunDataMismatch``, one line naming the setting, the recorded and the
given value), the row transform's name, parameters and step window (``TRANSFORM_SETTINGS``)
included. A recorded run also bounds the steps that may be read (``check_steps``).
``RunData.from_flags(...)`` is for weights without a record (HF revisions, converted
checkpoints): then every setting that decides the rows must be given, none is defaulted.
``pythia_jax.checkpoint.resolve_run_data(checkpoints, step, **flags)`` picks between the two.

Step ``n`` of a run trained on rows ``[n·global_batch, (n+1)·global_batch)`` of the order, so a
checkpoint saved after ``s`` steps has seen rows ``[0, s·global_batch)`` (``rows_seen``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np

from pythia_jax.errors import DataError
from pythia_jax.io_utils import is_url

logger = logging.getLogger(__name__)

ROW_ORDERS = ("preshuffled", "neox")
# The settings that decide a run's rows, by the name ``from_flags`` / ``from_checkpoints`` take.
SETTINGS = ("data", "order", "seq_len", "global_batch", "seed", "train_iters")
NEOX_ONLY = ("seed", "train_iters")  # the pre-shuffled rows do not depend on these
# The row transform, by the name ``from_flags`` / ``checked_against`` take: its name, its parameters
# (a dict) and the steps [start, stop) it applies to (None: every step).
TRANSFORM_SETTINGS = ("transform", "transform_params", "transform_steps")


class RunDataError(DataError):
    """Missing or unusable data settings for reading a run's training rows."""


class RunDataMismatch(RunDataError):
    """An explicit data setting that disagrees with the one recorded in the run's checkpoints."""


@dataclasses.dataclass(frozen=True)
class RunData:
    """Everything that decides which tokens training step ``n`` of a run saw.

    data: indexed dataset prefix (without ``.bin``/``.idx``; "demo" = the bundled Wikipedia set).
    order: "preshuffled" or "neox" (``pythia_jax.data.orders``). seq_len: tokens per training
    sequence (rows hold seq_len+1). global_batch: rows per step. seed / train_iters: the GPT-NeoX
    order's seed and the training length its index maps were built for (``neox`` only; None is
    refused when the order is opened). transform: the run's row transform record (None: rows as
    stored). cache_prefix: where the GPT-NeoX index maps are looked up / written first (a run's
    ``<output_dir>/index_maps/<name>``). documents / tokens: the source's size as recorded (a
    moved copy is recognised by them). origin: where the settings came from (for messages).
    """

    data: str
    order: str
    seq_len: int
    global_batch: int
    seed: int | None = None
    train_iters: int | None = None
    transform: Any = None
    cache_prefix: str | None = dataclasses.field(default=None, compare=False)
    documents: int | None = dataclasses.field(default=None, compare=False)
    tokens: int | None = dataclasses.field(default=None, compare=False)
    origin: str = dataclasses.field(default="flags", compare=False)

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_flags(cls, *, data: str | None = None, order: str | None = None,
                   seq_len: int | None = None, global_batch: int | None = None,
                   seed: int | None = None, train_iters: int | None = None,
                   transform: str | None = None, transform_params: dict | None = None,
                   transform_steps: Any = None,
                   cache_prefix: str | None = None, what: str | dict = "") -> "RunData":
        """Settings given explicitly (weights without a run record). Every setting that decides
        the rows is required: data, order, seq_len, global_batch, and for ``neox`` also seed and
        train_iters. ``transform`` (with ``transform_params`` and ``transform_steps``, which
        need it) is the row transform the rows were trained with (None: rows as stored).
        ``what`` names the flags in messages: a dict setting -> flag name, or a prefix
        (``"--mem-"`` gives ``--mem-seq-len``; default ``--seq-len``).
        Raises ``RunDataError`` naming every missing setting."""
        given = dict(data=data, order=order, seq_len=seq_len, global_batch=global_batch, seed=seed,
                     train_iters=train_iters)
        needed = [k for k in SETTINGS if k not in NEOX_ONLY or order == "neox"]
        missing = [k for k in needed if given[k] is None]
        if missing:
            raise RunDataError(
                "these checkpoints hold no record of the run's data configuration (e.g. HF revisions or a "
                f"converted checkpoint), so every setting that decides the rows must be given; missing: "
                f"{', '.join(flag_name(k, what) for k in missing)}")
        if order not in ROW_ORDERS:
            raise RunDataError(f"data order {order!r}: expected one of {', '.join(ROW_ORDERS)}")
        record = _transform_record(transform, transform_params, transform_steps, train_iters, what)
        run = cls(data=str(data), order=order, seq_len=int(seq_len), global_batch=int(global_batch),
                  seed=None if seed is None else int(seed),
                  train_iters=None if train_iters is None else int(train_iters),
                  transform=record, cache_prefix=cache_prefix, origin="flags")
        run.check()
        return run

    @classmethod
    def from_record(cls, record: dict, *, origin: str = "record", cache_prefix: str | None = None,
                    data: str | None = None) -> "RunData":
        """From a run record (``checkpoint.read_run_config``). A partial record (checkpoints that
        predate the full record: no source) needs ``data``."""
        d = record.get("data") or {}
        prefix = d.get("prefix")
        if prefix is None:
            if data is None:
                raise RunDataError(f"{origin} records the data order but not its source (a checkpoint "
                                   "written before the full run record); give the training data prefix")
            prefix = data
        missing = [k for k in ("order", "seq_len", "global_batch") if d.get(k) is None]
        if missing:
            raise RunDataError(f"{origin}: the run record lacks {', '.join(missing)}")
        run = cls(data=str(prefix), order=str(d["order"]), seq_len=int(d["seq_len"]),
                  global_batch=int(d["global_batch"]),
                  seed=None if d.get("seed") is None else int(d["seed"]),
                  train_iters=None if d.get("train_iters") is None else int(d["train_iters"]),
                  transform=d.get("transform"), cache_prefix=cache_prefix,
                  documents=d.get("documents"), tokens=d.get("tokens"), origin=origin)
        run.check()
        return run

    # ------------------------------------------------------------------------------ checks
    @property
    def recorded(self) -> bool:
        """Whether the settings come from a run's record (not from flags): then the run's
        ``train_iters`` is the number of steps it trained."""
        return self.origin != "flags"

    def check(self) -> None:
        if self.order not in ROW_ORDERS:
            raise RunDataError(f"data order {self.order!r}: expected one of {', '.join(ROW_ORDERS)}")
        if self.global_batch < 1 or self.seq_len < 1:
            raise RunDataError(f"global batch {self.global_batch} and seq_len {self.seq_len} must be >= 1")
        if self.order == "neox" and (self.seed is None or self.train_iters is None):
            raise RunDataError("the GPT-NeoX order needs its seed and train_iters (the steps its index "
                               "maps were built for)")

    def check_steps(self, start: int, stop: int, what: str | None = None) -> None:
        """``RunDataError`` when steps ``[start, stop)`` reach beyond a recorded run's
        ``train_iters`` steps (rows it never trained on). ``what`` describes the steps in the
        message (default ``steps [start, stop)``). Settings from flags are not bounded here."""
        if self.recorded and self.train_iters is not None and stop > self.train_iters:
            raise RunDataError(f"{what or f'steps [{start}, {stop})'}: the run has {self.train_iters} steps "
                               f"(0..{self.train_iters - 1})")

    def checked_against(self, explicit: dict, *, what: str | dict = "") -> "RunData":
        """``self`` after checking each explicitly given setting (None = not given) against it,
        the transform's (``TRANSFORM_SETTINGS``) included; a moved copy of the source (same
        documents and tokens) replaces the recorded prefix."""
        self._check_transform(explicit, what)
        run = self
        for key in SETTINGS:
            given = explicit.get(key)
            if given is None:
                continue
            if key == "data":
                run = run._with_source(str(given), what)
                continue
            if key in NEOX_ONLY and self.order != "neox":
                continue  # the pre-shuffled rows do not depend on it
            recorded = getattr(self, key)
            if str(given) != str(recorded):
                raise RunDataMismatch(
                    f"{flag_name(key, what)} {given} disagrees with {self.origin}: {key} = {recorded}; "
                    f"drop the flag (the run's value is used) or evaluate the run it belongs to")
        return run

    def _check_transform(self, explicit: dict, what: str | dict) -> None:
        """``RunDataMismatch`` unless each given transform setting equals the recorded one."""
        name, params, steps = (explicit.get(k) for k in TRANSFORM_SETTINGS)
        if name is None and not params and steps is None:
            return
        from pythia_jax.data.transforms import TransformSpec

        rec = TransformSpec.from_dict(self.transform)

        def refuse(key: str, given: str, recorded: str) -> None:
            raise RunDataMismatch(f"{flag_name(key, what)} {given} disagrees with {self.origin}: {key} = "
                                  f"{recorded}; drop the flag (the run's value is used) or read the run "
                                  "it belongs to")

        if name is not None and (rec is None or str(name) != rec.name):
            refuse("transform", str(name), "none" if rec is None else rec.name)
        if params:
            recorded = dict(rec.params) if rec is not None else {}
            given = dict(TransformSpec.create(rec.name if rec else str(name), params).params)
            for key, value in sorted(given.items()):
                if rec is None or key not in recorded or recorded[key] != value:
                    refuse("transform_params", f"{key}={_text(value)}",
                           "none (no transform)" if rec is None else _params_text(recorded))
        if steps is not None:
            given_steps = tuple(int(x) for x in steps)
            if rec is None or rec.steps != given_steps:
                refuse("transform_steps", ",".join(map(str, given_steps)),
                       "none (no transform)" if rec is None else
                       "every step" if rec.steps is None else ",".join(map(str, rec.steps)))

    def _with_source(self, given: str, what: str) -> "RunData":
        mine, theirs = _abs(self.prefix()), _abs(_resolve_prefix(given))
        if mine == theirs:
            return self
        if self.documents is None or self.tokens is None:  # partial record: the given source is it
            return dataclasses.replace(self, data=given)
        docs, toks = _source_size(theirs)
        if (docs, toks) != (self.documents, self.tokens):
            raise RunDataMismatch(
                f"{flag_name('data', what)} {given} ({docs} documents, {toks} tokens) disagrees with "
                f"{self.origin}: data = {self.data} ({self.documents} documents, {self.tokens} tokens); "
                "drop the flag or point it at a copy of the run's data")
        logger.info("reading the run's data from %s, a copy of the recorded %s (%d documents, %d tokens)",
                    given, self.data, docs, toks)
        return dataclasses.replace(self, data=given)

    # ------------------------------------------------------------------------------ rows
    def prefix(self) -> str:
        return _resolve_prefix(self.data)

    def rows_seen(self, step: int) -> int:
        """Rows a checkpoint saved after ``step`` updates has trained on: ``step·global_batch``
        (rows ``[0, step·global_batch)``)."""
        if step < 0:
            raise RunDataError(f"step must be >= 0, got {step}")
        return int(step) * self.global_batch

    def open_order(self):
        """The ``Order`` (row j -> seq_len+1 tokens) the run read, with GPT-NeoX index maps for
        exactly the run's ``train_iters · global_batch`` (looked up first under ``cache_prefix``)."""
        from pythia_jax.data.orders import open_order

        self.check()
        prefix = self.prefix()
        if self.order == "neox" and not _source_exists(prefix):
            raise RunDataError(f"the run's data {prefix} (.bin/.idx) is not there; give the path of a copy "
                               "(the data flag)")
        if self.cache_prefix:
            os.makedirs(os.path.dirname(self.cache_prefix) or ".", exist_ok=True)
        kw = dict(seed=self.seed, train_iters=self.train_iters) if self.order == "neox" else {}
        return open_order(prefix, self.order, seq_len=self.seq_len, global_batch=self.global_batch,
                          cache_prefix=self.cache_prefix, **kw)

    open = open_order  # the name ``pythia_jax.data.count`` uses

    def read_rows(self, order, rows: np.ndarray) -> np.ndarray:
        """Rows at ``rows`` (int [n]) of ``order`` (``open_order()``) as the run trained on them:
        [n, seq_len+1] of the data's dtype, with the run's row transform applied to the rows of
        the steps it covered."""
        rows = np.asarray(rows, np.int64)
        return self._transformed(np.asarray(order.read_row_indices(rows)), rows)

    def read_range(self, order, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``order`` as the run trained on them (see ``read_rows``)."""
        return self.as_trained(np.asarray(order.read_rows(start, stop)), start)

    def as_trained(self, tokens: np.ndarray, start: int) -> np.ndarray:
        """Stored rows ``tokens`` [n, seq_len + 1], whose first is global row ``start``, as the run
        trained on them: the run's transform applied to the rows of the steps it covers (a new
        array then; ``tokens`` is not modified)."""
        return self._transformed(tokens, np.arange(start, start + len(tokens), dtype=np.int64))

    def _transformed(self, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if self.transform is None or len(rows) == 0:
            return tokens
        spec, fn = self._transform()
        steps = rows // self.global_batch
        hit = np.array([spec.applies_to(int(s)) for s in steps], bool)
        if hit.any():
            from pythia_jax.data.transforms import apply_to_rows
            tokens = tokens.copy()
            tokens[hit] = apply_to_rows(tokens[hit], fn)[0]
        return tokens

    def __getstate__(self) -> dict:  # the built transform (a closure) is rebuilt after unpickling
        return {k: v for k, v in self.__dict__.items() if k != "_built_transform"}

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def _transform(self):
        cached = getattr(self, "_built_transform", None)
        if cached is not None:
            return cached
        try:
            from pythia_jax.data.transforms import TransformSpec
        except ImportError:
            raise RunDataError(f"{self.origin} applied the row transform {self.transform}, which this "
                               "installation cannot apply (no pythia_jax.data.transforms)") from None
        spec = TransformSpec.from_dict(self.transform)
        built = (spec, spec.build())
        object.__setattr__(self, "_built_transform", built)
        return built

    def fingerprint(self) -> dict:
        """What identifies the rows, independent of where the data lives on each host."""
        fp = {k: getattr(self, k) for k in SETTINGS}
        fp["data"] = os.path.basename(self.prefix().rstrip("/"))
        if self.order == "preshuffled":
            fp.pop("seed")
            fp.pop("train_iters")
        if self.transform is not None:
            fp["transform"] = self.transform
        return fp

    def describe(self) -> str:
        extra = f", seed {self.seed}, train_iters {self.train_iters}" if self.order == "neox" else ""
        tf = f", transform {self.transform}" if self.transform is not None else ""
        return (f"{self.prefix()} in {self.order} order, global batch {self.global_batch}, seq_len "
                f"{self.seq_len}{extra}{tf} (from {self.origin})")


PYTHIA_DEFAULTS = {"order": "preshuffled", "seq_len": 2048, "global_batch": 1024, "seed": 1234,
                   "train_iters": 143000}


def flag_name(key: str, what: str | dict = "") -> str:
    """``"seq_len"`` -> ``"--seq-len"``, with ``what`` as a prefix: ``"--mem-"`` -> ``--mem-seq-len``;
    a dict maps keys to flag names."""
    if isinstance(what, dict):
        return what.get(key, key)
    return (what or "--") + key.replace("_", "-")


def _transform_record(name: str | None, params: dict | None, steps: Any, train_iters: int | None,
                      what: str | dict) -> dict | None:
    """The transform record (``TransformSpec.to_dict``) of explicit settings, or None."""
    if name is None:
        given = [k for k, v in (("transform_params", params), ("transform_steps", steps)) if v]
        if given:
            raise RunDataError(f"{', '.join(flag_name(k, what) for k in given)} need "
                               f"{flag_name('transform', what)} (the transform they belong to)")
        return None
    from pythia_jax.data.transforms import TransformSpec

    spec = TransformSpec.create(str(name), params, steps)
    if train_iters is not None:
        spec.check_within(int(train_iters))
    spec.build()  # an unknown name or bad parameters fail here, before any rows are read
    return spec.to_dict()


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _params_text(params: dict) -> str:
    return ",".join(f"{k}={_text(v)}" for k, v in sorted(params.items())) or "none"


def _resolve_prefix(data: str) -> str:
    from pythia_jax.data import demo_data_prefix

    return demo_data_prefix() if data == "demo" else data


def _abs(prefix: str) -> str:
    return prefix if is_url(prefix) else os.path.realpath(os.path.abspath(prefix))


def _source_exists(prefix: str) -> bool:
    return is_url(prefix) or os.path.exists(prefix + ".idx")


def _source_size(prefix: str) -> tuple[int, int]:
    from pythia_jax.data.indexed import Index

    if not _source_exists(prefix):
        raise RunDataError(f"{prefix}.idx does not exist")
    sizes = Index(prefix + ".idx").sizes
    return int(len(sizes)), int(np.asarray(sizes).sum(dtype=np.int64))
