"""Where a command's tasks run: one contract, two executors, chosen in one place (:func:`open_executor`).

* :mod:`pipeline.executors.contract`: what every executor offers (:class:`Executor`: ``start_encoders``,
  ``encoder_info``, ``run_shards``, ``map``, ``slots``), takes and gives back (:class:`Encoders`,
  :class:`Collector`, :class:`JobReport`, :class:`Outcome`), and ``--executor auto`` (:func:`uses_ray`).
* :mod:`pipeline.executors.loop`: the bounded in-flight / retry / progress loop, written once; an executor
  only says how it submits a task and waits for any to finish.
* :mod:`pipeline.executors.local`: this machine without Ray (worker processes for shards, threads for file
  tasks); :mod:`pipeline.executors.ray`: Ray, the only module that imports it.

The fit and score jobs on tar shards, the embeddings jobs and ``wclip filter``'s copy tasks all get their
executor from :func:`open_executor`. The two implementations are imported only when a command opens one,
so a command that runs nothing never imports Ray (its import takes seconds) nor torch.
"""

from __future__ import annotations

import contextlib

from pipeline.executors.contract import (
    Collector,
    Encoders,
    Executor,
    JobReport,
    Outcome,
    describe_error,
    failure_line,
    local_cpus,
    summary_rows,
    usable_cpus,
    uses_ray,
)

__all__ = ["Collector", "Encoders", "Executor", "JobReport", "Outcome", "describe_error", "failure_line",
           "local_cpus", "open_executor", "shared_session", "summary_rows", "usable_cpus", "uses_ray"]


def open_executor(run) -> Executor:
    """The executor for ``run`` (a RunConfig, EmbeddingRunConfig or FilterConfig: its ``executor``, ``ray``,
    ``max_in_flight``, ``retries`` and ``progress``), to use as a context manager. What it needs (a Ray
    session, worker processes) starts when first used and ends with the ``with`` block."""
    if uses_ray(run):
        from pipeline.executors.ray import RayExecutor

        return RayExecutor(run)
    from pipeline.executors.local import LocalExecutor

    return LocalExecutor(run)


@contextlib.contextmanager
def shared_session(run):
    """Keep ``run``'s executor session open around several jobs (the demo's fit and score share one Ray):
    a Ray session when ``run`` runs on Ray (the jobs' executors attach to it and leave it running),
    nothing otherwise."""
    if not uses_ray(run):
        yield
        return
    from pipeline.executors.ray import ray_session

    with ray_session(run.ray):
        yield
