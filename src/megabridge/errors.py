"""Errors that are the user's to fix: the CLI prints them as one line and exits with 2."""


class UserError(Exception):
    """Bad input: a wrong path, option, checkpoint or file. The message names the thing."""


class ConfigError(UserError):
    """An unknown override key, a value of the wrong type, or an inconsistent config."""


class ConversionError(UserError):
    """A checkpoint that does not match its model: missing, unexpected or misshapen tensors."""


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed: missing, incomplete, or made for another model."""
