"""Errors that the CLI turns into one clear line and a non-zero exit."""


class R1jaxError(Exception):
    """Bad input the user can fix: the message names the problem and what to do."""


class CheckpointError(R1jaxError):
    """A checkpoint that cannot be read: missing, corrupt, mismatched or unsafe."""


class ConfigError(R1jaxError):
    """A configuration that cannot be used."""


class DataError(R1jaxError):
    """A dataset that cannot be used: missing, empty, malformed (the message names the file and line)."""


class ToolError(R1jaxError):
    """A tool environment that cannot be built: an unknown tool, a missing or invalid corpus, no sandbox."""


class MetadataError(R1jaxError, ValueError):
    """Example metadata a reward cannot use: a missing key, an unknown task, a code test without check()."""
