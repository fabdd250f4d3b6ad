"""The project's exception classes.

Every error a user can cause with bad input (a missing file, an unknown name, weights that do not fit a config, a
corrupt image) is raised as one of these, with a message that names what is wrong and where, and the allowed values
where there are any. The command-line entry points catch them (and OSError/ValueError) and print that message as
one line on stderr; ``HYDRA_FULL_ERROR=1`` still shows the full traceback.
"""

from __future__ import annotations


class InstructBlipError(Exception):
    """Base class: a user-facing error whose message is complete on one line."""


class ConfigError(InstructBlipError, ValueError):
    """A configuration value is unknown or inconsistent (an architecture name, a preset, a missing key)."""


class CheckpointError(InstructBlipError):
    """A checkpoint is missing, unreadable, or does not fit the model (missing keys, shapes, vocab size)."""


class DataError(InstructBlipError):
    """An input sample, image or shard is missing or unreadable."""
