"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class DistalignError(Exception):
    """Bad input detected before any expensive work (spec, model, tracking store, ...)."""
