"""The one exception type for mistakes a user can fix (bad path, bad flag, impossible request)."""


class UserError(Exception):
    """A problem the user caused and can fix; the CLI prints it as one line and exits with code 2.

    The message must say what is wrong and how to fix it, in one line. ``shared``: every process of a
    distributed run raises the same error at the same point, so only process 0 prints it.
    """

    def __init__(self, message: str, *, shared: bool = False) -> None:
        super().__init__(message)
        self.shared = shared
