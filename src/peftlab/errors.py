"""Errors that reach the user as one line naming the problem and the fix."""


class PeftlabError(Exception):
    """Base class: the message is one line, names what is wrong and how to fix it."""


class ConfigError(PeftlabError):
    """The configuration (config.yaml or an experiment file) is invalid."""


class DataError(PeftlabError):
    """A task's data is missing, unreadable or inconsistent."""


class ModelError(PeftlabError):
    """A model cannot be found or loaded."""


class TrainingError(PeftlabError):
    """Training diverged or could not run."""
