"""``python -m jobs.fit --config jobs/configs/fit.yaml``: ``wclip fit`` from a YAML config.

``output`` may be an ``s3://`` (any fsspec) URL: the stats file is written locally, then uploaded.
"""

import sys

from jobs._config import run_job


def main(argv=None) -> int:
    return run_job("fit", argv, upload=("output",))


if __name__ == "__main__":
    sys.exit(main())
