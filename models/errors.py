"""User-facing errors of the PyTorch side: one line naming the file and the problem."""


class ModelError(Exception):
    """A bad checkpoint, tokenizer, dataset or argument; its message is shown to the user as is."""
