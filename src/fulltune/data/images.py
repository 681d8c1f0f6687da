"""Image classification data from class folders (train/ val/ test/ each holding one folder per class), with
train-time augmentation done in PIL + torch (no torchvision) and seeded per example, and `prepare-images`.
"""

from __future__ import annotations

import math
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from fulltune.config import AugmentationConfig
from fulltune.data.records import capped
from fulltune.data.text import hash_fraction
from fulltune.errors import DataError
from fulltune.files.rundir import atomic_output, claim_output


@dataclass
class ImageSpec:
    """How images are turned into pixel_values for this model."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    processor: Any = field(default=None, repr=False, compare=False)
    """The transformers image processor that evaluation and prediction use (the one the export saves)."""


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SKIPPED_LABEL = -100
"""The label of an evaluation item whose image fails to decode: scored by nothing, counted as skipped."""


def _complete(path: Path, fmt: str | None) -> bool:
    """A JPEG ends with its end-of-image marker and a PNG with its IEND chunk: a cheap test for truncated files
    (reads the last bytes only)."""
    if fmt not in ("JPEG", "PNG"):
        return True
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 1024))
        tail = f.read().rstrip(b"\x00")  # some cameras pad JPEGs with zeros after the marker
    return tail.endswith(b"\xff\xd9") if fmt == "JPEG" else tail.endswith(b"IEND\xaeB`\x82")


def _readable(path: Path) -> bool:
    """Cheap check that PIL can decode the file: a parsed header of a sane size (no decompression bomb), and a JPEG
    or PNG that is not truncated. What still fails to decode later is replaced in training and skipped in
    evaluation (see ImageDataset)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.size  # noqa: B018 - touching size parses the header
                fmt = im.format
        return _complete(path, fmt)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return False


@dataclass
class ImageFolder:
    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]
    skipped: list[Path]


def scan_split(root: Path, classes: list[str] | None = None) -> ImageFolder:
    """List images under root/<class>/. With `classes` (the train classes), a class train lacks is an error."""
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    hidden = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("."))
    if hidden:  # .ipynb_checkpoints, .git and the like: never classes, but said
        warnings.warn(f"image folder '{root}': hidden folders are not classes: {', '.join(hidden)}", stacklevel=2)
    if not found:
        raise DataError(f"image folder '{root}' has no class folders (expected {root}/<class>/<image>)")
    if classes is not None:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise DataError(
                f"image folder '{root}': class '{unknown[0]}' is not among the train classes ({', '.join(classes)})"
            )
    vocab = classes if classes is not None else found
    samples: list[tuple[Path, int]] = []
    skipped: list[Path] = []
    for name in found:
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        good = [p for p in files if _readable(p)]
        skipped.extend(p for p in files if p not in set(good))
        if not good:
            raise DataError(f"class folder '{root / name}' has no readable images")
        samples.extend((p, vocab.index(name)) for p in good)
    for p in skipped:
        warnings.warn(f"skipping unreadable image '{p}'", stacklevel=2)
    return ImageFolder(root, vocab, samples, skipped)


def load_rgb(path: Path, target: int, draft: bool = True) -> Image.Image:
    """An RGB image upright per its EXIF orientation. draft=True (training only) lets JPEG decode at a reduced
    scale, far cheaper for multi-megapixel photos; evaluation and prediction decode in full, as transformers does."""
    try:
        im = Image.open(path)
        if draft:
            im.draft("RGB", (target * 2, target * 2))
        return ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"image '{path}' cannot be decoded ({err})") from None


def _resize_short(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    scale = size / min(w, h)
    return im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)


def _center_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def _random_resized_crop(im: Image.Image, size: int, scale: tuple[float, float], rng: random.Random) -> Image.Image:
    w, h = im.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return im.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    return _center_crop(_resize_short(im, size), size)


def to_tensor(im: Image.Image, spec: ImageSpec) -> torch.Tensor:
    """HWC uint8 -> CHW float, normalised with the model's mean/std. Shape (3, size, size)."""
    arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (arr - mean) / std


