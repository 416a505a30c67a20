"""The offline demo, outside the product: a generated world of shapes with captions (world) and its shards
on disk (shards), the training of the built-in ``wclip-demo`` model (train, warmstart), the ``wclip demo``
run (run) and how both are measured (metrics). Nothing in the core imports this package."""

MODEL = "wclip-demo"  # the built-in model the demo trains and runs (pipeline.models.builtin_models())
#: K of the local likelihood's clusters in ``wclip demo`` (``wclip fit --clusters``). At the default sizes
#: ``wclip demo --clusters K`` ranked the unseen pairings by image_local_loglik at 0.76, 0.84, 0.94 and 0.97
#: for K = 8, 16, 32, 64 (image_loglik: 0.71): 32, the smallest of these to reach 0.9, leaves ~100 fit rows a cluster.
CLUSTERS = 32
