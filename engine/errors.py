"""Errors the engine raises for problems a user can fix (the CLI turns them into one line)."""


class EngineError(Exception):
    """Base class: the message is a sentence that says what to do next."""


class ModelLoadError(EngineError):
    """The model directory cannot be used (missing files, unsupported architecture, bad weights)."""


class ConfigError(EngineError):
    """Engine settings that cannot work together (e.g. a KV budget too small for one block)."""
