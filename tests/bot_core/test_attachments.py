"""Text attachments: which files are text, decoding by BOM / UTF-8 / fallback, fitting."""

from __future__ import annotations

import codecs
import sys

import pytest

from bot.attachments import (
    FileText,
    attach,
    decode,
    display_name,
    fit,
    is_text_file,
    render,
)


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
    assert decode(legacy) == "café crème, déjà vu: naïve façade à l'hôtel"


def test_decode_falls_back_to_latin1_without_charset_normalizer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "charset_normalizer", None)  # import fails
    text = "café crème, déjà vu"
    assert decode(text.encode("latin-1")) == text


LEGACY = [  # prose in the code page its language was usually written in before UTF-8
    ("Une crème brûlée, s'il vous plaît… À bientôt, chère amie ; où est la clé ?", "cp1252"),
    ("crème brûlée … à bientôt", "cp1252"),
    ("Grüße aus München! Der Bäcker öffnet um sieben, die Straße ist schön ruhig.", "cp1252"),
    ("¿Dónde está el niño? ¡Qué mañana tan bonita! El señor compró pan.", "cp1252"),
    ("Zażółć gęślą jaźń. Łódź jest pięknym miastem, a świeża kawa smakuje.", "cp1250"),
    ("Dzień dobry, proszę o fakturę za usługę.", "cp1250"),
    ("Привет, как дела? Сегодня хорошая погода, и мы пойдём гулять в парк.", "cp1251"),
    ("Привет, как дела? Сегодня хорошая погода, и мы пойдём гулять в парк.", "koi8_r"),
    ("привет мир, всё хорошо", "koi8_r"),
    ("привет мир, всё хорошо", "cp1251"),
]


@pytest.mark.parametrize(("text", "encoding"), LEGACY)
def test_legacy_code_pages_are_told_apart(text: str, encoding: str) -> None:
    """Not UTF-8: the most plausible of the common code pages, Western first on a tie (French
    in cp1252 also decodes as cp1250: "crčme brűlée ... ŕ bientôt")."""
    assert decode(text.encode(encoding)) == text


def test_utf8_cut_mid_character_by_the_size_limit_stays_utf8() -> None:
    data = "żółw".encode()[:-2]  # "żó" and the first byte of "ł": MAX_BYTES cut there
    assert decode(data) == "żó"


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


def test_attach_budgets_the_headers_and_fences_too() -> None:
    """Ten files with 80-character names: every part of the message (headers, fences, joins)
    fits the budget, each file cut to its share (the names used to be left out of it)."""

    def count(text: str) -> int:
        return len(text.split()) + text.count("\n")

    names = [display_name(f"{i}" + "n" * 100 + ".txt") for i in range(10)]
    files = [FileText(name, "word " * 500) for name in names]
    content, cut, dropped = attach("please compare these", files, 400, count)
    assert count(content) <= 400 and dropped == []
    assert cut == names and all(f"[file {name}]" in content for name in names)
    assert content.startswith("please compare these\n\n[file ")
    small, none_cut, _ = attach("hi", [FileText("a.txt", "```x```")], 400, count)
    assert none_cut == [] and small == "hi\n\n[file a.txt]\n```\nʼʼʼxʼʼʼ\n```"


def test_attach_leaves_out_the_files_whose_headers_do_not_fit() -> None:
    def count(text: str) -> int:  # a character a token: long names cost much
        return len(text)

    files = [FileText(f"{i}" + "n" * 79, "some text " * 50) for i in range(10)]
    content, cut, dropped = attach("look", files, 300, count)
    assert len(content) <= 300 and content.count("[file ") == 2
    assert cut == [f.name for f in files[:2]] and dropped == [f.name for f in files[2:]]
    alone, _, everything = attach("look", files, 50, count)
    assert alone == "look" and everything == [f.name for f in files]
