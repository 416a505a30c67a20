"""The scores folder, each rule defined once: the Parquet contract (:mod:`~pipeline.scores.table`), where each
file lives (:mod:`~pipeline.scores.layout`), what made it (:mod:`~pipeline.scores.provenance`), planning,
claiming and opening it (:mod:`~pipeline.scores.folder`), and the sinks that write it
(:mod:`~pipeline.scores.sinks`)."""
