"""User-facing errors of the PyTorch side: one line naming the file and the problem."""


class ModelError(Exception):
    """A bad checkpoint, tokenizer, dataset or argument; its message is shown to the user as is."""


def first_line(exc: BaseException) -> str:
    """An exception as one line for a ModelError message (its type when it has no text)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def listing(names: list[str], limit: int = 5) -> str:
    """A few names for an error message: "a, b, c (+4 more)"."""
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
