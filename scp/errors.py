"""One exception root for the node; subclasses say whether trying again can help."""


class ScpError(Exception):
    """Root of every error raised on purpose by compressing-scp."""


class ConfigError(ScpError):
    """The configuration is invalid; the message names the key path and the bad value."""


class SpoolError(ScpError):
    """The spool could not store or move an instance."""


class CompressionError(ScpError):
    """An instance could not be re-encoded; it is forwarded unchanged instead."""


class ForwardError(ScpError):
    """A delivery to a destination failed."""


class TransientForwardError(ForwardError):
    """A delivery failed in a way that may succeed later (peer down, 0xA7xx, timeout)."""


class PermanentForwardError(ForwardError):
    """A delivery failed in a way that retrying will not fix (0xA9xx, 0xCxxx, no usable context)."""
