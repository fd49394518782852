"""The one exception type users see: a clear message, no traceback spaghetti."""


class EmolensError(Exception):
    """A user-facing error whose message says what is wrong and where."""
