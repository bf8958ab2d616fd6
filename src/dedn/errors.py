"""Exceptions raised for bad input.

Every error a user can cause (a missing file, a malformed mask, an unknown config key) is raised as a
subclass of :class:`DednError`, with a message that names the file or value and what was expected. The
command line prints the message and exits with status 2 instead of showing a traceback.
"""


class DednError(Exception):
    """Base class of every error caused by the user's input."""


class DataError(DednError, ValueError):
    """A data set, image, mask, split or episode file is missing or malformed."""


class ConfigError(DednError, ValueError):
    """A configuration file or override is invalid."""


class CheckpointError(DednError, ValueError):
    """A checkpoint or weight file does not fit the model it is loaded into."""


class OutputError(DednError, ValueError):
    """An output folder or file cannot be created (a path under a regular file, no permission, ...)."""
