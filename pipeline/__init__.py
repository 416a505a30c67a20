"""wclip: dataset curation with the Whitened CLIP likelihood, on Ray.

Numerics live in :mod:`pipeline.whitening`; models in :mod:`pipeline.models`;
where the jobs run (Ray or this machine) in :mod:`pipeline.executors`; the command line in :mod:`pipeline.cli`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_clip"]


def load_clip(name, pretrained=None, checkpoint=None, random_init=False, device=None):
    """Return open_clip's ``(model, preprocess, tokenizer)`` triple; see :func:`pipeline.models.load_clip`."""
    from pipeline.models import load_clip as _load_clip

    return _load_clip(name, pretrained=pretrained, checkpoint=checkpoint,
                      random_init=random_init, device=device)
