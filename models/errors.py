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


BUILD_EXTRAS = "install the build extras: pip install -e '.[train]'"


def require_torch(what: str) -> None:
    """A one-line ModelError when PyTorch is not installed (the runtime install has none)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a blocked or half-imported torch
        found = False
    if not found:
        raise ModelError(f"{what} needs PyTorch, which is not installed: {BUILD_EXTRAS}")
