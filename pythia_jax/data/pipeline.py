"""The grain input pipeline: global step n -> rows [B·n, B·n + B), host-local slices, global arrays.

The batch of global step n is always training rows ``[B·n, B·n + B)`` of the order (B = global
batch), whatever the number of hosts, devices, micro-batches or accumulation steps, and after
any restart. Each host reads only its own contiguous slice of those rows: host h of P reads
rows ``[B·n + h·B/P, B·n + (h+1)·B/P)`` (or an explicit ``host_rows=(a, b)`` offset range, e.g.
from ``host_row_range(sharding, B)``). Inputs are ``row[:-1]``, labels ``row[1:]``, both int32.

Public API (for the training loop)::

    from pythia_jax.data.pipeline import make_train_iterator, host_row_range, make_eval_batches

    it = make_train_iterator(
        data_prefix, order="neox",            # or "preshuffled"
        seq_len=2048, global_batch=1024, seed=1234, train_iters=143000,
        start_step=0,                          # resume from a step alone
        process_index=jax.process_index(), process_count=jax.process_count(),
        transform=None)     # optional TransformSpec / per-row hook (pythia_jax.data.transforms)
    batch = next(it)      # {'inputs': int32 [B/P, seq_len], 'labels': int32 [B/P, seq_len]}
    it.step               # global step of the next batch
    state = it.get_state()   # {'next_index': step, ...}; it.set_state(state)
    # the global arrays: jax.make_array_from_process_local_data(sharding, batch[k], (1024, 2048))
    # (pythia_jax.train.builder.TrainSetup.put_batch)

Micro-batching / gradient accumulation: split the host batch (or the global arrays) along the
batch axis; the order stays the global one.

Checkpointing: ``it`` is a ``grain.DatasetIterator``; save it as the ``data_iter`` item of an
Orbax checkpoint with ``grain.checkpoint.CheckpointSave(it)`` (handled by
``grain.checkpoint.CheckpointHandler``, one JSON file per process) and restore it in place with
``grain.checkpoint.CheckpointRestore(it)`` (``pythia_jax.checkpoint`` does both). A restored
state whose global batch, seq_len, order or seed differ from the iterator's raises ``DataError``.
Without a checkpoint, pass ``start_step=k`` (or ``it.set_step(k)``): the stream depends only on the step.

Evaluation: ``make_eval_batches(data_prefix, order=..., seq_len=..., batch_size=...)`` yields
``{'inputs', 'labels'}`` batches of held-out rows: for ``neox``/``preshuffled`` the rows after
the training range (GPT-NeoX's 0.5% margin: rows ``[train_iters·B, len)``), for ``sequential``
(a separate held-out prefix such as ``demo_eval_prefix()``) every row in file order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from pythia_jax.data.orders import Order, open_order
from pythia_jax.data.transforms import RowTransform, TransformSpec, apply_to_rows
from pythia_jax.errors import DataError


def host_slice(global_batch: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Offsets [a, b) within a step's rows that host ``process_index`` of ``process_count`` reads."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch % process_count:
        raise DataError(f"global batch {global_batch} is not divisible by {process_count} hosts")
    per_host = global_batch // process_count
    return process_index * per_host, (process_index + 1) * per_host


def to_inputs_labels(rows: np.ndarray, vocab_size: int | None = None, what: str = "rows"
                     ) -> dict[str, np.ndarray]:
    """rows [b, L+1] -> {'inputs': int32 [b, L] = row[:-1], 'labels': int32 [b, L] = row[1:]}.

    With ``vocab_size``, a token id outside ``[0, vocab_size)`` is a ``TokenIdError`` naming
    ``what``: inside the jitted step such an id would silently read a NaN embedding row.
    """
    rows = np.asarray(rows, dtype=np.int32)
    if vocab_size is not None:
        from pythia_jax.model.token_ids import check_token_ids

        check_token_ids(rows, vocab_size, f"token ids of {what}")
    return {"inputs": rows[:, :-1], "labels": rows[:, 1:]}


@dataclasses.dataclass
class StepRowsSource:
    """A grain ``RandomAccessDataSource`` over global steps: element n = this host's rows of step n.

    Element n is ``{'inputs': int32 [b, L], 'labels': int32 [b, L]}`` built from rows
    ``[B·n + row_start, B·n + row_stop)`` of ``order``. When ``transform`` is set, each row of the
    steps in ``transform_steps = (start, stop)`` (every step if None) is passed through it in the
    dataset's dtype before the shift; other rows are untouched. What it changed is kept per step
    in ``transform_stats`` (``pythia_jax.data.transforms.TransformStats``) until ``pop_stats``.
    """

    order: Order
    global_batch: int
    num_steps: int
    row_start: int
    row_stop: int
    transform: RowTransform | None = None
    transform_steps: tuple[int, int] | None = None
    transform_stats: dict = dataclasses.field(default_factory=dict, repr=False)
    vocab_size: int | None = None  # token ids checked against it (``to_inputs_labels``)

    def __len__(self) -> int:
        return self.num_steps

    def transforms_step(self, step: int) -> bool:
        return self.transform is not None and (
            self.transform_steps is None
            or self.transform_steps[0] <= step < self.transform_steps[1])

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        step = int(step)
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} out of range [0, {self.num_steps})")
        base = self.global_batch * step
        if not self.transforms_step(step):
            # Gathered straight into int32 (one pass; inputs/labels are views of those rows).
            return to_inputs_labels(self.order.read_rows(base + self.row_start, base + self.row_stop, np.int32),
                                    self.vocab_size, self._what(step))
        rows = self.order.read_rows(base + self.row_start, base + self.row_stop)
        rows, stats = apply_to_rows(rows, self.transform)  # in the dataset's dtype
        self.transform_stats[step] = stats
        return to_inputs_labels(rows, self.vocab_size, self._what(step))

    def _what(self, step: int) -> str:
        return f"step {step}'s training rows ({self.order.name})"

    def pop_stats(self, step: int):
        """The TransformStats of ``step`` (None when the step was not transformed or not read)."""
        return self.transform_stats.pop(int(step), None)

    def __repr__(self) -> str:
        return (f"StepRowsSource({self.order.name}, B={self.global_batch}, "
                f"rows=[{self.row_start}, {self.row_stop}), steps={self.num_steps})")


def _grain():
    import grain
    return grain


def _make_iterator_class():
    grain = _grain()

    class BatchIterator(grain.DatasetIterator):
        """Host-local training batches by global step; a checkpointable grain iterator.

        State: ``{'next_index': step, 'global_batch', 'seq_len', 'order', 'seed', 'train_iters'}``.
        """

        def __init__(self, parent, meta: dict[str, Any]):
            super().__init__(parent)
            self._source_it = parent
            self._meta = dict(meta)

        def __next__(self) -> dict[str, np.ndarray]:
            return next(self._source_it)

        @property
        def step(self) -> int:
            """Global step of the batch the next ``next()`` returns."""
            return int(self._source_it.get_state()["next_index"])

        def set_step(self, step: int) -> None:
            """Continue from global step ``step`` (the state depends on nothing else)."""
            if not 0 <= step <= self._meta["train_iters"]:
                raise DataError(f"step {step} is beyond the training range "
                                f"[0, {self._meta['train_iters']}]")
            self._source_it.set_state({"next_index": int(step)})

        def pop_transform_stats(self, step: int):
            """What the row transform changed in ``step``'s rows on this host (or None)."""
            source = getattr(self, "source", None)
            return source.pop_stats(step) if source is not None else None

        def get_state(self) -> dict[str, Any]:
            state = dict(self._meta)
            state["next_index"] = self.step
            return state

        def set_state(self, state: dict[str, Any]) -> None:
            if state.get("transform") != self._meta.get("transform"):
                raise DataError(f"data iterator checkpoint was made with transform "
                                f"{state.get('transform')}, this run uses "
                                f"{self._meta.get('transform')}; resume with the same transform "
                                "or branch into another output_dir")
            for key in ("global_batch", "seq_len", "order", "seed"):
                if key in state and state[key] != self._meta[key]:
                    raise DataError(f"data iterator checkpoint was made with {key}={state[key]!r}, "
                                    f"this run uses {self._meta[key]!r}")
            self.set_step(int(state["next_index"]))

        def __str__(self) -> str:
            return f"BatchIterator({self._meta})"

    return BatchIterator


