"""Errors meant for users (bad option, missing file, unsupported checkpoint). The CLI prints their message
without a traceback and exits with status 2; library callers can catch them like any exception.
The message must say what was wrong and what to do next."""


class UserError(Exception):
    """A mistake the user can fix; the message says how."""
