"""The offline demo, outside the product: a generated world of shapes with captions (world) and its shards
on disk (shards), the training of the built-in ``wclip-demo`` model (train, warmstart), the ``wclip demo``
run (run) and how both are measured (metrics). Nothing in the core imports this package."""

MODEL = "wclip-demo"  # the built-in model the demo trains and runs (pipeline.models.builtin_models())
