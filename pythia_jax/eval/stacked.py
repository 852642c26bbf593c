"""Many checkpoints in one compiled pass: K checkpoints' parameters stacked on a leading axis and
the scoring function ``jax.vmap``-ed over them.

For models whose K copies (plus K sets of activations) fit on the device, every batch of requests
is read, padded and sent once and scored by all K checkpoints in one XLA program, compiled once
per shape for the whole series instead of being re-dispatched per checkpoint. Results are
``[examples × checkpoints]`` matrices.

- ``stack_params(params_list)``: the params trees stacked leaf by leaf -> leaves ``[K, ...]``.
- ``StackedScorer(params_list, config)``: a ``pythia_jax.eval.scoring.Scorer`` whose
  ``loglikelihood`` / ``loglikelihood_rolling`` return ``ScoreResult`` with ``loglik`` float64
  ``[N, K]`` and ``is_greedy`` bool ``[N, K]``; ``view(k)`` is a scorer-like object giving
  checkpoint k's column (each distinct request list is scored once for all K).
- ``stacked_loglikelihoods(params_list, config, requests)`` -> float64 ``[N, K]`` (nats).
- ``stacked_row_losses(params_list, config, rows)`` -> float64 ``[n, K]``: mean next-token loss
  (nats/token) of each row ``[seq_len + 1]`` (training or held-out rows), as the trainer's loss.
- ``choose_stack(config, requested, ...)``: the largest K <= requested whose estimated memory
  (``stack_bytes``) fits the budget (``max_bytes``, else the device's memory limit).

Numerics: the same function as ``Scorer`` (the model's compute dtype, log-softmax in float32);
stacked and one-by-one results agree to float32 rounding (tested <= 1e-5).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import numpy as np

from pythia_jax.errors import PythiaJaxError
from pythia_jax.eval.runtime import PlacedModel
from pythia_jax.eval.scoring import Request, Scorer, ScoreResult, _score_fn

logger = logging.getLogger(__name__)


def stack_params(params_list: Sequence[Any]) -> Any:
    """Stack K params trees (same structure and shapes) on a new leading axis (host numpy).
    Raises ``PythiaJaxError`` for an empty list or trees that differ."""
    if not params_list:
        raise PythiaJaxError("no checkpoints to stack")
    first = jax.tree.structure(params_list[0])
    for k, p in enumerate(params_list[1:], 1):
        if jax.tree.structure(p) != first:
            raise PythiaJaxError(f"checkpoint {k} has another parameter structure than checkpoint 0")
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *params_list)


def params_bytes(config: Any) -> int:
    """Bytes of one checkpoint's parameters in ``config.param_dtype``."""
    return int(_num_params(config) * np.dtype(config.param_dtype).itemsize)


def _num_params(config: Any) -> int:
    from flax import nnx

    from pythia_jax.model import GPTNeoX

    shapes = nnx.eval_shape(lambda: GPTNeoX(config, rngs=nnx.Rngs(0)))
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(shapes, nnx.Param))))


def activation_bytes(config: Any, batch_tokens: int) -> int:
    """A rough upper estimate of one model's activation memory for a scoring batch of
    ``batch_tokens`` padded tokens: float32 logits and their softmax temporaries (3 × V floats per
    token) plus the residual stream and MLP activations of one layer at a time (~16 × H floats)."""
    return int(batch_tokens * 4 * (3 * config.vocab_size + 16 * config.hidden_size))


def stack_bytes(config: Any, k: int, batch_tokens: int) -> int:
    """Estimated device memory of K stacked checkpoints scoring one batch: K × (params + activations)."""
    return int(k * (params_bytes(config) + activation_bytes(config, batch_tokens)))


