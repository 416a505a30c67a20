"""``python -m jobs.filter --config jobs/configs/filter.yaml``: ``wclip filter`` from a YAML config."""

import sys

from jobs._config import run_job


def main(argv=None) -> int:
    return run_job("filter", argv)


if __name__ == "__main__":
    sys.exit(main())
