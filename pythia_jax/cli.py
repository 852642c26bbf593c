"""The ``pythia-jax`` command: one entry point, one module per subcommand.

Each subcommand lives in ``pythia_jax/commands/<name>.py`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Command modules import heavy libraries
(JAX, torch) inside ``run`` so that ``--help`` stays fast.

Gin flags follow the T5X convention and are accepted by every subcommand that declares
``USES_GIN = True``: ``--gin_file=PATH`` (repeatable) and ``--gin.NAME=VALUE``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from pythia_jax.errors import ConfigError, PythiaJaxError

# (subcommand, module) in the order --help lists them.
SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("train", "pythia_jax.commands.train"),
    ("convert", "pythia_jax.commands.convert"),
    ("eval", "pythia_jax.commands.eval"),
    ("plot", "pythia_jax.commands.plot"),
    ("generate", "pythia_jax.commands.generate"),
    ("preprocess", "pythia_jax.commands.preprocess"),
    ("preshuffle", "pythia_jax.commands.preshuffle"),
    ("batches", "pythia_jax.commands.batches"),
    ("count", "pythia_jax.commands.count"),
    ("count-merge", "pythia_jax.commands.count_merge"),
    ("term-frequency", "pythia_jax.commands.term_frequency"),
    ("info", "pythia_jax.commands.info"),
)

# Subcommands that hand all their arguments to another tool's parser.
PASSTHROUGH_COMMANDS: tuple[tuple[str, str], ...] = (
    ("lm-eval", "pythia_jax.commands.lm_eval"),
)

DESCRIPTION = """\
pythia-jax: train, evaluate and convert Pythia (GPT-NeoX) models in JAX, with the exact
Pythia data order.

Start with the built-in demo:  pythia-jax train --gin_file=configs/demo.gin
"""


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Split ``argv`` into (other args, gin files, gin bindings).

    ``--gin_file=a.gin`` / ``--gin_file a.gin`` and ``--gin.NAME=VALUE`` / ``--gin.NAME VALUE``
    are taken out; everything else is returned in order for argparse.
    """
    rest: list[str] = []
    files: list[str] = []
    bindings: list[str] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--gin_file" or arg == "--gin-file":
            if i + 1 >= len(argv):
                raise SystemExit(f"pythia-jax: {arg} needs a path")
            files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--gin_file=") or arg.startswith("--gin-file="):
            files.append(arg.split("=", 1)[1])
        elif arg.startswith("--gin."):
            body = arg[len("--gin."):]
            if "=" in body:
                name, value = body.split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise SystemExit(f"pythia-jax: {arg} needs a value")
                name, value = body, argv[i + 1]
                i += 1
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
        i += 1
    return rest, files, bindings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pythia-jax", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if getattr(module, "USES_GIN", False):
            p.add_argument("--gin_file", action="append", default=[], metavar="PATH",
                           help="gin file to parse (repeatable; searched in ., configs/)")
            p.add_argument("--gin.NAME=VALUE", dest="_gin_doc", metavar="",
                           help="override one gin binding, e.g. --gin.TrainConfig.num_steps=100")
        module.add_arguments(p)
        p.set_defaults(_module=module)
    for name, module_name in PASSTHROUGH_COMMANDS:  # listed in --help; parsed by the wrapped tool
        module = importlib.import_module(module_name)
        sub.add_parser(name, help=module.HELP, add_help=False).set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = dict(PASSTHROUGH_COMMANDS)
    if argv and argv[0] in passthrough:  # every argument belongs to the wrapped tool
        module = importlib.import_module(passthrough[argv[0]])
        args = argparse.Namespace(command=argv[0], _module=module, passthrough_args=argv[1:])
        return _run(module, args)
    rest, gin_files, gin_bindings = split_gin_flags(argv)
    parser = build_parser()
    args = parser.parse_args(rest)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = args._module
    if (gin_files or gin_bindings) and not getattr(module, "USES_GIN", False):
        parser.error(f"'{args.command}' does not take gin flags")
    args.gin_files = gin_files
    args.gin_bindings = gin_bindings
    return _run(module, args)


def _run(module, args: argparse.Namespace) -> int:
    """Run one subcommand; input errors become one line on stderr and exit status 2."""
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("pythia-jax: interrupted", file=sys.stderr)
        return 130
    except (PythiaJaxError, ConfigError) as e:
        print(f"pythia-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
