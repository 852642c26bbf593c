"""``pythia-jax preprocess``: JSONL (plain/.gz/.zst) -> indexed dataset with the Pythia tokenizer."""

from __future__ import annotations

import argparse

HELP = "tokenize JSONL documents into a GPT-NeoX indexed dataset (.bin/.idx), as GPT-NeoX did"
DESCRIPTION = """\
Tokenize JSONL documents exactly as GPT-NeoX's tools/preprocess_data.py did for Pythia: each
non-empty document's text is encoded with the GPT-NeoX-20B tokenizer, followed by the EOD token
(0), and stored as one uint16 item. Output: OUTPUT_PREFIX_text_document.{bin,idx}.

Example:
  pythia-jax preprocess --input pile_00.jsonl.zst --output-prefix data/pile --workers 8
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pythia_jax.commands.argtypes import positive_int

    parser.add_argument("--input", required=True,
                        help="JSONL file(s), comma-separated; .gz and .zst are decompressed")
    parser.add_argument("--output-prefix", required=True,
                        help="output path prefix; writes PREFIX_<key>_document.{bin,idx}")
    parser.add_argument("--jsonl-key", default="text", help="JSON field holding the text")
    parser.add_argument("--workers", type=positive_int, default=1, help="tokenizer processes")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json to use (default: the bundled Pythia tokenizer)")


def run(args: argparse.Namespace) -> int:
    from pythia_jax.data.indexed import IndexedDataset, check_dataset_output
    from pythia_jax.data.preprocess import dataset_prefix, preprocess_jsonl
    check_dataset_output(dataset_prefix(args.output_prefix, args.jsonl_key))  # a dataset, or nothing
    prefix = preprocess_jsonl(args.input, args.output_prefix, jsonl_key=args.jsonl_key,
                              workers=args.workers, tokenizer_path=args.tokenizer)
    ds = IndexedDataset(prefix)
    print(f"wrote {prefix}.bin/.idx: {len(ds):,} documents, {ds.num_tokens:,} tokens")
    return 0
