"""The embedded demo data set: standard-library docstrings labelled by the family of their module.

Owns the module-to-family mapping, the deterministic collection, de-duplication and hash split of the
docstrings, and the cached ``train/val/test.jsonl`` files that ``fulltune demo`` fine-tunes on.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import hashlib
import importlib
import inspect
import io
import json
import pkgutil
import platform
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from fulltune.files.rundir import write_atomic

# Chosen so that every family has 140-660 texts and a frozen-encoder probe lands near 79% (see
# bench/docstring_probe.py). Left out on purpose: packages whose docstrings keep naming themselves and
# would dominate their family or make it trivial (decimal, unittest, asyncio, email, ipaddress, smtplib,
# imaplib, inspect, typing), and modules whose family is arguable (selectors, contextlib, builtins, sys).
# Modules removed in 3.12/3.13 are avoided so that Python 3.10-3.13 build similar data sets.
# fmt: off
FAMILIES: dict[str, tuple[str, ...]] = {
    "text": (
        "re", "string", "textwrap", "difflib", "unicodedata", "stringprep", "codecs", "locale", "gettext",
        "shlex", "pprint", "reprlib",
    ),
    "files": (
        "os.path", "genericpath", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "fileinput",
        "stat", "io", "linecache", "os",
    ),
    "math": ("math", "cmath", "fractions", "random", "statistics", "numbers", "secrets"),
    "network": ("socket", "ssl", "http", "urllib", "ftplib", "socketserver"),
    "concurrency": (
        "threading", "multiprocessing", "concurrent", "queue", "subprocess", "signal", "contextvars",
    ),
    "data_structures": (
        "collections", "heapq", "bisect", "array", "weakref", "copy", "enum", "types", "dataclasses",
        "itertools", "functools", "graphlib", "operator",
    ),
    "formats": (
        "json", "csv", "pickle", "xml", "html", "configparser", "tomllib", "zipfile", "tarfile", "base64",
        "binascii", "gzip", "bz2", "lzma", "zlib", "plistlib", "mimetypes", "quopri", "shelve", "struct",
        "mailbox",
    ),
    "developer_tools": ("pdb", "ast", "argparse", "importlib", "logging"),
    # sched could pass for concurrency too; a module may sit in one family only, and it schedules by time.
    "time": ("time", "datetime", "calendar", "zoneinfo", "sched", "timeit", "_strptime"),
}
# fmt: on

LABELS: tuple[str, ...] = tuple(FAMILIES)
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Never imported, even as a submodule: they open windows or browsers, print on import, write files
# (lib2to3's grammar cache), or emit terminal escape codes straight to fd 1 (readline).
# fmt: off
SKIP: frozenset[str] = frozenset({
    "__hello__", "__phello__", "__main__", "antigravity", "this", "tkinter", "turtle", "turtledemo", "idlelib",
    "lib2to3", "readline", "rlcompleter", "ensurepip", "venv", "test", "tests", "idle_test", "distutils",
})
# fmt: on

MIN_CHARS = 40  # shorter docstrings are mostly "Return self==value." boilerplate with no family signal
MAX_CHARS = 1500  # a few docstrings are whole manuals; the encoder only reads ~128 tokens anyway
MAX_DEPTH = 3  # xml.etree.ElementTree and xml.dom.minidom sit two levels below their top-level package
MAX_SUBMODULES = 200  # per mapped package; a guard against a surprise explosion on some future Python
FORMAT_VERSION = 1  # bump when the collection rules change so that cached files are rebuilt


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings and Python-level stdout/stderr while importing arbitrary stdlib modules."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def _import(name: str) -> ModuleType | None:
    if any(part in SKIP for part in name.split(".")):
        return None
    try:
        return importlib.import_module(name)
    except BaseException:  # SystemExit/ImportError/OSError from platform-only modules: just skip
        return None


def _walk(name: str) -> list[ModuleType]:
    """The module `name` and, if it is a package, its submodules in sorted order, bounded in depth and number."""
    root = _import(name)
    if root is None:
        return []
    found = [root]
    pending: list[tuple[ModuleType, int]] = [(root, 1)]
    while pending and len(found) <= MAX_SUBMODULES:
        package, depth = pending.pop(0)
        path = getattr(package, "__path__", None)
        if path is None or depth > MAX_DEPTH:
            continue
        children = sorted(pkgutil.iter_modules(path, package.__name__ + "."), key=lambda info: info.name)
        for info in children:
            leaf = info.name.rsplit(".", 1)[-1]
            if leaf.startswith("test_"):
                continue
            module = _import(info.name)
            if module is None:
                continue
            found.append(module)
            if info.ispkg:
                pending.append((module, depth + 1))
    return found[: MAX_SUBMODULES + 1]


def _owned(obj: Any, owners: frozenset[str]) -> bool:
    home = getattr(obj, "__module__", None)
    return isinstance(home, str) and home in owners  # some objects expose odd, even unhashable, __module__s


def _member_doc(name: str, value: Any, owners: frozenset[str] | None = None) -> str | None:
    """Docstring of one class attribute, or None if it is not a method/property or carries only boilerplate.

    With `owners`, a Python-level member defined in any other module is refused: third-party packages
    patch stdlib classes (transformers adds `warning_once` to logging.Logger), and their docstrings must
    not leak into the data set depending on what the process happened to import first.
    """
    if name.startswith("__") and name.endswith("__"):
        # Dunder docs are generic protocol text ("Return self<value."), except a hand-written __init__.
        if not (name == "__init__" and inspect.isfunction(value)):
            return None
    if isinstance(value, (classmethod, staticmethod)):
        value = value.__func__
    if owners is not None:
        code = value.fget if isinstance(value, property) else value
        # C-level descriptors carry no __module__ (None here) and can only come from the class itself.
        home = getattr(code, "__module__", None)
        if isinstance(home, str) and home not in owners:
            return None
    if not (
        inspect.isroutine(value)
        or isinstance(value, property)
        or inspect.isgetsetdescriptor(value)
        or inspect.ismemberdescriptor(value)
    ):
        return None  # plain data: its __doc__ would be that of its type (str, int, ...)
    doc = getattr(value, "__doc__", None)
    return doc if isinstance(doc, str) else None


def _raw_docs(module: ModuleType, top: str) -> Iterator[str]:
    # Objects count as the module's own if defined there or in its C accelerator (_heapq for heapq, _io for
    # io): that is where most builtin classes and functions live. Re-exports from elsewhere are left to
    # the module that defines them, so a text keeps the label of its true home.
    owners = frozenset({module.__name__, "_" + top})
    if isinstance(module.__doc__, str):
        yield module.__doc__
    for _, obj in sorted(vars(module).items()):
        if not _owned(obj, owners):
            continue
        if inspect.isclass(obj):
            if isinstance(obj.__doc__, str):
                yield obj.__doc__
            for member_name, value in sorted(vars(obj).items()):
                doc = _member_doc(member_name, value, owners)
                if doc is not None:
                    yield doc
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            if isinstance(obj.__doc__, str):
                yield obj.__doc__


@functools.lru_cache(maxsize=1)
def _boilerplate() -> frozenset[str]:
    """Docstrings that the language machinery stamps onto every class, enum or namedtuple.

    They turn up in dozens of modules ("Create and return a new object.", "Return a new dict which maps
    field names to their values.") and say nothing about the module they were found in.
    """
    probes: list[type] = [object, type, collections.namedtuple("_Probe", "a")]
    kinds = [enum.Enum, enum.IntEnum, enum.Flag, enum.IntFlag, getattr(enum, "StrEnum", enum.Enum)]  # StrEnum: 3.11+
    probes += [kind("_Probe", "A") for kind in kinds]
    texts = set()
    for probe in probes:
        for name, value in vars(probe).items():
            doc = _member_doc(name, value)
            if doc is not None:
                texts.add(inspect.cleandoc(doc).strip())
    return frozenset(texts)


def normalise(doc: str) -> str | None:
    """Clean a raw docstring; None if it is too short to carry a label."""
    text = inspect.cleandoc(doc).strip()
    if len(text) < MIN_CHARS or text in _boilerplate():
        return None
    return text[:MAX_CHARS].rstrip()


def module_texts(name: str) -> list[str]:
    """Sorted unique normalised docstrings of one mapped module (and its submodules); [] if it won't import."""
    if name.split(".")[0] not in sys.stdlib_module_names:
        return []  # the demo must never depend on (or execute) anything outside the standard library
    top = name.split(".")[0]
    texts: set[str] = set()
    with _quiet():
        # Import the whole tree first: a package's namespace can still change while its submodules load.
        modules = _walk(name)
        for module in modules:
            for doc in _raw_docs(module, top):
                text = normalise(doc)
                if text is not None:
                    texts.add(text)
    return sorted(texts)


def _digest(text: str) -> bytes:
    # Hash the whitespace-collapsed text so that re-indented copies of one docstring share a split.
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).digest()


