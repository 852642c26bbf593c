"""Gin at the edges: the only module that registers configurables and parses gin files.

Layers and pure functions never read gin; the CLI parses gin here and passes plain
dataclasses down. Binding an unknown name is an error raised before any compute starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
    raise ConfigError(f"gin file {name!r} not found (looked in: {', '.join(search_paths())})")


def parse(files: Sequence[str] = (), bindings: Sequence[str] = ()) -> None:
    """Clear gin, then parse ``files`` and ``bindings`` (``"A.b = 1"`` strings) in order."""
    register_configurables()
    gin.clear_config()
    for p in search_paths():
        gin.add_config_file_search_path(p)
    paths = [resolve_gin_file(f) for f in files]
    try:
        with _quiet_search_path_misses():
            gin.parse_config_files_and_bindings(paths, list(bindings), finalize_config=False)
    except (ValueError, KeyError, SyntaxError) as e:
        raise ConfigError(f"bad gin configuration: {e}") from None


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
