"""The manifest of a checkpoint or export (`fulltune_manifest.json`): every file with its size and SHA-256, written
last and checked before anything is loaded, and the one way to change a file of a finished folder afterwards
(`replace_in_checkpoint`: the file and its entry change together, or not at all, whatever instant a kill comes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fulltune.files.rundir import _kill_point, fsync_dir
from fulltune.files.safestate import file_digest, fsync_file, read_json

MANIFEST = "fulltune_manifest.json"
"""Every file of a checkpoint or export with its size and SHA-256; written last, checked on load."""


def write_manifest(folder: Path) -> None:
    # The model card (README.md) is left out: it is documentation, refreshed once the run's test metrics exist.
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, "README.md"))
    manifest = {
        "format": 1,
        "files": {
            p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_digest(p)} for p in files
        },
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def replace_in_checkpoint(folder: Path, name: str, text: str) -> None:
    """Rewrite one file of a finished checkpoint or export (the run record gains the test metrics once they
    exist) and its manifest entry, so that a kill at any instant leaves the old pair or the new one: the new file
    and the new manifest are written beside (`NAME.new`, `fulltune_manifest.json.new`, the manifest last), then
    renamed, file first; `recover_pending` finishes or undoes what a kill interrupted. A folder without a manifest
    gets only the file's atomic replacement."""
    folder = Path(folder)
    mpath, pending = folder / MANIFEST, folder / (MANIFEST + ".new")
    new_file = folder / (name + ".new")
    new_file.write_text(text, encoding="utf-8")
    fsync_file(new_file)
    if mpath.is_file():
        manifest = read_json(mpath)
        manifest["files"][name] = {"bytes": new_file.stat().st_size, "sha256": file_digest(new_file)}
        tmp = folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        fsync_file(tmp)
        os.replace(tmp, pending)  # from here on the change is committed: recovery rolls it forward
        fsync_dir(folder)
    _kill_point("record-written")
    os.replace(new_file, folder / name)
    _kill_point("record-renamed")
    if pending.is_file():
        os.replace(pending, mpath)
    fsync_dir(folder)


def recover_pending(folder: Path) -> None:
    """Finish a `replace_in_checkpoint` that a kill interrupted: with the new manifest written, roll forward (rename
    the new file, then the manifest); without it, drop the half-made new file."""
    folder = Path(folder)
    pending = folder / (MANIFEST + ".new")
    leftovers = [p for p in folder.glob("*.new") if p != pending]
    if not pending.is_file():
        for p in leftovers:
            p.unlink()
        (folder / (MANIFEST + ".tmp")).unlink(missing_ok=True)
        return
    for p in leftovers:
        os.replace(p, folder / p.name[: -len(".new")])
    os.replace(pending, folder / MANIFEST)
    fsync_dir(folder)


def listed_files(folder: Path, pattern: str) -> list[Path]:
    """The files of `folder` matching `pattern` that its manifest lists (all of them where it has none): a file
    planted beside a checkpoint's weights is never read."""
    folder = Path(folder)
    found = sorted(folder.glob(pattern))
    if not (folder / MANIFEST).is_file():
        return found
    listed = read_json(folder / MANIFEST).get("files", {})
    return [p for p in found if p.relative_to(folder).as_posix() in listed]
