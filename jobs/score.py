"""``python -m jobs.score --config jobs/configs/score.yaml``: ``wclip score`` from a YAML config.

``stats`` may be an ``s3://`` (any fsspec) URL: it is downloaded before scoring starts.
"""

import sys

from jobs._config import run_job


def main(argv=None) -> int:
    return run_job("score", argv, download=("stats",))


if __name__ == "__main__":
    sys.exit(main())
