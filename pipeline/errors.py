"""Errors a user can act on. Each maps to an exit code; the message names the thing at fault."""


class PipelineError(Exception):
    """Bad input or state that a person must fix; printed without a traceback."""

    exit_code = 2


class ConfigError(PipelineError):
    """A config key, value, Param or --set override is wrong."""


class DataError(PipelineError):
    """Input data cannot be read or does not have the expected shape."""


class ValidationFailed(PipelineError):
    """The data quality gate rejected the snapshot; nothing downstream may run."""

    exit_code = 3


class ModelError(PipelineError):
    """The base model or a trained model cannot be found or loaded."""


class TransientError(PipelineError):
    """A condition that may clear by itself (a busy lock, a lease taken over): try again later."""

    exit_code = 75  # EX_TEMPFAIL: launchers retry it, unlike the verdicts on input (2, 3)
