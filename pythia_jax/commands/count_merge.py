"""``pythia-jax count-merge``: join the per-host shards of ``pythia-jax count`` into one table."""

from __future__ import annotations

import argparse

HELP = "join the host shards of 'pythia-jax count --num-hosts H' into the single-host table"
DESCRIPTION = """\
Each host of 'pythia-jax count --num-hosts H --host-index i --out FILE' writes
FILE.host-0000i-of-0000H.json. Copy them to one place and join them; the table is the one a
single host would have written (checked: same count on every shard, every window exactly once).

Example:
  pythia-jax count-merge --out counts.jsonl counts.jsonl.host-*-of-00032.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="the hosts' FILE.host-*-of-*.json shards")
    parser.add_argument("--out", required=True, help="table: .jsonl or .csv")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    from pythia_jax.data.count import merge_shards

    for what, path in merge_shards(args.shards, args.out, overwrite=args.overwrite).items():
        print(f"wrote {what}: {path}")
    return 0
