"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class SecsweepError(Exception):
    """Base class: the message is one line naming what is wrong and what is allowed."""


class ConfigError(SecsweepError, ValueError):
    """A config field, `--set` key or search-space value is invalid."""


class DatasetMissingError(SecsweepError, FileNotFoundError):
    """A dataset is not on disk and may not be downloaded."""


class ArtifactError(SecsweepError):
    """A stage artifact is missing or does not match its recorded hash."""
