"""Gin at the edges: the only module that registers configurables and parses gin files.

Layers and pure functions never read gin; the CLI parses gin here and passes plain
dataclasses down. Binding an unknown name is an error raised before any compute starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tokenize
from pathlib import Path
from typing import Sequence

import gin

from pythia_jax.config import ConfigError, ModelConfig

REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

_registered = False


def register_configurables() -> None:
    """Register every gin-configurable class once (idempotent)."""
    global _registered
    if _registered:
        return
    gin.external_configurable(ModelConfig, module="pythia_jax")
    gin.external_configurable(ModelConfig.preset, name="model_preset", module="pythia_jax")
    from pythia_jax.train import config as train_config

    train_config.register_gin()
    _registered = True


def search_paths() -> list[str]:
    """Where relative gin file names are looked up: the cwd, then the repository's configs/."""
    return [os.getcwd(), str(REPO_CONFIG_DIR), str(REPO_CONFIG_DIR.parent)]


def resolve_gin_file(name: str) -> str:
    """Absolute path of a gin file given as a path or relative to a search path."""
    candidates = [name] if os.path.isabs(name) else [os.path.join(p, name) for p in search_paths()]
    for c in candidates:
        if os.path.isfile(c):
            return c
    folders = [c for c in candidates if os.path.isdir(c)]
    if folders:
        raise ConfigError(f"gin file {name!r} is a folder ({folders[0]}); pass a .gin file, e.g. configs/demo.gin")
    raise ConfigError(f"gin file {name!r} not found (looked in: {', '.join(search_paths())})")


def parse(files: Sequence[str] = (), bindings: Sequence[str] = ()) -> None:
    """Clear gin, then parse ``files`` and ``bindings`` (``"A.b = 1"`` strings) in order."""
    register_configurables()
    gin.clear_config()
    for p in search_paths():
        gin.add_config_file_search_path(p)
    paths = [resolve_gin_file(f) for f in files]
    for binding in bindings:
        check_binding_syntax(binding)
    try:
        with _quiet_search_path_misses():
            gin.parse_config_files_and_bindings(paths, list(bindings), finalize_config=False)
    except (ValueError, KeyError, SyntaxError, tokenize.TokenError) as e:
        raise ConfigError(f"bad gin configuration: {e}") from None


class _SyntaxOnly(gin.config_parser.ParserDelegate):
    """Parses references and macros without resolving them (a syntax check only)."""

    def configurable_reference(self, scoped_configurable_name, evaluate):
        return None

    def macro(self, macro_name):
        return None


def check_binding_syntax(binding: str) -> None:
    """Raise ConfigError when ``binding`` (``"A.b = value"``) is not valid gin, saying how to write it.

    Gin values are Python literals (``'text'``, ``1``, ``[1, 2]``, ``None``) or ``@references`` /
    ``%MACROS``; a bare word such as ``runs/x`` is the usual mistake: a string needs quotes that
    survive the shell, e.g. ``--gin.TrainConfig.output_dir="'runs/x'"``.
    """
    try:
        for _ in gin.config_parser.ConfigParser(binding, _SyntaxOnly()):
            pass
    except (SyntaxError, ValueError, tokenize.TokenError) as e:
        name, _, value = (part.strip() for part in binding.partition("="))
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        if value and not quoted and value[0] not in "[({@%":  # a bare word: an unquoted string
            text = value.replace("'", "\\'")
            raise ConfigError(
                f"--gin.{name}={value}: gin values are Python literals and {value!r} is not one; quote a "
                f"string inside the shell's quotes: --gin.{name}=\"'{text}'\" (numbers, True/False, None, "
                "lists and @references need no quotes)") from None
        detail = " ".join(str(getattr(e, "msg", None) or e).split())
        raise ConfigError(f"--gin.{name}={value}: not a valid gin value ({detail})") from None


def _not_a_search_path_miss(record: logging.LogRecord) -> bool:
    """False for gin's 'Path not found' log lines: each include is tried in every search path."""
    return not str(record.getMessage()).startswith("Path not found")


@contextlib.contextmanager
def _quiet_search_path_misses():
    # gin logs through the root logger (logging.error), so a filter on that logger is enough
    root = logging.getLogger()
    root.addFilter(_not_a_search_path_miss)
    try:
        yield
    finally:
        root.removeFilter(_not_a_search_path_miss)