_BATCH_ITERATOR_CLASS = None


def _batch_iterator_class():
    global _BATCH_ITERATOR_CLASS
    if _BATCH_ITERATOR_CLASS is None:
        _BATCH_ITERATOR_CLASS = _make_iterator_class()
    return _BATCH_ITERATOR_CLASS


def make_train_iterator(data_prefix: str, *, order: str | Order = "neox", seq_len: int = 2048,
                        global_batch: int = 1024, seed: int = 1234, train_iters: int = 143000,
                        start_step: int = 0, process_index: int | None = None,
                        process_count: int | None = None,
                        transform: RowTransform | TransformSpec | None = None,
                        transform_steps: tuple[int, int] | None = None,
                        host_rows: tuple[int, int] | None = None, num_threads: int = 2,
                        prefetch: int = 2, cache_prefix: str | None = None,
                        verbose: bool = False, vocab_size: int | None = None):
    """Iterator of this host's batches for global steps ``start_step .. train_iters-1``.

    data_prefix: dataset path without ``.bin``/``.idx`` (local or URL); order: ``"neox"`` (raw
    documents + GPT-NeoX maps), ``"preshuffled"`` or an ``Order`` already opened.
    process_index/process_count default to ``jax.process_index()/process_count()``; host_rows
    overrides the per-host slice of each step's rows (offsets in [0, global_batch)).
    Yields ``{'inputs': int32 [b, seq_len], 'labels': int32 [b, seq_len]}``, b = rows per host.
    transform: a ``TransformSpec`` (name, parameters, step window; recorded in the iterator state,
    so a checkpoint made with another transform is refused) or a plain callable applied in the
    steps ``transform_steps = (start, stop)`` (every step if None).
    vocab_size: the model's; a batch holding a token id outside ``[0, vocab_size)`` raises
    ``TokenIdError`` when it is read (None: not checked).
    """
    grain = _grain()
    spec = transform if isinstance(transform, TransformSpec) else None
    if spec is not None:
        spec.check_within(train_iters)
        transform, transform_steps = spec.build(), spec.steps
    if isinstance(order, Order):
        order_obj = order
    else:
        order_obj = open_order(data_prefix, order, seq_len=seq_len, seed=seed,
                               train_iters=train_iters, global_batch=global_batch,
                               cache_prefix=cache_prefix, verbose=verbose)
    order_name = order_obj.kind  # the same in the checkpoint whether named or passed opened
    if order_obj.seq_len != seq_len:
        raise DataError(f"{order_obj.name}: order has seq_len {order_obj.seq_len}, asked for {seq_len}")
    needed = train_iters * global_batch
    if needed > len(order_obj):
        last_step = len(order_obj) // global_batch - 1
        raise DataError(f"{order_obj.name}: {train_iters} steps of {global_batch} rows need "
                        f"{needed} rows, the {order_name} order has {len(order_obj)} "
                        f"(the last full step is {last_step})")
    if host_rows is None:
        if process_index is None or process_count is None:
            import jax
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        host_rows = host_slice(global_batch, process_index, process_count)
    a, b = host_rows
    if not 0 <= a < b <= global_batch:
        raise DataError(f"host rows [{a}, {b}) are not inside a batch of {global_batch}")
    source = StepRowsSource(order_obj, global_batch, train_iters, a, b, transform,
                            tuple(transform_steps) if transform_steps is not None else None,
                            vocab_size=vocab_size)
    ds = grain.MapDataset.source(source)
    parent = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                       prefetch_buffer_size=prefetch)))
    meta = {"global_batch": int(global_batch), "seq_len": int(seq_len), "order": order_name,
            "seed": int(seed), "train_iters": int(train_iters)}
    if spec is not None:
        meta["transform"] = spec.to_dict()
    it = _batch_iterator_class()(parent, meta)
    it.source = source
    if start_step:
        it.set_step(int(start_step))
    return it


