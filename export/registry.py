"""The versioned model registry: publish, list, resolve, use, rollback, delete (torch-free)."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from export.manifest import MANIFEST_NAME, Manifest, ManifestError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # always with fullmatch
VERSION_RE = re.compile(r"v([1-9][0-9]{0,8})")  # a version folder: vN
# A reference to a version: NAME or NAME@N (N with an optional "v"), ASCII digits only.
REF_RE = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})(?:@v?(?P<version>[1-9][0-9]{0,8}))?"
)
SHOWN_CHARS = 80  # at most this much of a bad input is quoted back in an error
ACTIVE_FILE = "active.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"


class RegistryError(Exception):
    """A bad name or reference, an unknown version, or a refused operation; one line for users."""


@dataclass(frozen=True)
class VersionInfo:
    """One published version: REGISTRY/NAME/vN (or a version folder given by path)."""

    name: str
    version: int
    path: Path
    active: bool = False

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def manifest(self, verify_hashes: bool = False) -> Manifest:
        """The manifest, with the folder's files checked against it."""
        return Manifest.load(self.path, verify_hashes=verify_hashes)


def shown(text: object) -> str:
    """`text` quoted for an error message, cut to SHOWN_CHARS (a bad input can be any size)."""
    quoted = repr(str(text))
    return quoted if len(quoted) <= SHOWN_CHARS else quoted[: SHOWN_CHARS - 4] + "...'"


