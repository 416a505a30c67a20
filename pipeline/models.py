"""CLIP models: open_clip architectures with pretrained tags, local checkpoints, explicit random
weights, and the built-in offline ``wclip-demo`` model; plus the model identity recorded in stats."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from pipeline._imports import require

log = logging.getLogger("wclip")

DEMO_MODEL = "wclip-demo"
ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_CONFIG = ASSETS / f"{DEMO_MODEL}.json"
DEMO_WEIGHTS = ASSETS / f"{DEMO_MODEL}.safetensors"
MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"  # extra architectures (wclip-tiny for tests)


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP to load. Exactly one weight source, unless the model is built in."""

    name: str  # open_clip architecture name, e.g. "ViT-B-32", or "wclip-demo"
    pretrained: Optional[str] = None  # open_clip pretrained tag, e.g. "laion2b_s34b_b79k"
    checkpoint: Optional[str] = None  # local .safetensors / .pt state dict (loaded without unpickling objects)
    random_init: bool = False  # random weights, only when asked (tests, throughput benchmarks)
    seed: int = 0  # seed of the random weights

    def __post_init__(self):
        sources = [s for s in ("pretrained", "checkpoint") if getattr(self, s)] + \
            (["random_init"] if self.random_init else [])
        if len(sources) > 1:
            raise ValueError(f"choose one weight source for model {self.name!r}, got {', '.join(sources)}")
        if not sources and self.name != DEMO_MODEL:
            raise ValueError(
                f"model {self.name!r} has no weights: pass --pretrained TAG (downloaded by open_clip), "
                f"--checkpoint PATH (a local file), or --random-init (random weights, meaningless scores); "
                f"'{DEMO_MODEL}' is the built-in offline model")
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise ValueError(f"checkpoint {self.checkpoint!r} does not exist or is not a file")


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefix)


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(spec: ModelSpec) -> dict:
    """What identifies the weights: recorded at fit time, compared at score time."""
    if spec.random_init:
        weights = f"random-init:seed={spec.seed}"
    elif spec.checkpoint:
        weights = f"checkpoint:sha256:{file_sha256(spec.checkpoint)}"
    elif spec.pretrained:
        weights = f"pretrained:{spec.pretrained}"
    else:  # built-in demo model
        weights = f"builtin:sha256:{file_sha256(DEMO_WEIGHTS)}"
    return {"model": spec.name, "weights": weights}


def register_builtin_configs(open_clip) -> None:
    """Make wclip's own architectures (``wclip-demo``, ``wclip-tiny``) known to open_clip."""
    known = set(open_clip.list_models())
    for path in [DEMO_CONFIG, *sorted(MODEL_CONFIGS.glob("*.json"))]:
        if path.is_file() and path.stem not in known:
            open_clip.add_model_config(path)


def load_clip(name: str, pretrained: Optional[str] = None, checkpoint: Optional[str] = None,
              random_init: bool = False, device=None, seed: int = 0):
    """Return open_clip's ``(model, preprocess, tokenizer)`` in eval mode on ``device`` (default CPU).

    Never falls back to random weights: without a weight source (and for a model other than the
    built-in ``wclip-demo``) this raises ``ValueError``.
    """
    spec = ModelSpec(name=name, pretrained=pretrained, checkpoint=checkpoint,
                     random_init=random_init, seed=seed)
    return load_spec(spec, device=device)


def load_spec(spec: ModelSpec, device=None):
    """:func:`load_clip` for a :class:`ModelSpec`."""
    open_clip = require("open_clip", "loading CLIP models")
    torch = require("torch", "loading CLIP models")
    register_builtin_configs(open_clip)
    if spec.name == DEMO_MODEL and not DEMO_CONFIG.is_file():
        raise FileNotFoundError(f"the built-in model config {DEMO_CONFIG} is missing; reinstall wclip")
    if spec.name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {spec.name!r}; see open_clip.list_models() "
                         f"(e.g. ViT-B-32, ViT-L-14) or use '{DEMO_MODEL}'")
    if spec.random_init:
        torch.manual_seed(spec.seed)
        log.warning("model %s has RANDOM weights (--random-init, seed %d): scores are meaningless",
                    spec.name, spec.seed)
    quiet = _DropMessage("No pretrained weights loaded")  # we load the weights ourselves, or chose random ones
    logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, pretrained=spec.pretrained, device="cpu")
    finally:
        logging.getLogger().removeFilter(quiet)
    if spec.checkpoint:
        open_clip.load_checkpoint(model, spec.checkpoint, strict=True, weights_only=True)
    elif spec.name == DEMO_MODEL and not spec.random_init:
        if not DEMO_WEIGHTS.is_file():
            raise FileNotFoundError(f"the built-in weights {DEMO_WEIGHTS} are missing; run `wclip train-demo`")
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(str(DEMO_WEIGHTS)).items()}
        model.load_state_dict(state, strict=True)
    model.eval()
    if device is not None:
        model.to(device)
    tokenizer = open_clip.get_tokenizer(spec.name)
    return model, preprocess, tokenizer


def spec_to_json(spec: ModelSpec) -> str:
    """JSON form of a spec (for logs and job configs)."""
    return json.dumps(asdict(spec), sort_keys=True)
