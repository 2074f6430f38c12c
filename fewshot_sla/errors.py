"""The one exception type for mistakes a user can fix (bad path, bad flag, impossible request)."""


class UserError(Exception):
    """A problem the user caused and can fix; the CLI prints it as one line and exits with code 2.

    The message must say what is wrong and how to fix it, in one line.
    """
