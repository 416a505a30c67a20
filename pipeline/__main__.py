"""``python -m pipeline`` is the ``wclip`` command."""

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
