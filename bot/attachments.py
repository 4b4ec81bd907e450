"""Text attachments: which files are text, decoding, fitting them into the token budget."""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_BYTES = 100_000  # the largest attachment read (checked from its announced size first)
MAX_NAME = 80
# fmt: off
TEXT_SUFFIXES = frozenset({
    "txt", "md", "markdown", "rst", "log", "csv", "tsv", "json", "jsonl", "yaml", "yml", "toml",
    "ini", "cfg", "conf", "xml", "html", "htm", "css", "js", "ts", "jsx", "tsx", "py", "pyi",
    "ipynb", "c", "h", "cc", "cpp", "hpp", "cs", "java", "kt", "go", "rs", "rb", "php", "pl",
    "lua", "sh", "bash", "zsh", "ps1", "bat", "sql", "r", "swift", "scala", "hs", "ml", "ex",
    "exs", "erl", "clj", "tex", "srt", "vtt", "diff", "patch", "env", "gitignore", "dockerfile",
    "makefile",
})
TEXT_TYPES = frozenset({
    "application/json", "application/xml", "application/x-yaml", "application/yaml",
    "application/toml", "application/javascript", "application/x-sh", "application/sql",
})
# fmt: on
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f]")  # in text files only as a sign of binary data

ONLY_TEXT = "I can only read text files (.txt, .md, .py, .json, .csv, ...); I skipped {name}."
TOO_LARGE = "{name} is too large for me ({size} kB; the limit is {limit} kB), so I skipped it."
UNREADABLE = "I couldn't download {name}; please try again."
CUT = "{name} is longer than I can read at once: I read only its beginning."


@dataclass(frozen=True)
class FileText:
    """A text attachment read for the prompt."""

    name: str
    text: str


def display_name(filename: str) -> str:
    """The attachment's name as shown to the model and users: one line, no markup, short. (Only
    ever shown: attachment names never reach the filesystem.)"""
    name = re.sub(r"[\s`*_~|<>@]+", " ", filename).strip()
    return (name[: MAX_NAME - 3] + "...") if len(name) > MAX_NAME else name or "file"


def is_text_file(filename: str, content_type: str | None) -> bool:
    """A text file by its content type (text/*, JSON, ...) or else by its name's suffix."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind.startswith("text/") or kind in TEXT_TYPES:
        return True
    if kind and not kind.startswith("application/octet-stream"):
        return False  # an image, audio, a PDF, an archive...
    lowered = filename.lower()
    suffix = lowered.rpartition(".")[2] if "." in lowered else lowered
    return suffix in TEXT_SUFFIXES


def decode(data: bytes) -> str | None:
    """The text of a file: by its byte-order mark, else UTF-8, else what charset-normalizer
    guesses (when installed), else Latin-1. None when it looks binary."""
    text: str | None = None
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                return None
            break
    if text is None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = _guess(data)
    if "\x00" in text or len(_CONTROL.findall(text)) > max(8, len(text) // 100):
        return None
    return text.replace("\r\n", "\n")


def _guess(data: bytes) -> str:
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # optional: Latin-1 reads any bytes
        return data.decode("latin-1")
    best = from_bytes(data).best()
    return str(best) if best is not None else data.decode("latin-1")


def fit(text: str, limit: int, count: Callable[[str], int]) -> tuple[str, bool]:
    """The longest beginning of `text` (cut at a line end where one is near) of at most `limit`
    tokens by `count`; (text, whether it was cut). O(log n) counts."""
    if count(text) <= limit:
        return text, False
    low, high = 0, len(text)  # text[:low] fits, text[:high] does not
    while high - low > 1:
        mid = (low + high) // 2
        if count(text[:mid]) <= limit:
            low = mid
        else:
            high = mid
    line = text.rfind("\n", 0, low)
    cut = line if line >= low * 0.8 else low
    return text[:cut], True


def render(files: list[FileText]) -> str:
    """Files as they join the message: a header line each, then the text in a code block."""
    return "\n\n".join(f"[file {f.name}]\n```\n{f.text.replace('```', 'ʼʼʼ')}\n```" for f in files)
