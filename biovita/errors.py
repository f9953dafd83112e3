"""Errors that carry a reason a user can act on."""


class MediaError(ValueError):
    """A clip or image that cannot be used; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class BenchmarkError(ValueError):
    """A malformed benchmark or feature folder; the message names the file (and row)."""


class FetchError(ValueError):
    """A URL list that cannot be fetched as given (raised before any download starts)."""
