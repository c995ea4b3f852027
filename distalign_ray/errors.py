"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class DistalignError(Exception):
    """Bad input detected before any expensive work (spec, model, tracking store, ...)."""


class CheckFailed(Exception):
    """Work finished but its result fails a check (e.g. the binding check): one line, exit code 3."""

    exit_code = 3


class TrackingUnavailable(Exception):
    """The MLflow tracking server stopped answering in the middle of a command: one line, exit code 1.
    Nothing more is sent to it, so no run is reported as finished."""

    exit_code = 1
