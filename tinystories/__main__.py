"""`python -m tinystories ...` is the same as the `tinystories` command."""

from tinystories.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
