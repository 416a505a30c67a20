"""CLIP models: open_clip architectures with pretrained tags, local checkpoints, explicit random
weights, and wclip's built-in models; plus the model identity recorded in stats.

wclip's own models are data, not code:

* ``pipeline/model_configs/<name>.json``: an architecture wclip adds to open_clip's, without weights
  (``wclip-tiny``, for tests: load it with ``--random-init`` or ``--checkpoint``);
* ``pipeline/assets/<name>.json``: a *built-in model*, an architecture whose weights ship beside it as
  ``pipeline/assets/<name>.safetensors`` (``wclip-demo``); it needs no weight source.

A config is a JSON file with open_clip's ``embed_dim``, ``vision_cfg`` and ``text_cfg`` (the test
open_clip itself applies), so other JSON files beside the configs (training records) are no models.

Models named ``hf-hub:org/name`` (how DataComp's and LAION's open_clip models are published) carry their
config and weights in a Hugging Face repository, read from the local Hugging Face cache (``--cache-dir`` or
``HF_HOME``) when offline. :func:`preflight` resolves every model's weights before any work starts, so an
unknown or unavailable model is one line, not an actor's traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.errors import require

log = logging.getLogger("wclip")

PACKAGE = Path(__file__).resolve().parent
MODEL_CONFIGS = PACKAGE / "model_configs"  # architectures without weights
ASSETS = PACKAGE / "assets"                # built-in models: <name>.json config + <name>.safetensors weights
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
HF_HUB = "hf-hub:"  # open_clip's prefix for models published as Hugging Face repositories
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's names, preferred first


def _configs_in(folder: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(folder.glob("*.json")):
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: not a readable model config (%s)", path, exc)
            continue
        if isinstance(config, dict) and all(k in config for k in _CONFIG_KEYS):
            found[path.stem] = path
    return found


def builtin_configs() -> dict[str, Path]:
    """wclip's own architectures, name -> config file: ``model_configs/`` and the built-in models."""
    return {**_configs_in(MODEL_CONFIGS), **_configs_in(ASSETS)}


def builtin_models() -> tuple[str, ...]:
    """Names of the built-in models: architectures shipped with their weights (``assets/<name>.json``)."""
    return tuple(_configs_in(ASSETS))


