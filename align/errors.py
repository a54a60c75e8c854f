"""User-facing errors: the CLI prints these as one line and exits 2."""


class AlignError(Exception):
    """An error caused by user input (config, data, paths); shown without a traceback."""


class ConfigError(AlignError):
    """A recipe or override is wrong: unknown key, wrong type, bad value."""


class DataError(AlignError):
    """A dataset file or row is unusable."""