def host_row_range(sharding, global_batch: int, seq_len: int = 1) -> tuple[int, int]:
    """Rows [a, b) of the global batch that this process's devices hold under ``sharding``.

    sharding: a ``jax.sharding.Sharding`` of the [global_batch, seq_len] batch arrays (pass
    ``seq_len`` if the sharding also splits the sequence axis). Raises ``DataError`` if the rows
    are not contiguous (make the batch axis process-contiguous).
    """
    index_map = sharding.addressable_devices_indices_map((global_batch, seq_len))
    spans = set()
    for idx in index_map.values():
        sl = idx[0] if idx else slice(None)
        start, stop, _ = sl.indices(global_batch)
        spans.add((start, stop))
    spans = sorted(spans)
    a, b = spans[0][0], spans[0][1]
    for s, e in spans[1:]:
        if s > b:
            raise DataError(f"this process's batch rows are not contiguous: {spans}")
        b = max(b, e)
    return a, b


def heldout_row_range(order: Order, train_iters: int, global_batch: int) -> tuple[int, int]:
    """Rows never used by training: ``[train_iters·global_batch, len(order))``."""
    start = train_iters * global_batch
    if start >= len(order):
        raise DataError(f"{order.name}: no held-out rows after {train_iters} steps of "
                        f"{global_batch} (the order has {len(order)} rows)")
    return start, len(order)


def make_eval_batches(data_prefix: str, *, order: str = "sequential", seq_len: int = 2048,
                      batch_size: int = 8, max_batches: int | None = None, seed: int = 1234,
                      train_iters: int = 143000, global_batch: int = 1024,
                      process_index: int = 0, process_count: int = 1,
                      cache_prefix: str | None = None, vocab_size: int | None = None
                      ) -> Iterator[dict[str, np.ndarray]]:
    """Held-out batches {'inputs','labels'} int32 [batch_size/process_count, seq_len] in a fixed order.
    ``vocab_size``: token ids are checked against it (``to_inputs_labels``).

    ``sequential``: every row of a separate held-out dataset (e.g. ``demo_eval_prefix()``);
    ``neox``/``preshuffled``: rows after the training range of the training data.
    """
    order_obj = open_order(data_prefix, order, seq_len=seq_len, seed=seed, train_iters=train_iters,
                           global_batch=global_batch, cache_prefix=cache_prefix)
    if order == "sequential":
        start, stop = 0, len(order_obj)
    else:
        start, stop = heldout_row_range(order_obj, train_iters, global_batch)
    n_batches = (stop - start) // batch_size
    if n_batches == 0:
        raise DataError(f"{order_obj.name}: fewer than {batch_size} held-out rows ({stop - start})")
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    a, b = host_slice(batch_size, process_index, process_count)
    for k in range(n_batches):
        base = start + k * batch_size
        yield to_inputs_labels(order_obj.read_rows(base + a, base + b, np.int32), vocab_size,
                               f"held-out batch {k} ({order_obj.name})")
