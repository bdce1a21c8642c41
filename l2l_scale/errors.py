"""Project exceptions.

Every user error raised by l2l-scale is a subclass of :class:`L2LError`. Its message is one line that names the
problem and the fix; the CLI prints it and exits with code 2 (traceback only with ``--debug``).
"""


class L2LError(Exception):
    """Base class of all user-facing errors (bad input, bad option, refused output)."""


class InputError(L2LError):
    """An input path is missing, unreadable, or not in a supported format."""


class OutputError(L2LError):
    """An output cannot be written: it exists without ``--overwrite``, is locked, or is not writable."""


class ChannelError(L2LError):
    """A requested channel does not exist or does not match what a model or mode needs."""


class ConfigError(L2LError):
    """An option or config file value is invalid."""


class ModelError(L2LError):
    """A model folder is missing, corrupt, unsupported or unsafe to load."""
