"""FinetuneError: why a fine-tuning job cannot start or failed, in one line for users."""


class FinetuneError(Exception):
    """A refusal (no data, no room, a job already running) or a failed step; str() is one line."""
