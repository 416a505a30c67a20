"""The offline demo, outside the product: a generated world of shapes with captions (world), the training
of the built-in ``wclip-demo`` model (train, warmstart), the ``wclip demo`` run (run) and its AUROC
metrics (metrics). Nothing in the core imports this package."""
