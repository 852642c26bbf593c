"""An lm-evaluation-harness model backed by this project (optional extra: ``pip install .[lm_eval]``).

Importing this module registers the model name ``pythia_jax``::

    pythia-jax lm-eval --model pythia_jax --model_args path=/ckpts,step=1000 \\
        --batch_size 16 --tasks piqa          # the lm_eval CLI with this module imported

``path`` is anything ``pythia_jax.eval.loading.load_model_params`` reads (an HF directory, HF
``step<N>/`` revision folders, or a checkpoint directory of this project; ``step`` picks one).
Tokenization and request handling are the harness's own (``TemplateLM``); scoring and
generation run on the jitted, bucketed JAX code of ``pythia_jax.eval``.

``harness_task_from_file`` builds one of the harness's own task YAMLs on a local JSONL file, so
tasks run without the dataset hub (``pythia_jax.eval.harness.build_task`` is the fuller form used
by ``pythia-jax eval``: CSV files, field renames, every task of the paper's suite).
"""

from __future__ import annotations

import os
from typing import Any

import lm_eval.models  # noqa: F401  (first: lists the harness's own models, see below)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from pythia_jax.config import EOD_TOKEN_ID


# lm-eval fills its model registry lazily: ``get_model`` imports ``lm_eval.models`` (which lists
# ``hf``, ``vllm``, ...) only while the registry is empty, so registering ``pythia_jax`` first hid
# every built-in model ("no model for this name found! Supported model names: pythia_jax").
# Importing ``lm_eval.models`` above registers them (as lazy placeholders, nothing heavy) first.
@register_model("pythia_jax")
class PythiaJaxLM(TemplateLM):
    """``loglikelihood`` / ``loglikelihood_rolling`` / ``generate_until`` on a pythia-jax model."""

    def __init__(self, path: str | None = None, step: int | str | None = None, *, model: Any = None,
                 batch_size: int | str = 16, max_length: int | str | None = None,
                 max_gen_toks: int | str = 256, scorer: Any = None, generator: Any = None,
                 progress: bool = True, **unused: Any):
        """``path``/``step`` (a model directory), ``model`` (a ``GPTNeoX`` or ``PlacedModel``) or
        ``scorer`` + ``generator`` (a ``Scorer`` and ``Generator`` to reuse, with their compiled
        functions: how ``pythia-jax eval`` runs harness tasks at every checkpoint). ``progress``
        False: no progress bars for requests (the scoring and the harness's tokenizing)."""
        super().__init__()
        self.truncated = 0  # loglikelihood requests cut from the left to fit the window
        self.progress = progress
        if scorer is not None and generator is not None:
            from pythia_jax.eval.tokens import get_tokenizer
            self.tokenizer = get_tokenizer()
            self.scorer, self.generator = scorer, generator
            self._max_length = int(max_length or scorer.max_len)
            self.max_gen_toks = int(max_gen_toks)
            return
        from pythia_jax.eval.generate import Generator
        from pythia_jax.eval.runtime import place_model
        from pythia_jax.eval.scoring import Scorer
        from pythia_jax.eval.tokens import get_tokenizer

        if model is not None:
            placed = place_model(model)
        elif path is not None:
            from pythia_jax.eval.loading import load_model_params
            config, params = load_model_params(path, None if step in (None, "") else int(step))
            placed = place_model(params, config=config)
        else:
            raise ValueError("pythia_jax: give model_args path=<model dir> (or model=)")
        bs = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.tokenizer = get_tokenizer()
        self._max_length = int(max_length or placed.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = Scorer(placed, batch_size=bs, max_len=self._max_length)
        self.generator = Generator(placed, batch_size=bs)

    # ---------------------------------------------------------------- TemplateLM interface
    @property
    def eot_token_id(self) -> int:
        return EOD_TOKEN_ID

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        from pythia_jax.eval.tokens import encode
        return encode(self.tokenizer, string)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        res = self.scorer.loglikelihood(pairs, progress=self.progress and not disable_tqdm)
        self.truncated += int(res.truncated)
        out = [(float(ll), bool(g)) for ll, g in zip(res.loglik, res.is_greedy)]
        for (key, _, _), r in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(req.args[0]) for req in requests]
        res = self.scorer.loglikelihood_rolling(docs, progress=self.progress and not disable_tqdm)
        out = [float(x) for x in res.loglik]
        for req, r in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), r)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests are grouped by their ``gen_kwargs`` and each group is generated in batches of
        prompts with the KV cache (``pythia_jax.eval.generate.generate_until``: left-padded,
        each row stopping on its own at EOD or a stop string). Results come back in request order
        and equal generating each request alone (greedy)."""
        import json

        from pythia_jax.eval.generate import SamplingConfig, generate_until

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = json.dumps(req.args[1] or {}, sort_keys=True, default=repr)
            groups.setdefault(key, []).append(i)
        results: list[str] = [""] * len(requests)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos not in until:
                until.append(eos)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            sampling = SamplingConfig(temperature=temperature, top_k=int(kwargs.pop("top_k", 0) or 0),
                                      top_p=float(kwargs.pop("top_p", 1.0) or 1.0))
            prompts = [self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in idx]
            texts = generate_until(self.generator, self.tokenizer, prompts, until, max_new,
                                   sampling=sampling, seed=int(kwargs.pop("seed", 0) or 0))
            for i, text in zip(idx, texts):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results


def harness_task_from_file(task: str | os.PathLike, data_file: str | os.PathLike, split: str = "validation",
                           cache_dir: str | os.PathLike | None = None):
    """An lm-eval ``ConfigurableTask`` from a task YAML (a path, or a name of the harness's bundled
    tasks such as ``piqa``) whose documents are read from the local JSONL ``data_file``
    (``cache_dir``: where ``datasets`` keeps its Arrow copy; default its usual cache)."""
    from pathlib import Path

    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    from pythia_jax.eval.harness import HARNESS_TASKS, canonical_name

    harness_yaml = {name: t.yaml for name, t in HARNESS_TASKS.items()}
    path = Path(task)
    if path.suffix not in (".yaml", ".yml"):
        name = canonical_name(str(task))
        if name is None:
            raise ValueError(f"no bundled harness YAML known for {task!r}; pass a YAML path")
        path = Path(lm_eval.__file__).parent / "tasks" / harness_yaml[name]
    cfg = load_yaml(path)
    dataset_kwargs: dict[str, Any] = {"data_files": {split: os.path.abspath(data_file)}}
    if cache_dir is not None:
        dataset_kwargs["cache_dir"] = os.fspath(cache_dir)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs=dataset_kwargs,
               validation_split=split, test_split=None, training_split=None, fewshot_split=None)
    cfg.pop("tag", None)
    cfg.pop("group", None)
    return ConfigurableTask(config=cfg)
