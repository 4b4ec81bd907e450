"""Text attachments: which files are text, decoding, fitting them into the token budget."""

from __future__ import annotations

import codecs
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_BYTES = 100_000  # the largest attachment read (checked from its announced size first)
MAX_NAME = 80
MIN_SHARE = 16  # tokens: a file that would get less than this is left out (with a note)
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
NO_ROOM = "I had no room left to read {name} with the rest, so I skipped it."


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


# Legacy code pages tried (strictly) when a file is not UTF-8, in order of preference: the
# common Western one first, so that it wins every tie (French or German decode plausibly as
# cp1250 too: "crčme"); then Central European, Cyrillic (Windows, KOI8-R). Latin-1 decodes any
# bytes: the last resort.
LEGACY_ENCODINGS = ("cp1252", "cp1250", "cp1251", "koi8_r")
_WORD = re.compile(r"\S+")


def decode(data: bytes) -> str | None:
    """The text of a file: by its byte-order mark, else UTF-8 (strictly; a character cut by
    the MAX_BYTES limit at the end is dropped), else the most plausible legacy code page (see
    `guess_legacy`). None when it looks binary."""
    text: str | None = None
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                return None
            break
    if text is None:
        text = _utf8(data)
    if text is None:
        text = guess_legacy(data)
    if "\x00" in text or len(_CONTROL.findall(text)) > max(8, len(text) // 100):
        return None
    return text.replace("\r\n", "\n")


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data" and exc.start >= len(data) - 3:
            return data[: exc.start].decode("utf-8", errors="strict")  # cut mid-character
        return None


def guess_legacy(data: bytes) -> str:
    """`data` decoded with the LEGACY_ENCODINGS candidate (or charset-normalizer's guess, for
    the scripts they do not cover) whose text is least implausible; ties go to the earlier."""
    candidates: list[str] = []
    for encoding in LEGACY_ENCODINGS:
        try:
            candidates.append(data.decode(encoding))
        except UnicodeDecodeError:
            continue
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # optional
        best = None
    else:
        best = from_bytes(data).best()
    if best is not None:
        candidates.append(str(best))
    candidates.append(data.decode("latin-1"))  # reads any bytes
    return min(candidates, key=implausibility)  # min keeps the first of equals


def implausibility(text: str) -> float:
    """How unlike prose the text looks (0: nothing odd): signs of a wrong code page, counted
    over its words: a symbol between letters ("Za¿ó³æ"), a word whose case goes up in the
    middle ("pRIVET"), letters of two scripts in one word, a word mostly of accented Latin
    letters ("Ïðèâåò"), uppercase letters inside words, control characters."""
    score = 0.0
    for match in _WORD.finditer(text):
        word = match.group()
        if word.isascii():
            continue
        letters = [c for c in word if c.isalpha()]
        inner = word.strip("\"'.,;:!?()[]{}<>«»-")
        for i in range(1, len(inner) - 1):
            c = inner[i]
            if (
                not c.isascii()
                and not c.isalpha()
                and inner[i - 1].isalpha()
                and inner[i + 1].isalpha()
            ):
                score += 2
        if any(a.islower() and b.isupper() for a, b in itertools.pairwise(letters)):
            score += 2
        scripts = {_script(c) for c in letters} - {"other"}
        if len(scripts) > 1:
            score += 2
        accented = sum(1 for c in letters if not c.isascii() and _script(c) == "latin")
        if len(letters) >= 4 and accented * 2 > len(letters):
            score += 1
        score += 0.5 * sum(1 for c in letters[1:] if c.isupper() and not c.isascii())
    score += 3 * sum(1 for c in text if ("\x80" <= c <= "\x9f") or (c < " " and c not in "\t\n\r"))
    return score


def _script(c: str) -> str:
    o = ord(c)
    if o < 0x250:
        return "latin"
    if 0x370 <= o < 0x400:
        return "greek"
    if 0x400 <= o < 0x530:
        return "cyrillic"
    return "other"


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
    return "\n\n".join(f"[file {f.name}]\n```\n{_fenced(f.text)}\n```" for f in files)


def _fenced(text: str) -> str:
    return text.replace("```", "ʼʼʼ")  # a file cannot close its code block


def attach(
    content: str, files: list[FileText], budget: int, count: Callable[[str], int]
) -> tuple[str, list[str], list[str]]:
    """The message's text with the files rendered after it, all of it (the `[file NAME]`
    headers, the fences, the joins) within `budget` tokens by `count` where the message's own
    text leaves room: each file cut to its share of what is left, and the last files left out
    when there is no room for their headers and MIN_SHARE tokens each. Also the names of the
    files cut, and of those left out."""

    def joined(parts: list[FileText]) -> str:
        return "\n\n".join(part for part in (content, render(parts)) if part)

    files = [FileText(f.name, _fenced(f.text)) for f in files]
    if not files or count(joined(files)) <= budget:
        return joined(files), [], []
    dropped: list[str] = []
    frame = count(joined([FileText(f.name, "") for f in files]))  # all but the files' texts
    while len(files) > 1 and budget - frame < MIN_SHARE * len(files):
        dropped.insert(0, files.pop().name)
        frame = count(joined([FileText(f.name, "") for f in files]))
    if budget - frame < MIN_SHARE:  # not even one file fits: the message goes alone
        return content, [], [files[0].name, *dropped]
    room = budget - frame
    for _ in range(4):  # tokens may merge differently at the joins: check the whole, again
        left, out, cut = room, [], []
        for i, f in enumerate(files):
            share = max(0, left) // (len(files) - i)  # this file's part of what is left
            text, was_cut = fit(f.text, share, count)
            left -= count(text)
            out.append(FileText(f.name, text))
            if was_cut:
                cut.append(f.name)
        over = count(joined(out)) - budget
        if over <= 0 or room <= 0:
            break
        room = max(0, room - over)
    return joined(out), cut, dropped
