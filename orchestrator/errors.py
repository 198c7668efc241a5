"""Errors a user can act on. The CLI prints these as one line (no traceback) and exits 2."""


class OrchestratorError(Exception):
    """Base class: the message names the problem and, where there is one, the config key."""


class ConfigError(OrchestratorError):
    """A config value, path or input file is wrong."""


class JudgeError(OrchestratorError):
    """The judge produced no usable scores."""
