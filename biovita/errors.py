"""Errors that carry a reason a user can act on: the CLI prints each as one line."""


class ConfigError(ValueError):
    """A configuration problem, always naming the offending key."""


class MediaError(ValueError):
    """A clip or image that cannot be used; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class StoreError(ValueError):
    """A media store that cannot be used as it is (a table missing, a wrong schema); the
    message names the files."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the key."""


class PretrainedWeightsError(RuntimeError):
    """`require_pretrained` was set but a tower has no pretrained weights."""


class BenchmarkError(ValueError):
    """A malformed benchmark or feature folder; the message names the file (and row)."""


class FetchError(ValueError):
    """A URL list that cannot be fetched as given (raised before any download starts)."""


# what the CLI reports as one line (exit status 2) instead of a traceback
USER_ERRORS = (ConfigError, MediaError, StoreError, CheckpointError, PretrainedWeightsError,
               BenchmarkError, FetchError, FileNotFoundError)