def validate_name(name: str) -> str:
    """The name itself if it is a valid model name; RegistryError otherwise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise RegistryError(
            f"invalid model name {shown(name)}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no path separators, no '..')"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """(NAME, N) of `NAME@N`, (NAME, None) of `NAME`; RegistryError for anything else (one
    strict pattern: what comes from Discord, Redis or the command line is checked the same)."""
    match = REF_RE.fullmatch(ref) if isinstance(ref, str) else None
    if match is None or ".." in match["name"]:
        raise RegistryError(
            f"{shown(ref)} is not a version: give NAME or NAME@N from the registry (NAME: 1-64 "
            "letters, digits, '.', '_' or '-'; N: a version number)"
        )
    version = match["version"]
    return match["name"], None if version is None else int(version)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside `path`, flush it to disk, then os.replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Registry:
    """A registry folder (docs/architecture.md, "Registry and manifest")."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    @property
    def lock(self) -> FileLock:
        """The registry-wide lock for version numbering and pointer changes."""
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / LOCK_FILE), timeout=60)

    # ---- publishing ----------------------------------------------------------------------------
    def publish(self, build: Callable[[Path], Any] | Path, name: str) -> VersionInfo:
        """Build a version in NAME/.tmp-*, then rename it to the next free NAME/vN.

        `build` is a function filling the folder it is given (graph, tokenizer, manifest.json),
        or a finished folder, which is moved in. Nothing is visible until the rename: a build
        that raises is removed; one whose process dies leaves a hidden .tmp-PID-* folder that
        the next publish of NAME removes.
        """
        validate_name(name)
        base = self.root / name
        tmp = base / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        with self.lock:  # NAME/ appears and disappears only under the lock
            base.mkdir(exist_ok=True)
            self.clean_stale(name)
            if not isinstance(build, Path):
                tmp.mkdir()
        try:
            if isinstance(build, Path):
                shutil.move(str(build), str(tmp))
            else:
                build(tmp)
            manifest = Manifest.read(tmp)
            manifest.check_files(tmp)
            with self.lock:
                version = max((v.version for v in self._scan(name)), default=0) + 1
                manifest.name, manifest.version = name, version
                manifest.write(tmp)
                os.rename(tmp, base / f"v{version}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            with self.lock:
                if not any(base.iterdir()):  # a first export of NAME failed: leave no trace
                    base.rmdir()
            raise
        return VersionInfo(name, version, base / f"v{version}")

    def clean_stale(self, name: str) -> list[Path]:
        """Remove NAME/.tmp-PID-* folders whose process is gone; returns what was removed."""
        removed = []
        for path in (self.root / validate_name(name)).glob(f"{TMP_PREFIX}*"):
            pid = path.name[len(TMP_PREFIX) :].split("-", 1)[0]
            if not re.fullmatch(r"[0-9]{1,10}", pid) or not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    # ---- listing and references ----------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and NAME_RE.fullmatch(p.name) and ".." not in p.name
        )

    def _scan(self, name: str) -> list[VersionInfo]:
        base = self.root / name
        if not base.is_dir():
            return []
        found = []
        for path in base.iterdir():
            match = VERSION_RE.fullmatch(path.name)
            if match and path.is_dir():
                found.append(VersionInfo(name, int(match.group(1)), path))
        return sorted(found, key=lambda v: v.version)

    def versions(self, name: str | None = None) -> list[VersionInfo]:
        """Every version (of one name, or of all), oldest first, with the active one marked."""
        names = [validate_name(name)] if name is not None else self.names()
        pointer = self._read_pointer()
        current = (pointer["name"], pointer["version"]) if pointer else None
        return [
            VersionInfo(v.name, v.version, v.path, active=(v.name, v.version) == current)
            for n in names
            for v in self._scan(n)
        ]

    def resolve(self, ref: str | Path) -> VersionInfo:
        """`NAME` (its newest version), `NAME@N`, or a path to a version folder (operators only:
        the CLI and `MODEL`; what comes from Discord goes through `resolve_name`)."""
        text = str(ref)
        if isinstance(ref, Path) or _looks_like_path(text):
            path = Path(text).expanduser()
            if not (path / MANIFEST_NAME).is_file():
                raise RegistryError(f"{path}: not a model version folder (no {MANIFEST_NAME})")
            try:
                manifest = Manifest.read(path)
            except ManifestError as exc:
                raise RegistryError(str(exc)) from None
            return self._marked(VersionInfo(manifest.name, manifest.version, path.resolve()))
        return self.resolve_name(text)

    def resolve_name(self, ref: str) -> VersionInfo:
        """`NAME` (its newest version) or `NAME@N` of this registry; never a path."""
        name, number = parse_ref(ref)
        known = self._scan(name)
        if not known:
            names = ", ".join(self.names()) or "none"
            raise RegistryError(f"no model named {name!r} in {self.root} (models: {names})")
        if number is None:
            return self._marked(known[-1])
        for v in known:
            if v.version == number:
                return self._marked(v)
        listing = ", ".join(str(v.version) for v in known)
        raise RegistryError(f"{name} has no version {number} (versions: {listing})")

    def _marked(self, info: VersionInfo) -> VersionInfo:
        pointer = self._read_pointer()
        active = bool(pointer) and (pointer["name"], pointer["version"]) == (
            info.name,
            info.version,
        )
        inside = info.path.resolve().parent.parent == self.root.resolve()
        return VersionInfo(info.name, info.version, info.path, active=active and inside)

    # ---- the active pointer --------------------------------------------------------------------
    def _read_pointer(self) -> dict[str, Any] | None:
        path = self.root / ACTIVE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path}: unreadable ({exc})") from None
        ok = (
            isinstance(data, dict)
            and isinstance(data.get("name"), str)
            and isinstance(data.get("version"), int)
        )
        if not ok:
            raise RegistryError(f"{path}: expected {{'name': ..., 'version': N, 'history': [...]}}")
        data.setdefault("history", [[data["name"], data["version"]]])
        return data

    def active(self) -> VersionInfo | None:
        """The version active.json points to; None when nothing is active."""
        pointer = self._read_pointer()
        if pointer is None:
            return None
        path = self.root / pointer["name"] / f"v{pointer['version']}"
        if not path.is_dir():
            raise RegistryError(
                f"{self.root / ACTIVE_FILE}: points to {pointer['name']}@{pointer['version']}, "
                "which does not exist"
            )
        return VersionInfo(pointer["name"], pointer["version"], path, active=True)

    def _write_pointer(self, info: VersionInfo, history: list[list[Any]]) -> None:
        data = {"name": info.name, "version": info.version, "history": history}
        _atomic_write_json(self.root / ACTIVE_FILE, data)

    def _inside(self, info: VersionInfo) -> VersionInfo:
        expected = (self.root / info.name / f"v{info.version}").resolve()
        if info.path.resolve() != expected:
            raise RegistryError(f"{info.path}: not a version of the registry {self.root}")
        return info

    def checked(self, ref: str) -> VersionInfo:
        """`NAME` or `NAME@N` of this registry with its files checked against the manifest's
        hashes: what the bot may load when an admin asks for a version from Discord."""
        info = self._inside(self.resolve_name(ref))
        try:
            info.manifest(verify_hashes=True)
        except ManifestError as exc:
            raise RegistryError(f"refusing {info.ref}: {exc}") from None
        return info

    def use(self, ref: str | Path) -> VersionInfo:
        """Make a version the active one (its files are checked first)."""
        info = self._inside(self.resolve(ref))
        try:
            info.manifest()
        except ManifestError as exc:
            raise RegistryError(f"refusing to activate {info.ref}: {exc}") from None
        with self.lock:
            pointer = self._read_pointer()
            history = list(pointer["history"]) if pointer else []
            if not history or history[-1] != [info.name, info.version]:
                history.append([info.name, info.version])
            self._write_pointer(info, history)
        return VersionInfo(info.name, info.version, info.path, active=True)

    def rollback(self, name: str) -> VersionInfo:
        """Re-activate the version of NAME active before the current one, else the next lower."""
        validate_name(name)
        with self.lock:
            pointer = self._read_pointer()
            if pointer is None or pointer["name"] != name:
                active = f"{pointer['name']}@{pointer['version']}" if pointer else "nothing"
                raise RegistryError(f"cannot roll back {name}: it is not active (active: {active})")
            current = pointer["version"]
            existing = {v.version for v in self._scan(name)}
            history = [list(h) for h in pointer["history"]]
            while history and history[-1] == [name, current]:
                history.pop()
            while history and (
                history[-1][0] != name
                or history[-1][1] not in existing
                or history[-1][1] == current
            ):
                history.pop()
            if history:
                target = history[-1][1]
            else:
                lower = [v for v in existing if v < current]
                if not lower:
                    raise RegistryError(f"cannot roll back {name}@{current}: no earlier version")
                target = max(lower)
                history = [[name, target]]
            info = VersionInfo(name, target, self.root / name / f"v{target}", active=True)
            self._write_pointer(info, history)
        return info

    def delete(self, ref: str | Path) -> VersionInfo:
        """Remove a version (never the active one): renamed out of sight, then deleted."""
        info = self._inside(self.resolve(ref))
        with self.lock:
            pointer = self._read_pointer()
            if pointer and (pointer["name"], pointer["version"]) == (info.name, info.version):
                raise RegistryError(f"refusing to delete {info.ref}: it is the active version")
            doomed = info.path.parent / f"{TMP_PREFIX}{os.getpid()}-deleted-{uuid.uuid4().hex[:8]}"
            os.rename(info.path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return info


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith(("~", "."))


def default_registry() -> Path:
    """$MODEL_REGISTRY, else $DATA_DIR/registry, else data/registry: where bot.config looks."""
    if os.environ.get("MODEL_REGISTRY"):
        return Path(os.environ["MODEL_REGISTRY"]).expanduser()
    if os.environ.get("DATA_DIR"):
        return Path(os.environ["DATA_DIR"]).expanduser() / "registry"
    return Path("data/registry")
