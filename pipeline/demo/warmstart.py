"""Supervised warm start of ``wclip-demo``'s image tower on the open world's labels.

CLIP's contrastive loss alone leaves a model this small blind to shape: both towers settle on
colours, sizes and backgrounds, and the shape words' gradients vanish (the ViT shipped before
this warm start had a linear shape probe at chance). And a CNN trained by CLIP places a colour it
sees, such as orange, on the line between the reference colours around it (red, yellow), where a
Gaussian fitted to the reference corpus finds it typical. So before the contrastive stage the
image tower learns to read the open (pre-training) world's labels, as LiT-style recipes start
CLIP from a classification-trained image tower (here it is not frozen afterwards):

* each open shape and colour owns one coordinate of the L2-normalised image embedding, trained
  one-vs-rest (a *concept*): an unseen shape or colour then moves a coordinate that never moves
  in the reference corpus, so whitening that corpus exposes it;
* background, object count, size and drawing style are read by linear heads, in a second stage
  (the first reads the concepts alone, the hardest of the labels to learn);
* so are the backgrounds at the top and at the bottom edge, taught on *spliced* scenes (the top
  of one scene above the bottom of another, CutMix-style; :func:`splice`). In a real scene the two
  agree, so their coordinates move together across the reference corpus; an image whose lower
  part is something else (a download cut off and padded with flat filler) moves them apart, along
  a direction whitening finds nearly still.

The heads are scaffolding: they are not part of the shipped weights. The labels come from the
open world only (``world.iter_world(..., vocabulary="open")``), which includes the shapes and
colours that the demo's reference corpus lacks, as a real CLIP's training data includes concepts
that a curated corpus lacks.
"""

from __future__ import annotations

import io
import logging
import math
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.demo import world

# What the tower learns to read, and the values of each; an object attribute of an empty scene is "".
ATTRIBUTES = {
    "shape": ("",) + world.OPEN_SHAPES,
    "colour": ("",) + tuple(world.OPEN_COLOURS),
    "size": ("",) + tuple(world.SIZES),
    "background": tuple(world.BACKGROUNDS),
    "count": (0, 1, 2, 3),
    "style": tuple(world.STYLES),
    "top": tuple(world.BACKGROUNDS),        # background at the top and bottom edge: they differ
    "bottom": tuple(world.BACKGROUNDS),     # only in spliced scenes (see splice)
}
EDGES = ("top", "bottom")
IGNORE = -100                      # target of an attribute a (spliced) scene does not have
OBJECT_ATTRIBUTES = ("shape", "colour", "size")   # read from the scene's (single-group) objects
CONCEPTS = ("shape", "colour")     # attributes whose values each own an embedding coordinate
WARM_START_SHARD = 1_000_000       # warm-start batches are shards WARM_START_SHARD + i of the training seed

log = logging.getLogger(__name__)


def _value(labels: dict, attribute: str):
    if "spliced" in labels:
        return labels.get(attribute)
    if attribute in OBJECT_ATTRIBUTES:
        return labels["objects"][0][attribute] if labels["objects"] else ""
    return labels["background" if attribute in EDGES else attribute]


def targets(samples, attribute: str) -> torch.Tensor:
    """Class index of ``attribute`` per scene (open-world scenes hold one group of alike objects).

    A spliced scene has only its edges' backgrounds; its other targets are ``IGNORE``.
    """
    values = ATTRIBUTES[attribute]
    found = [_value(s.labels, attribute) for s in samples]
    return torch.tensor([IGNORE if v is None else values.index(v) for v in found])


class Spliced:
    """The top of one scene above the bottom of another, cut at a random row."""

    def __init__(self, image, top: str, bottom: str):
        self.image, self.labels = image, {"spliced": True, "top": top, "bottom": bottom}


def image_of(sample) -> Image.Image:
    """A scene's RGB image: a spliced scene's own, a world sample's decoded from its JPEG."""
    return sample.image if isinstance(sample, Spliced) else Image.open(io.BytesIO(sample.image)).convert("RGB")


def image_batch(samples, preprocess) -> torch.Tensor:
    """The model's input for ``samples`` (world samples or spliced scenes)."""
    return torch.stack([preprocess(image_of(s)) for s in samples])


