"""``python -m jobs.dedup --config jobs/configs/dedup.yaml``: ``wclip dedup`` from a YAML config."""

import sys

from jobs._config import run_job


def main(argv=None) -> int:
    return run_job("dedup", argv)


if __name__ == "__main__":
    sys.exit(main())
