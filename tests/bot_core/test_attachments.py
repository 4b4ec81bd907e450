"""Text attachments: which files are text, decoding by BOM / UTF-8 / fallback, fitting."""

from __future__ import annotations

import codecs
import sys

import pytest

from bot.attachments import FileText, decode, display_name, fit, is_text_file, render


@pytest.mark.parametrize(
    ("name", "kind", "expected"),
    [
        ("notes.txt", "text/plain; charset=utf-8", True),
        ("README.md", None, True),
        ("main.PY", None, True),
        ("data.json", "application/json", True),
        ("table.csv", "text/csv", True),
        ("Makefile", None, True),
        ("photo.png", "image/png", False),
        ("photo.txt", "image/png", False),  # the content type wins over the name
        ("archive.zip", None, False),
        ("report.pdf", "application/pdf", False),
        ("code.py", "application/octet-stream", True),
    ],
)
def test_text_files_are_told_by_type_then_name(name: str, kind: str | None, expected: bool) -> None:
    assert is_text_file(name, kind) is expected


def test_decode_follows_boms_then_utf8_then_a_fallback() -> None:
    text = "héllo wörld ✓\nsecond line"
    assert decode(text.encode("utf-8")) == text
    assert decode(codecs.BOM_UTF8 + text.encode("utf-8")) == text
    assert decode(text.encode("utf-16")) == text  # Python writes a BOM
    assert decode(codecs.BOM_UTF16_BE + text.encode("utf-16-be")) == text
    assert decode(b"a\r\nb") == "a\nb"
    legacy = "café crème, déjà vu: naïve façade à l'hôtel".encode("latin-1")
    guessed = decode(legacy)  # not UTF-8: charset-normalizer's guess, one character a byte
    assert guessed is not None and len(guessed) == len(legacy)
    assert guessed.startswith("caf") and guessed.endswith("tel")


def test_decode_falls_back_to_latin1_without_charset_normalizer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "charset_normalizer", None)  # import fails
    text = "café crème, déjà vu"
    assert decode(text.encode("latin-1")) == text


def test_binary_data_is_not_text() -> None:
    assert decode(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))) is None
    assert decode(b"\xff\xfe" + b"\x00\xd8") is None  # a broken UTF-16 body


def test_fit_cuts_to_the_limit_at_a_line_end() -> None:
    def count(text: str) -> int:
        return len(text.split())

    text = "\n".join(f"line {i} has five words" for i in range(100))
    assert fit(text, 10_000, count) == (text, False)
    cut, was_cut = fit(text, 52, count)
    assert was_cut and count(cut) <= 52
    assert cut.endswith("five words") and text.startswith(cut)
    assert count(cut) >= 45  # nearly all of the room used


def test_names_are_one_short_line_without_markup() -> None:
    assert display_name("../../etc/passwd") == "../../etc/passwd"  # shown, never opened
    assert display_name("a\nb`c`@everyone.txt") == "a b c everyone.txt"
    assert len(display_name("x" * 500)) == 80
    assert display_name("  ") == "file"


def test_render_keeps_the_code_block_closed() -> None:
    shown = render([FileText("a.md", "```py\nx = 1\n```")])
    assert shown.startswith("[file a.md]\n```\n") and shown.endswith("\n```")
    assert shown.count("```") == 2
