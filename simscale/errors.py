"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits 2."""


class SimscaleError(Exception):
    """A problem with the user's input that names the thing and the fix."""


class ConfigError(SimscaleError):
    """A wrong config key, type or value."""


class DataError(SimscaleError):
    """Missing or unreadable shards, bad sources for `prepare`."""


class CheckpointError(SimscaleError):
    """A missing, truncated or incompatible checkpoint."""


class DeviceError(SimscaleError):
    """GPUs are present but this torch cannot use them (driver too old, CPU-only build, ...)."""
