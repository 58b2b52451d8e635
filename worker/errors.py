"""The base of the errors a person running a command can act on."""


class UserError(Exception):
    """Shown as one line with exit status 2 by the CLI, never as a traceback."""
