"""The one exception type users see: its message is printed as a single line by the CLI."""


class CandorError(Exception):
    """A problem the user can act on (bad path, bad setting, bad input). The CLI prints
    `candor: error: <message>` and exits with status 2, without a traceback."""
