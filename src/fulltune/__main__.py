"""`python -m fulltune ...` (what torchrun launches) is the same as the `fulltune` command."""

from fulltune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
