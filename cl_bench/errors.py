"""The one error type raised for bad user input (config values, data files)."""


class ConfigError(ValueError):
    """Bad input: the message names the config key, file or record at fault."""