def eval_transform(im: Image.Image, spec: ImageSpec) -> torch.Tensor:
    """(3, size, size) pixel values; with the model's image processor, exactly what the exported folder gives."""
    if spec.processor is not None:
        return torch.as_tensor(np.asarray(spec.processor(im, return_tensors="np")["pixel_values"][0]))
    return to_tensor(_center_crop(_resize_short(im, spec.size), spec.size), spec)


def train_transform(im: Image.Image, spec: ImageSpec, aug: AugmentationConfig, rng: random.Random) -> torch.Tensor:
    if aug.rotation > 0:
        im = im.rotate(rng.uniform(-aug.rotation, aug.rotation), resample=Image.BILINEAR)
    if aug.random_resized_crop:
        im = _random_resized_crop(im, spec.size, aug.crop_scale, rng)
    else:
        im = _center_crop(_resize_short(im, spec.size), spec.size)
    if aug.horizontal_flip and rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if aug.color_jitter > 0:
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            im = enhancer(im).enhance(rng.uniform(1 - aug.color_jitter, 1 + aug.color_jitter))
    return to_tensor(im, spec)


class ImageDataset(torch.utils.data.Dataset):
    """Items are fetched by (index, seed) in training (the seed drives augmentation) and by index in evaluation."""

    def __init__(self, folder: ImageFolder, spec: ImageSpec, aug: AugmentationConfig | None) -> None:
        self.folder = folder
        self.spec = spec
        self.aug = aug

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.folder.samples[index]
        train = self.aug is not None and seed is not None
        try:
            im = load_rgb(path, self.spec.size, draft=train)
        except DataError as err:
            if not train:  # evaluation never scores one image in place of another
                return skipped_item(self.spec, err)
            # Damage the header check could not see: one bad file never ends a run. The next decodable image
            # stands in (the same one every time, so a resumed run sees exactly what the first one saw).
            warnings.warn(f"skipping unreadable image: {err}", stacklevel=2)
            for step in range(1, len(self.folder.samples)):
                path, label = self.folder.samples[(index + step) % len(self.folder.samples)]
                try:
                    im = load_rgb(path, self.spec.size, draft=train)
                    break
                except DataError:
                    continue
            else:
                raise
        if train:
            pixels = train_transform(im, self.spec, self.aug, random.Random(seed))
        else:
            pixels = eval_transform(im, self.spec)
        return {"pixel_values": pixels, "labels": label}


def skipped_item(spec: ImageSpec, err: DataError) -> dict[str, Any]:
    """An evaluation item for an image that fails to decode: blank pixels of the right shape and SKIPPED_LABEL, which
    classification_metrics drops (the row is counted as skipped, never scored)."""
    warnings.warn(f"skipped unreadable image: {err}", stacklevel=2)
    blank = Image.new("RGB", (spec.size, spec.size))
    return {"pixel_values": eval_transform(blank, spec), "labels": SKIPPED_LABEL}


def collate_images(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "labels": torch.tensor([it["labels"] for it in items], dtype=torch.long),
    }


def _flat_name(rel: Path, taken: set[str]) -> str:
    """A file name for `rel` (a path inside a class folder) that no other file of the class has: nested folders
    become part of the name (a/b/x.jpg -> a__b__x.jpg), and a clash still left gets a counter."""
    name = "__".join(rel.parts)
    stem, suffix, n = Path(name).stem, Path(name).suffix, 1
    while name.lower() in taken:
        n += 1
        name = f"{stem}-{n}{suffix}"
    taken.add(name.lower())
    return name


def _split_sizes(n: int, split: tuple[float, float, float]) -> tuple[int, int, int]:
    """Train/val/test counts of a class of n images; a split with a non-zero fraction gets at least one image when the
    class has one to spare for each such split."""
    n_val, n_test = round(n * split[1]), round(n * split[2])
    wanted = sum(1 for f in split if f > 0)
    if n >= wanted:
        n_val = max(n_val, 1) if split[1] > 0 else 0
        n_test = max(n_test, 1) if split[2] > 0 else 0
    n_train = n - n_val - n_test
    if split[0] > 0 and n_train < 1 and n >= 1:
        n_train = 1
        n_test = max(0, n - n_train - n_val)
        n_val = n - n_train - n_test
    return n_train, n_val, n_test


