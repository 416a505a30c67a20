"""Which executor runs a job's tar shards: :func:`jobs` picks :mod:`pipeline.runtime` (Ray) or
:mod:`pipeline.local` (worker processes, no Ray) by :func:`pipeline.executor.uses_ray`.

It sits above both executors and nothing in them imports it, so the choice makes no import cycle; they are
imported only when a job starts (Ray's import takes seconds).
"""

from __future__ import annotations

from pipeline.executor import uses_ray


def jobs(run):
    """The executor for ``run``'s shards, as a context manager giving ``start_encoders``, ``encoder_info`` and
    ``run_shards`` (:class:`pipeline.runtime.RayJobs` or :class:`pipeline.local.LocalJobs`)."""
    if uses_ray(run):
        from pipeline.runtime import RayJobs

        return RayJobs(run.ray)
    from pipeline.local import LocalJobs

    return LocalJobs(run)
