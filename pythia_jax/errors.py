"""Exception types shared by the package; the CLI prints these without a traceback.

This module imports nothing from the package, so every layer can raise these without an import
cycle (``pythia_jax.config`` re-exports ``ConfigError`` from here).
"""


class PythiaJaxError(Exception):
    """Base class of errors caused by bad input (files, shapes, settings)."""


class ConfigError(PythiaJaxError, ValueError):
    """A configuration that cannot describe a valid model or run (also a ``ValueError``)."""


class CheckpointError(PythiaJaxError):
    """A weights or checkpoint directory that is missing, corrupt or does not match the model."""


class ParamShapeError(ConfigError, CheckpointError):
    """A parameter tree whose leaves or shapes do not match its ``ModelConfig``.

    Both a ``ConfigError`` (the config does not describe these weights) and a
    ``CheckpointError`` (the weights do not fit the config), so callers catching either see it.
    """


class DataError(PythiaJaxError):
    """A dataset file that is missing, truncated or inconsistent."""


class TokenIdError(DataError, IndexError):
    """Token ids outside ``[0, vocab_size)`` of the model they are fed to (also an ``IndexError``,
    what Hugging Face's embedding lookup raises for them); see ``pythia_jax.model.check_token_ids``."""


class DataFileNotFound(DataError):
    """A dataset file that does not exist (callers may fall back to another layout)."""


class TransformError(DataError):
    """A row transform that is unknown, misconfigured, or broke the row's shape or dtype
    (``pythia_jax.data.transforms``)."""


__all__ = ["ConfigError", "PythiaJaxError", "CheckpointError", "ParamShapeError", "DataError",
           "DataFileNotFound", "TransformError", "TokenIdError"]