def prepare_images(
    src: str | Path,
    out: str | Path,
    split: tuple[float, float, float],
    seed: int = 42,
    overwrite: bool = False,
    num_classes: int | None = None,
) -> dict[str, int]:
    """Copy SRC/<class>/** into OUT/{train,val,test}/<class>/, reproducibly (a seeded shuffle per class).

    Every readable image is kept (files of nested folders get their folder names in theirs, so none overwrites
    another); each image lands in exactly one split; no empty class folder is written. The output folder follows the
    rule of every command (`rundir.claim_output`): new, empty, or an earlier split of this command, which only
    `overwrite` replaces (atomically).
    `num_classes`: keep only the first N classes (sorted by name)."""
    src, out = Path(src), Path(out)
    if abs(sum(split) - 1.0) > 1e-6 or any(s < 0 for s in split):
        raise DataError(f"--split {split}: expected three non-negative fractions that add up to 1, e.g. 0.8,0.1,0.1")
    if num_classes is not None and num_classes < 1:
        raise DataError(f"--num_classes must be >= 1, got {num_classes}")
    claim = claim_output(out, "prepare-images", inputs=(src,))
    if claim.previous and not overwrite:
        raise DataError(
            f"--output_dir '{out}' is not empty: it holds an earlier `fulltune prepare-images` split; choose a new "
            "folder, or pass --overwrite to replace it"
        )
    folder = scan_split(src)
    classes = folder.classes[:num_classes] if num_classes is not None else folder.classes
    if num_classes is not None and num_classes > len(folder.classes):
        raise DataError(f"--num_classes {num_classes}: '{src}' has only {len(folder.classes)} classes")
    counts = {"train": 0, "val": 0, "test": 0, "skipped_unreadable": len(folder.skipped)}
    with atomic_output(out, "prepare-images") as tmp:  # a kill leaves the earlier split or the new one
        for c, name in enumerate(classes):
            _copy_class(src, tmp, name, [p for p, label in folder.samples if label == c], split, seed, counts)
    return counts


def _copy_class(
    src: Path, out: Path, name: str, files: list[Path], split: tuple[float, float, float], seed: int, counts: dict
) -> None:
    """One class's images into out/{train,val,test}/<name>/ (a seeded shuffle; no empty class folder)."""
    files = sorted(files)
    # Seeded by class name and seed so adding a class never reshuffles the others.
    random.Random(f"{seed}:{name}").shuffle(files)
    n_train, n_val, _ = _split_sizes(len(files), split)
    parts = {"train": files[:n_train], "val": files[n_train : n_train + n_val], "test": files[n_train + n_val :]}
    taken: set[str] = set()
    for part, paths in parts.items():
        if not paths:
            continue  # never an empty class folder: train would reject it
        dest = out / part / name
        dest.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy2(p, dest / _flat_name(p.relative_to(src / name), taken))
        counts[part] += len(paths)


def holdout_images(folder: ImageFolder, fraction: float) -> tuple[ImageFolder, ImageFolder]:
    """Validation images carved from train by a hash of the file name (stable across runs)."""
    keep = [hash_fraction(p.name) >= fraction for p, _ in folder.samples]
    train = [s for s, k in zip(folder.samples, keep, strict=True) if k]
    val = [s for s, k in zip(folder.samples, keep, strict=True) if not k]
    return ImageFolder(folder.root, folder.classes, train, []), ImageFolder(folder.root, folder.classes, val, [])


def cap_images(folder: ImageFolder, n: int | None, seed: int) -> ImageFolder:
    """The images a cap of `n` keeps (`records.capped`: the draw text tables get, over the sorted file list)."""
    keep = capped(len(folder.samples), n, seed)
    return ImageFolder(folder.root, folder.classes, [folder.samples[i] for i in keep], folder.skipped)
