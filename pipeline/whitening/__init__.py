"""The method: float64 moments, the whitening fit and its scores, stats files, normality diagnostics and
the fast whitening kernels.

``from pipeline.whitening import WhiteningStats, StatsFile`` is the public numerics API (docs/design.md).
"""

from pipeline.whitening.clusters import ClusterWhitening, LocalScores
from pipeline.whitening.fileformat import FORMAT
from pipeline.whitening.moments import Moments, holdout_mask
from pipeline.whitening.stats import DEFAULT_TOL, SINGULAR_RTOL, WhiteningStats
from pipeline.whitening.statsfile import StatsFile, StatsFileError

__all__ = ["Moments", "holdout_mask", "WhiteningStats", "StatsFile", "StatsFileError", "FORMAT",
           "ClusterWhitening", "LocalScores",
           "DEFAULT_TOL", "SINGULAR_RTOL"]