def device_memory_bytes(device: Any = None) -> int | None:
    """The device's memory limit (``memory_stats()['bytes_limit']``), or for CPU the host's
    physical memory; None when unknown."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def choose_stack(config: Any, requested: int, *, batch_tokens: int = 16384, max_bytes: int | None = None,
                 device: Any = None, fraction: float = 0.8) -> int:
    """The K to use: ``requested``, capped so that ``stack_bytes(config, K, batch_tokens)`` fits
    ``max_bytes`` (default: ``fraction`` of the device memory). At least 1. Logs the choice."""
    if requested < 1:
        raise PythiaJaxError(f"--stack must be >= 1, got {requested}")
    budget = max_bytes if max_bytes is not None else device_memory_bytes(device)
    if budget is not None and max_bytes is None:
        budget = int(budget * fraction)
    per = stack_bytes(config, 1, batch_tokens)
    k = requested if budget is None else max(1, min(requested, budget // per))
    logger.info("stacking %d checkpoint(s) per pass (asked %d; ~%.1f MB each: params %.1f MB + "
                "activations %.1f MB; budget %s)", k, requested, per / 2**20, params_bytes(config) / 2**20,
                activation_bytes(config, batch_tokens) / 2**20,
                "unknown" if budget is None else f"{budget / 2**20:.0f} MB")
    return k


class StackedScorer(Scorer):
    """A ``Scorer`` over K checkpoints of one architecture at once (see the module docstring).

    Args:
      params_list: K params dicts (``pythia_jax.model`` layout), or one tree already stacked with
        ``stacked=True``.
      config: their ``ModelConfig``.
      batch_size, max_len, max_batch_tokens: as ``Scorer``.
    """

    def __init__(self, params_list: Any, config: Any, *, stacked: bool = False, mesh=None, **kwargs):
        from pythia_jax.mesh_config import MeshConfig
        from pythia_jax.sharding import make_mesh, replicated

        tree = params_list if stacked else stack_params(params_list)
        k = {int(x.shape[0]) for x in jax.tree.leaves(tree)}
        if len(k) != 1:
            raise PythiaJaxError(f"stacked params disagree on the number of checkpoints: {sorted(k)}")
        self.num_models = k.pop()
        mesh = mesh or make_mesh(MeshConfig(data=-1))
        placed = PlacedModel(config=config, params=jax.device_put(tree, replicated(mesh)), mesh=mesh)
        super().__init__(placed, **kwargs)
        self._score = jax.jit(jax.vmap(_score_fn(placed), in_axes=(0, None, None, None, None)))
        self.result_shape = (self.num_models,)
        self._cache: dict[tuple, ScoreResult] = {}

    def replace_params(self, params_list: Sequence[Any]) -> None:
        """The next K checkpoints (same K, same shapes): compilations are reused."""
        tree = stack_params(params_list)
        if {int(x.shape[0]) for x in jax.tree.leaves(tree)} != {self.num_models}:
            raise PythiaJaxError(f"expected {self.num_models} checkpoints, got {len(params_list)}")
        self.placed.params = jax.device_put(tree, jax.tree.map(lambda a: a.sharding, self.placed.params))
        self._cache.clear()

    def view(self, k: int) -> "_ModelView":
        """Checkpoint ``k``'s column as a scorer (``loglikelihood`` / ``loglikelihood_rolling``)."""
        if not 0 <= k < self.num_models:
            raise PythiaJaxError(f"model {k} is not in [0, {self.num_models})")
        return _ModelView(self, k)

    def _cached(self, kind: str, items, progress: bool) -> ScoreResult:
        key = (kind, tuple((tuple(c), tuple(x)) for c, x in items) if kind == "ll"
               else tuple(tuple(d) for d in items))
        if key not in self._cache:  # kept until replace_params: every view of it reads this
            fn = self.loglikelihood if kind == "ll" else self.loglikelihood_rolling
            self._cache[key] = fn(items, progress=progress)
        return self._cache[key]


class _ModelView:
    """One checkpoint of a ``StackedScorer``: the scorer interface the tasks use."""

    def __init__(self, stacked: StackedScorer, k: int):
        self.stacked, self.k = stacked, k
        self.config, self.max_len = stacked.config, stacked.max_len

    def _column(self, res: ScoreResult) -> ScoreResult:
        return ScoreResult(loglik=res.loglik[:, self.k], is_greedy=res.is_greedy[:, self.k],
                           num_tokens=res.num_tokens, truncated=res.truncated)

    def loglikelihood(self, requests: Sequence[Request], progress: bool = False) -> ScoreResult:
        return self._column(self.stacked._cached("ll", [(list(c), list(x)) for c, x in requests], progress))

    def loglikelihood_rolling(self, documents, progress: bool = False) -> ScoreResult:
        return self._column(self.stacked._cached("rolling", [list(d) for d in documents], progress))


def stacked_loglikelihoods(params_list: Sequence[Any], config: Any, requests: Sequence[Request], *,
                           batch_size: int = 16, max_len: int | None = None, **kwargs) -> np.ndarray:
    """Summed log-likelihood (nats) of each request's continuation under each of K checkpoints:
    float64 ``[N, K]``, column k = ``Scorer(checkpoint k).loglikelihood(requests).loglik``."""
    scorer = StackedScorer(params_list, config, batch_size=batch_size, max_len=max_len, **kwargs)
    return scorer.loglikelihood(requests).loglik


def stacked_row_losses(params_list: Sequence[Any], config: Any, rows: np.ndarray, *, batch_size: int = 16,
                       **kwargs) -> np.ndarray:
    """Mean next-token cross-entropy (nats/token) of each row under each of K checkpoints:
    rows int ``[n, L+1]`` (training rows as ``RunData.read_rows`` gives them, or held-out rows),
    L <= the model's window -> float64 ``[n, K]``; row i's loss is
    ``-mean_t log p(row[t+1] | row[:t+1])``, t in [0, L), the training loss of that row."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise PythiaJaxError(f"rows must be [n, L+1] with L >= 1, got shape {rows.shape}")
    L = rows.shape[1] - 1
    requests = [(r[:1].tolist(), r[1:].tolist()) for r in rows]
    ll = stacked_loglikelihoods(params_list, config, requests, batch_size=batch_size, max_len=L, **kwargs)
    return -ll / L
