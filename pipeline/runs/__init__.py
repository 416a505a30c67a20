"""The jobs, written once over a source (:mod:`pipeline.sources`): ``fit`` (:mod:`pipeline.runs.fit`, with the
reference of :mod:`pipeline.runs.reference`) and ``score`` (:mod:`pipeline.runs.score`)."""