def splice(samples, rate: float, rng: np.random.Generator) -> list:
    """Replace each of ``samples``, with probability ``rate``, by a :class:`Spliced` scene.

    Its rows above a cut (between 1/8 and 7/8 of the height) are its own, the rest a random
    sample's of the same batch (possibly itself, a plain scene then).
    """
    out = list(samples)
    for i in np.flatnonzero(rng.random(len(out)) < rate):
        j = int(rng.integers(len(samples)))
        a, b = (np.asarray(image_of(samples[k])) for k in (i, j))
        cut = int(rng.integers(a.shape[0] // 8, a.shape[0] * 7 // 8))
        image = np.concatenate([a[:cut], b[cut:]])
        out[i] = Spliced(Image.fromarray(image), samples[i].labels["background"], samples[j].labels["background"])
    return out


def _check_known(names: Sequence[str], what: str) -> None:
    unknown = set(names) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; choose from {sorted(ATTRIBUTES)}")


def _coordinate_values(attribute: str) -> tuple:
    values = ATTRIBUTES[attribute]
    return values[1:] if values[0] == "" else values


class AttributeHeads(nn.Module):
    """Concept coordinates (a learnt scale and bias each) and linear heads on an image embedding.

    Each value of an attribute in ``concepts`` but "" (no object) owns one embedding coordinate,
    read one-vs-rest; the other attributes get a linear softmax head.
    """

    def __init__(self, embed_dim: int, concepts: Sequence[str] = CONCEPTS, concept_weight: float = 10.0):
        super().__init__()
        _check_known(concepts, "concepts")
        self.offsets, n = {}, 0
        for attribute in concepts:
            self.offsets[attribute] = n
            n += len(_coordinate_values(attribute))
        if n > embed_dim:
            raise ValueError(f"{n} concept coordinates do not fit a {embed_dim}-dim embedding")
        self.scale = nn.Parameter(torch.full((n,), 32.0))
        self.bias = nn.Parameter(torch.zeros(n))
        self.linear = nn.ModuleDict({a: nn.Linear(embed_dim, len(v)) for a, v in ATTRIBUTES.items()
                                     if a not in concepts})
        self.concept_weight = concept_weight

    @property
    def concepts(self) -> tuple[str, ...]:
        return tuple(self.offsets)

    def concept_logits(self, features: torch.Tensor, attribute: str) -> torch.Tensor:
        at = slice(self.offsets[attribute], self.offsets[attribute] + len(_coordinate_values(attribute)))
        return F.normalize(features, dim=-1)[:, at] * self.scale[at] + self.bias[at]

    def loss(self, features: torch.Tensor, samples, attributes: Sequence[str]) -> torch.Tensor:
        total = features.new_zeros(())
        for attribute in attributes:
            y = targets(samples, attribute)
            has = y != IGNORE
            if not has.any():
                continue
            if attribute in self.offsets:
                values = ATTRIBUTES[attribute]
                onehot = F.one_hot(y[has], len(values)).float()[:, values[0] == "":]   # "" (no object): all zero
                total = total + self.concept_weight * F.binary_cross_entropy_with_logits(
                    self.concept_logits(features[has], attribute), onehot)
            else:
                total = total + F.cross_entropy(self.linear[attribute](features), y, ignore_index=IGNORE)
        return total


def warm_start(model, preprocess, heads: AttributeHeads, stages, seed: int = 0,
               batch_size: int = 128, lr: float = 3e-3, weight_decay: float = 0.05, warmup: int = 20,
               splice_rate: float = 0.0) -> list[dict]:
    """Train ``model.visual`` (and ``heads``) on labelled open-world scenes, stage by stage.

    ``stages`` is a sequence of ``(steps, attributes)``; each stage has its own AdamW and cosine
    schedule. In a stage that reads the edges (``EDGES``), each scene is spliced with probability
    ``splice_rate`` (:func:`splice`). Returns one record per stage (steps, attributes, first and
    final loss, seconds).
    """
    records, batch_index = [], 0
    for steps, attributes in stages:
        if steps <= 0:
            continue
        _check_known(attributes, "attributes")
        params = list(model.visual.parameters()) + list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s, n=steps: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / n)))
        start, losses = time.time(), []
        for step in range(steps):
            samples = [s for _, s in world.iter_world(seed, WARM_START_SHARD + batch_index, batch_size,
                                                      vocabulary="open")]
            batch_index += 1
            if splice_rate and set(EDGES) & set(attributes):
                samples = splice(samples, splice_rate, np.random.default_rng([seed, batch_index, 3]))
            images = image_batch(samples, preprocess)
            loss = heads.loss(model.encode_image(images), samples, attributes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step % 50 == 0 or step == steps - 1:
                log.info("warm start (%s) step %d/%d loss %.4f %.0fs", "+".join(attributes), step + 1, steps,
                         losses[-1], time.time() - start)
        tail = losses[-min(20, len(losses)):]
        records.append({"steps": steps, "attributes": list(attributes), "batch_size": batch_size, "lr": lr,
                        "first_loss": round(losses[0], 4), "final_loss": round(float(np.mean(tail)), 4),
                        "seconds": round(time.time() - start, 1)})
    return records
