"""The manifest of a checkpoint or export (`fulltune_manifest.json`): every file with its size and SHA-256, written
last and checked before anything is loaded, and the one way to change a file of a finished folder afterwards
(`replace_in_checkpoint`: the file and its entry change together, or not at all, whatever instant a kill comes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fulltune.errors import ConfigError
from fulltune.files.rundir import (  # noqa: F401
    atomic_dir,
    claim_output_dir,
    fsync_dir,
    kill_point,
    recover_run_dir,
    release_run_lock,
    write_atomic,
)
from fulltune.files.safestate import (
    StateFileError,
    check_tensors_header,
    file_digest,
    fsync_file,
    read_json,
    require_safetensors,
)

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
    kill_point("record-written")
    os.replace(new_file, folder / name)
    kill_point("record-renamed")
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


STATE_DIR = "training_state"


RUN_META = "fulltune_run.json"


LEGACY_PICKLES = ("optimizer.pt", "rng.pt")


class DamagedCheckpoint(ConfigError):
    """A checkpoint that is incomplete, damaged or unsafe to load; the message names the folder and the file."""


_VERIFIED: dict[Path, int] = {}


def verify_checkpoint(path: Path, resumable: bool = True) -> None:
    """Check a checkpoint (or an export when `resumable=False`) against its manifest: every file present with its
    size and SHA-256, readable safetensors headers, and, for a resume point, the complete training state."""
    path = Path(path)
    recover_pending(path)
    state_dir = path / STATE_DIR
    for legacy in LEGACY_PICKLES:
        if (state_dir / legacy).exists() and not (state_dir / "optimizer.json").exists():
            raise DamagedCheckpoint(
                f"checkpoint '{path}': {STATE_DIR}/{legacy} is a pickle (written by an older fulltune, or planted); "
                "it is never loaded, because unpickling can run code"
            )
    mpath = path / MANIFEST
    try:
        stamp = mpath.stat().st_mtime_ns
    except FileNotFoundError:
        raise DamagedCheckpoint(f"checkpoint '{path}' is incomplete: {MANIFEST} is missing") from None
    if _VERIFIED.get(path.resolve()) == stamp:
        return
    try:
        manifest = read_json(mpath)
        files = manifest["files"]
        assert isinstance(files, dict)
    except (StateFileError, KeyError, TypeError, AssertionError):
        raise DamagedCheckpoint(f"checkpoint '{path}': {MANIFEST} is damaged") from None
    required = ["config.json", RUN_META]
    if resumable:
        required += [f"{STATE_DIR}/{n}" for n in ("trainer_state.json", "optimizer.json", "rng.json")]
    for name in required:
        if name not in files:
            raise DamagedCheckpoint(f"checkpoint '{path}' is incomplete: {name} is not in its manifest")
    if not any(n.endswith(".safetensors") and "/" not in n for n in files):
        raise DamagedCheckpoint(f"checkpoint '{path}' has no .safetensors weights")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise DamagedCheckpoint(f"checkpoint '{path}' is incomplete: '{f}' is missing")
        size = f.stat().st_size
        if size != info.get("bytes"):
            raise DamagedCheckpoint(
                f"checkpoint '{path}' is damaged: '{f}' has {size} bytes, {info.get('bytes')} were written"
            )
        if file_digest(f) != info.get("sha256"):
            raise DamagedCheckpoint(f"checkpoint '{path}' is damaged: '{f}' does not match its SHA-256 in {MANIFEST}")
        if name.endswith(".safetensors"):
            try:
                check_tensors_header(f)
            except StateFileError as err:
                raise DamagedCheckpoint(f"checkpoint '{path}': {err}") from None
    _VERIFIED[path.resolve()] = stamp


MODEL_JSON = (
    "config.json",
    RUN_META,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "model.safetensors.index.json",
)
"""The JSON files of a model folder that transformers or fulltune read when loading it."""


def check_model_folder(folder: Path, what: str) -> None:
    """A model folder (an export, or a pretrained model on disk) reads back before transformers meets it: its JSON
    files parse, it holds safetensors weights (never only a pickle) and each one's header is sound and fully
    present. Cheap (no tensor is read); the checks a manifest cannot make where there is none. Damage is a
    DamagedCheckpoint naming `what`, the folder and the file."""
    folder = Path(folder)
    require_safetensors(folder, what)
    weights = listed_files(folder, "*.safetensors")
    if not weights:
        raise DamagedCheckpoint(f"{what} '{folder}' holds no .safetensors weights")
    try:
        for name in MODEL_JSON:
            if (folder / name).is_file():
                read_json(folder / name)
        for f in weights:
            check_tensors_header(f)
    except StateFileError as err:
        raise DamagedCheckpoint(f"{what} '{folder}': {err}") from None
