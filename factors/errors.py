"""Errors raised by the numeric core.

Every class is one line under one root, :class:`FactorsError`. The docstring says what
the caller (an operator or an ML engineer) should do about it.
"""


class FactorsError(Exception):
    """Root of every error raised by ``factors``."""


class DataError(FactorsError, ValueError):
    """Input interactions are malformed: fix the file named in the message, or pass ``skip_bad``."""


class ModelFitError(FactorsError, ArithmeticError):
    """Training produced NaN or inf factors: lower ``alpha``, raise ``regularization``, or check the weights."""


class ArtifactError(FactorsError, ValueError):
    """A model directory is missing, corrupt or of another format version: re-train or restore it."""


class ConfigError(FactorsError, ValueError):
    """A numeric parameter is out of range: the message names the value received and the value expected."""