def builtin_weights(name: str) -> Optional[Path]:
    """Where the built-in model ``name`` keeps its shipped weights; None for any other model."""
    return ASSETS / f"{name}.safetensors" if name in builtin_models() else None


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP to load. Exactly one weight source, unless the model is built in."""

    name: str  # open_clip architecture name, e.g. "ViT-B-32", or a built-in model (builtin_models())
    pretrained: Optional[str] = None  # open_clip pretrained tag, e.g. "laion2b_s34b_b79k"
    checkpoint: Optional[str] = None  # local .safetensors / .pt state dict (loaded without unpickling objects)
    random_init: bool = False  # random weights, only when asked (tests, throughput benchmarks)
    seed: int = 0  # seed of the random weights
    cache_dir: Optional[str] = None  # where downloaded weights are cached (default: open_clip's / HF_HOME)

    @property
    def hub(self) -> bool:
        """An ``hf-hub:org/name`` model: its repository holds config and weights."""
        return self.name.startswith(HF_HUB)

    def __post_init__(self):
        sources = [s for s in ("pretrained", "checkpoint") if getattr(self, s)] + \
            (["random_init"] if self.random_init else [])
        if self.hub and (self.pretrained or self.random_init):
            raise ValueError(f"model {self.name!r} carries its weights in its repository; drop "
                             f"--{'pretrained' if self.pretrained else 'random-init'}")
        if self.hub and not sources:
            sources = ["hf-hub"]
        if len(sources) > 1:
            raise ValueError(f"choose one weight source for model {self.name!r}, got {', '.join(sources)}")
        if not sources and builtin_weights(self.name) is None:
            unknown = unknown_model(self.name)
            if unknown:
                raise ValueError(unknown)
            raise ValueError(
                f"model {self.name!r} has no weights: pass --pretrained TAG (downloaded by open_clip), "
                f"--checkpoint PATH (a local file), or --random-init (random weights, meaningless scores); "
                f"built-in offline models, with their weights: {', '.join(builtin_models()) or 'none'}")
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


# How a model identity names its weights (``{"model": name, "weights": WEIGHTS + value}``), one prefix per source
RANDOM_WEIGHTS = "random-init:seed="
CHECKPOINT_WEIGHTS = "checkpoint:sha256:"
PRETRAINED_WEIGHTS = "pretrained:"
HUB_WEIGHTS = "hf-hub:sha256:"
BUILTIN_WEIGHTS = "builtin:sha256:"
WEIGHT_SOURCES = (RANDOM_WEIGHTS, CHECKPOINT_WEIGHTS, PRETRAINED_WEIGHTS, HUB_WEIGHTS, BUILTIN_WEIGHTS)


def model_identity(spec: ModelSpec) -> dict:
    """What identifies the weights: recorded at fit time, compared at score time."""
    if spec.random_init:
        weights = f"{RANDOM_WEIGHTS}{spec.seed}"
    elif spec.checkpoint:
        weights = f"{CHECKPOINT_WEIGHTS}{file_sha256(spec.checkpoint)}"
    elif spec.pretrained:
        weights = f"{PRETRAINED_WEIGHTS}{spec.pretrained}"
    elif spec.hub:
        weights = f"{HUB_WEIGHTS}{file_sha256(cached_weights(spec))}"
    else:  # a built-in model: its shipped weights
        weights = f"{BUILTIN_WEIGHTS}{file_sha256(builtin_weights(spec.name))}"
    return {"model": spec.name, "weights": weights}


DECLARE_FORMS = ("ARCH/TAG (an open_clip pretrained tag, e.g. ViT-L-14/openai), hf-hub:org/name, ARCH@CHECKPOINT "
                 "(a local weights file), MODEL@WEIGHTS as a stats file records them (e.g. "
                 "ViT-B-32@checkpoint:sha256:HEX), or a built-in model")


@dataclass(frozen=True)
class DeclaredModel:
    """A model named as the maker of precomputed embeddings (``--embeddings-model``): its identity in
    :func:`model_identity`'s form, compared with a fit's, never loaded. ``weights`` is None only for an
    ``hf-hub:`` repository whose weights are not cached here: any weights of that repository then match."""

    text: str  # as the user wrote it
    model: str  # architecture, hf-hub:org/name, or built-in model
    weights: Optional[str]  # as model_identity writes them; None: an hf-hub repository's, not known here

    @classmethod
    def parse(cls, text: str, cache_dir: Optional[str] = None) -> "DeclaredModel":
        """Read one of :data:`DECLARE_FORMS`; a ValueError says which forms there are."""
        model, at, weights = text.strip().partition("@")
        if at:
            if not model or not weights:
                raise ValueError(f"--embeddings-model {text!r}: give MODEL@WEIGHTS; the forms: {DECLARE_FORMS}")
            if weights.startswith(RANDOM_WEIGHTS) and not weights[len(RANDOM_WEIGHTS):].isdigit():
                raise ValueError(f"--embeddings-model {text!r}: random weights are named {RANDOM_WEIGHTS}N")
            if weights.startswith(WEIGHT_SOURCES):
                return cls(text, model, weights)
            if Path(weights).is_file():
                return cls(text, model, f"{CHECKPOINT_WEIGHTS}{file_sha256(weights)}")
            raise ValueError(f"--embeddings-model {text!r}: {weights!r} is neither a local weights file nor weights "
                             f"as a stats file records them ({', '.join(p + '...' for p in WEIGHT_SOURCES)})")
        if model.startswith(HF_HUB):
            spec = ModelSpec(name=model, cache_dir=cache_dir)
            found = cached_weights(spec)
            return cls(text, model, f"{HUB_WEIGHTS}{file_sha256(found)}" if found else None)
        arch, slash, tag = model.partition("/")
        if slash and arch and tag:
            return cls(text, arch, f"{PRETRAINED_WEIGHTS}{tag}")
        if model in builtin_models():
            return cls(text, model, model_identity(ModelSpec(name=model))["weights"])
        raise ValueError(f"--embeddings-model {text!r} names no weights; the forms: {DECLARE_FORMS} ("
                         f"{', '.join(builtin_models())})")

    def identity(self) -> dict:
        return {"model": self.model, "weights": self.weights}

    def matches(self, identity: dict) -> bool:
        """Whether a recorded model identity is this model's."""
        if identity.get("model") != self.model:
            return False
        if self.weights is None:
            return str(identity.get("weights", "")).startswith(HUB_WEIGHTS)
        return identity.get("weights") == self.weights


def declare(identity: dict) -> str:
    """How ``--embeddings-model`` names the model of a recorded identity: ARCH/TAG, hf-hub:org/name, a built-in
    model's name while its shipped weights are the recorded ones, else MODEL@WEIGHTS."""
    model, weights = str(identity.get("model")), str(identity.get("weights"))
    if weights.startswith(PRETRAINED_WEIGHTS):
        return f"{model}/{weights[len(PRETRAINED_WEIGHTS):]}"
    if weights.startswith(HUB_WEIGHTS) and model.startswith(HF_HUB):
        return model
    if weights.startswith(BUILTIN_WEIGHTS) and model in builtin_models() and \
            model_identity(ModelSpec(name=model))["weights"] == weights:
        return model
    return f"{model}@{weights}"


