"""``python -m jobs.card --config jobs/configs/card.yaml``: ``wclip card`` from a YAML config.

``stats`` may be an ``s3://`` (any fsspec) URL: it is downloaded before the card is made.
"""

import sys

from jobs._config import run_job


def main(argv=None) -> int:
    return run_job("card", argv, download=("stats",))


if __name__ == "__main__":
    sys.exit(main())
