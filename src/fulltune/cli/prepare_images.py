"""`fulltune prepare-images`: copy SRC/<class>/* into train/ val/ test/ reproducibly (seeded per class)."""

from __future__ import annotations

import argparse
from typing import Any

from fulltune.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("prepare-images", help="split a folder of class folders into train/val/test")
    p.add_argument("src_dir", help="folder of class folders")
    p.add_argument("--output_dir", required=True, help="where train/ val/ test/ are written")
    p.add_argument(
        "--fractions",
        "--split",
        dest="split",
        default="0.8,0.1,0.1",
        help="train,val,test fractions (--split is the old name)",
    )
    p.add_argument("--seed", type=int, default=42, help="seed of the per-class shuffle")
    p.add_argument("--overwrite", action="store_true", help="replace the train/val/test folders of a non-empty output")
    p.add_argument("--num_classes", type=int, help="keep only the first N classes (sorted by name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fulltune.data.images import prepare_images

    try:
        split = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        split = ()
    if len(split) != 3:
        raise ConfigError(f"--split '{args.split}': expected three fractions, e.g. 0.8,0.1,0.1")
    counts = prepare_images(
        args.src_dir,
        args.output_dir,
        split,
        seed=args.seed,  # type: ignore[arg-type]
        overwrite=args.overwrite,
        num_classes=args.num_classes,
    )
    print(written_line(args.output_dir, counts))
    return 0


def written_line(out: str, counts: dict[str, int]) -> str:
    """'wrote OUT: train 14, val 3, test 3 images' and the unreadable images skipped, when there were any."""
    skipped = counts.get("skipped_unreadable", 0)
    line = f"wrote {out}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "skipped_unreadable")
    return (
        line + " images" + (f"; {skipped:,} unreadable image{'s' if skipped != 1 else ''} skipped" if skipped else "")
    )
