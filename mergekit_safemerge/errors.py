"""The one error type users see from SafeMERGE."""


class SafeMergeError(ValueError):
    """A user-facing error whose message is one line naming the key, model or tensor at fault.

    The CLI integration turns it into ``Error: <message>`` (exit status 1) instead of a traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
