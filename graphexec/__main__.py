"""``python -m graphexec``: the same command as the ``graphexec`` script."""

from ._surfaces.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
