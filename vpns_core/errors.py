"""Errors shared by the config and the methods' own checks, in a module that imports nothing, so
that :mod:`vpns_core.config` and :mod:`vpns_core.methods` need not import each other for them."""


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the field name."""
