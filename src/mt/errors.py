"""The errors `mt` raises for things the user can fix. The CLI prints them on one line and exits with 2."""


class MtError(Exception):
    """A problem with the user's input, files or environment, explained in the message."""


class ConfigError(MtError):
    """A config file or `--set` override that is malformed, misspelt or out of range."""


class DataError(MtError):
    """A corpus that cannot be found, read or aligned."""


class CheckpointError(MtError):
    """A run folder or checkpoint that is missing, incomplete or corrupt."""


class Interrupted(MtError):
    """Training stopped on SIGINT or SIGTERM, after saving a checkpoint."""
