"""Exception types shared by the package; the CLI prints these without a traceback."""

from pythia_jax.config import ConfigError


class PythiaJaxError(Exception):
    """Base class of errors caused by bad input (files, shapes, settings)."""


class CheckpointError(PythiaJaxError):
    """A weights or checkpoint directory that is missing, corrupt or does not match the model."""


class DataError(PythiaJaxError):
    """A dataset file that is missing, truncated or inconsistent."""


class DataFileNotFound(DataError):
    """A dataset file that does not exist (callers may fall back to another layout)."""


__all__ = ["ConfigError", "PythiaJaxError", "CheckpointError", "DataError", "DataFileNotFound"]