def split_of(text: str) -> str:
    """'train', 'val' or 'test' for a text: 80/10/10 by a hash of its normalised content, stable everywhere."""
    bucket = int.from_bytes(_digest(text)[:8], "big") % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def collect_docstrings(families: Mapping[str, tuple[str, ...]] | None = None) -> list[tuple[str, str]]:
    """(text, label) pairs for every mapped module; unique by text, ambiguous texts dropped, in hash order.

    `families` defaults to FAMILIES. The order is by the hash of the text, not by label, so any prefix of
    the list (or of a split file) is a representative sample.
    """
    families = FAMILIES if families is None else families
    labels_of: dict[str, set[str]] = {}
    for label, names in families.items():
        for name in names:
            for text in module_texts(name):
                labels_of.setdefault(text, set()).add(label)
    # A text found under two families ("Return the name of ...") says nothing about either: drop it.
    pairs = [(text, next(iter(labels))) for text, labels in labels_of.items() if len(labels) == 1]
    pairs.sort(key=lambda pair: (_digest(pair[0]), pair[0]))
    return pairs


def _jsonl(rows: list[tuple[str, str]]) -> bytes:
    lines = (json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n" for text, label in rows)
    return "".join(lines).encode("utf-8")


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def build_docstring_dataset(out_dir: str | Path) -> dict[str, Path]:
    """Write train/val/test.jsonl ({"text", "label"} per line) plus manifest.json into out_dir.

    Files are reused untouched when manifest.json records the same content hash and the files on disk
    still match it. Returns the paths keyed by split.
    """
    out = Path(out_dir)
    rows = collect_docstrings()
    by_split: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    for text, label in rows:
        by_split[split_of(text)].append((text, label))
    blobs = {split: _jsonl(by_split[split]) for split in SPLITS}
    file_hashes = {split: _sha1(blobs[split]) for split in SPLITS}
    content_hash = _sha1(json.dumps(file_hashes, sort_keys=True).encode("utf-8"))
    paths = {split: out / f"{split}.jsonl" for split in SPLITS}
    manifest_path = out / "manifest.json"

    if _reusable(manifest_path, paths, content_hash, file_hashes):
        return paths

    counts = {split: {label: 0 for label in LABELS} for split in SPLITS}
    for split, split_rows in by_split.items():
        for _, label in split_rows:
            counts[split][label] = counts[split].get(label, 0) + 1
    manifest = {
        "format_version": FORMAT_VERSION,
        "python": platform.python_version(),
        "content_sha1": content_hash,
        "files_sha1": file_hashes,
        "total": len(rows),
        "counts": counts,
    }
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        write_atomic(paths[split], blobs[split])
    # The manifest goes last: its presence vouches for the three files written before it.
    write_atomic(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return paths


def _reusable(manifest_path: Path, paths: dict[str, Path], content_hash: str, file_hashes: dict[str, str]) -> bool:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("content_sha1") != content_hash or manifest.get("format_version") != FORMAT_VERSION:
            return False
        return all(_sha1(paths[split].read_bytes()) == file_hashes[split] for split in SPLITS)
    except (OSError, ValueError, AttributeError):
        return False