def _hub_files(spec: ModelSpec) -> tuple:
    """(repository, candidate weight files) of an hf-hub model or of a pretrained tag published on the Hub;
    (None, url) for a tag downloaded from a URL; (None, None) for anything else."""
    if spec.hub:
        return spec.name[len(HF_HUB):], HF_WEIGHT_FILES
    if spec.pretrained:
        open_clip = require("open_clip", "loading CLIP models")
        cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
        if cfg.get("hf_hub"):
            repo, filename = cfg["hf_hub"].rstrip("/"), None
            if not cfg["hf_hub"].endswith("/"):
                repo, filename = cfg["hf_hub"].rsplit("/", 1)
            names = (filename,) if filename else HF_WEIGHT_FILES
            safe = tuple(n.rsplit(".", 1)[0] + ".safetensors" for n in names if not n.endswith(".safetensors"))
            return repo, safe + names
        if cfg.get("url"):
            return None, cfg["url"]
    return None, None


def cached_weights(spec: ModelSpec) -> Optional[Path]:
    """The local file holding ``spec``'s downloadable weights, looked up in the caches only (no network);
    None when they are not cached."""
    import os

    repo, files = _hub_files(spec)
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for name in files:
            found = try_to_load_from_cache(repo, name, cache_dir=spec.cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
        return None
    if isinstance(files, str):  # a URL: open_clip caches it by file name
        target = Path(spec.cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(files)
        return target if target.is_file() else None
    return None


def unknown_model(name: str) -> Optional[str]:
    """None for a model name open_clip or wclip knows (or an ``hf-hub:`` repository); else the one-line
    error, which always suggests names: the closest known ones (case ignored), the built-in models, and how
    Hub models are named."""
    import difflib

    if name.startswith(HF_HUB):
        return None
    known = architectures()
    if name in known:
        return None
    by_lower = {n.lower(): n for n in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3) or \
        difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.0)
    return (f"unknown model {name!r}" + (f" (did you mean {', '.join(by_lower[c] for c in close)}?)" if close else "")
            + "; open_clip.list_models() has the architectures, built-in: " + ", ".join(builtin_models())
            + "; Hub models are named hf-hub:org/name")


def architectures() -> list:
    """Every architecture name open_clip and wclip know, read from their config files (without importing
    open_clip and torch, which takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    names = set(builtin_configs())
    for folder in (spec.submodule_search_locations or []) if spec else []:
        names.update(p.stem for p in (Path(folder) / "model_configs").glob("*.json"))
    return sorted(names)


def embed_dim(name: str, cache_dir: Optional[str] = None) -> Optional[int]:
    """The width of the embeddings model ``name`` makes (its config's ``embed_dim``), read from the config
    file, no weights and no open_clip import needed: wclip's configs, open_clip's, or an ``hf-hub:`` repository's
    ``open_clip_config.json`` when it is cached; None when no config is at hand."""
    import importlib.util

    if name.startswith(HF_HUB):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        found = try_to_load_from_cache(name[len(HF_HUB):], "open_clip_config.json", cache_dir=cache_dir)
        path = Path(found) if isinstance(found, str) else None
    else:
        path = builtin_configs().get(name)
        spec = importlib.util.find_spec("open_clip")
        for folder in (spec.submodule_search_locations or []) if spec and path is None else []:
            candidate = Path(folder) / "model_configs" / f"{name}.json"
            path = candidate if candidate.is_file() else path
    if path is None or not path.is_file():
        return None
    config = json.loads(path.read_text())
    value = config.get("model_cfg", config).get("embed_dim")
    return int(value) if value is not None else None


def _reachable(host: str, timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def preflight(spec: ModelSpec) -> None:
    """Check, before any work, that ``spec`` names a known model whose weights are at hand: cached, or
    downloadable now (then downloaded here, once). Raises :class:`pipeline.errors.ConfigError`."""
    import os

    from pipeline.errors import ConfigError

    unknown = unknown_model(spec.name)
    if unknown:
        raise ConfigError(unknown)
    if not (spec.pretrained or spec.hub):
        return  # built-in, local checkpoint or random weights: nothing to fetch (open_clip not even imported)
    open_clip = require("open_clip", "loading CLIP models")
    if spec.pretrained and not open_clip.get_pretrained_cfg(spec.name, spec.pretrained):
        tags = open_clip.list_pretrained_tags_by_model(spec.name)
        raise ConfigError(f"model {spec.name} has no pretrained tag {spec.pretrained!r}; its tags: "
                          f"{', '.join(tags) or 'none (use --checkpoint)'}")
    repo, files = _hub_files(spec)
    if files is None or spec.random_init or cached_weights(spec) is not None:
        return
    what = f"{spec.name}" + (f" ({spec.pretrained})" if spec.pretrained else "")
    host = "huggingface.co" if repo else files.split("/")[2]
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    if (repo and offline) or not _reachable(host):
        where = spec.cache_dir or ("the Hugging Face cache (HF_HOME)" if repo else "~/.cache/clip")
        raise ConfigError(f"the weights of {what} are not in {where} and {host} cannot be reached: download them "
                          f"where there is network (or copy the cache here and pass --cache-dir), or use "
                          f"--checkpoint PATH")
    try:  # download once, in the driver, before the workers need it
        if repo:
            open_clip.pretrained.download_pretrained_from_hf(repo, filename=files[-1], cache_dir=spec.cache_dir)
        else:
            open_clip.pretrained.download_pretrained_from_url(files, cache_dir=spec.cache_dir)
    except Exception as exc:
        raise ConfigError(f"the weights of {what} could not be downloaded: {str(exc).splitlines()[0]}") from exc


def _hub_offline() -> None:
    """Make huggingface_hub use its cache only, in this process (a worker whose weights are cached)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    constants.HF_HUB_OFFLINE = True


def register_builtin_configs(open_clip) -> None:
    """Make wclip's own architectures (:func:`builtin_configs`) known to open_clip."""
    known = set(open_clip.list_models())
    for name, path in builtin_configs().items():
        if name not in known:
            open_clip.add_model_config(path)


def load_weights(model, path) -> None:
    """Load a safetensors state dict (any float dtype) into ``model`` as float32, strictly; eval mode."""
    from safetensors.torch import load_file

    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    model.eval()


def load_clip(name: str, pretrained: Optional[str] = None, checkpoint: Optional[str] = None,
              random_init: bool = False, device=None, seed: int = 0):
    """Return open_clip's ``(model, preprocess, tokenizer)`` in eval mode on ``device`` (default CPU).

    Never falls back to random weights: without a weight source (and for a model other than a
    built-in one, see :func:`builtin_models`) this raises ``ValueError``.
    """
    spec = ModelSpec(name=name, pretrained=pretrained, checkpoint=checkpoint,
                     random_init=random_init, seed=seed)
    return load_spec(spec, device=device)


def load_spec(spec: ModelSpec, device=None):
    """:func:`load_clip` for a :class:`ModelSpec`."""
    open_clip = require("open_clip", "loading CLIP models")
    torch = require("torch", "loading CLIP models")
    register_builtin_configs(open_clip)
    if spec.hub or spec.pretrained:
        if cached_weights(spec) is None and spec.hub and not spec.random_init:
            raise FileNotFoundError(f"the weights of {spec.name} are not in the local cache "
                                    f"({spec.cache_dir or 'HF_HOME'}); run the command once where there is network")
        if cached_weights(spec) is not None:
            _hub_offline()  # cached: open_clip need not ask the Hub for anything (no retries without network)
    if not spec.hub and spec.name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {spec.name!r}; see open_clip.list_models() "
                         f"(e.g. ViT-B-32, ViT-L-14) or use a built-in model: {', '.join(builtin_models())}")
    if spec.random_init:
        torch.manual_seed(spec.seed)
        log.warning("model %s has RANDOM weights (--random-init, seed %d): scores are meaningless",
                    spec.name, spec.seed)
    quiet = _DropMessage("No pretrained weights loaded")  # we load the weights ourselves, or chose random ones
    logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, pretrained=spec.pretrained, device="cpu", cache_dir=spec.cache_dir)
    finally:
        logging.getLogger().removeFilter(quiet)
    shipped = builtin_weights(spec.name)
    if spec.checkpoint:
        open_clip.load_checkpoint(model, spec.checkpoint, strict=True, weights_only=True)
    elif shipped is not None and not (spec.random_init or spec.pretrained):
        if not shipped.is_file():
            raise FileNotFoundError(f"the weights {shipped} of the built-in model {spec.name!r} are missing; "
                                    "reinstall wclip")
        load_weights(model, shipped)
    model.eval()
    if device is not None:
        model.to(device)
    tokenizer = open_clip.get_tokenizer(spec.name, cache_dir=spec.cache_dir)
    return model, preprocess, tokenizer
