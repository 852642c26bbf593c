"""Pythia data: indexed datasets, the exact GPT-NeoX training order, the grain pipeline.

Modules (each documents its API):
- ``indexed``: ``.bin``/``.idx`` reader (local memmap, tensorstore URLs, sharded streams) and writer.
- ``neox_order``: GPT-NeoX ``GPT2Dataset`` index maps (doc/sample/shuffle idx), ``.npy`` cache.
- ``orders``: row j -> seq_len+1 tokens for the ``preshuffled``, ``neox`` and ``sequential`` orders.
- ``pipeline``: grain iterator of host-local batches by global step, global ``jax.Array`` assembly,
  checkpoint args, held-out batches.
- ``preprocess``: JSONL -> indexed dataset (GPT-NeoX's tokenization), pre-shuffled writer.
- ``tokenizer``: the bundled Pythia tokenizer.

Bundled demo data (``pythia_jax/assets/wikipedia/``), made with this package's own preprocessing
from ``wikipedia_passages.jsonl`` (2,938 English Wikipedia passages, CC-BY-SA 3.0): the first
2,791 passages are the training set, the last 147 (5%) the held-out set::

    head -n 2791 wikipedia_passages.jsonl > /tmp/wiki_train.jsonl
    tail -n +2792 wikipedia_passages.jsonl > /tmp/wiki_val.jsonl
    pythia-jax preprocess --input /tmp/wiki_train.jsonl \\
        --output-prefix pythia_jax/assets/wikipedia/wikipedia --workers 2
    pythia-jax preprocess --input /tmp/wiki_val.jsonl \\
        --output-prefix pythia_jax/assets/wikipedia/wikipedia_val --workers 2
"""

from __future__ import annotations

import os

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def demo_data_prefix() -> str:
    """Prefix of the bundled Wikipedia training dataset (uint16 items, one per passage)."""
    return os.path.join(_ASSETS, "wikipedia", "wikipedia_text_document")


def demo_eval_prefix() -> str:
    """Prefix of the bundled held-out Wikipedia dataset (last 5% of the passages)."""
    return os.path.join(_ASSETS, "wikipedia", "wikipedia_val_text_document")
