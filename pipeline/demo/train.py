"""Train, save and evaluate ``wclip-demo``: a small open_clip model for the synthetic world.

The shipped weights (``pipeline/assets/wclip-demo.safetensors``) come from :func:`main` with
its default arguments; ``pipeline/assets/wclip-demo.train.json`` records how, and how well
(:func:`evaluate`, scored by the product's whitening; :func:`reevaluate` redoes it without training).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np

from pipeline import models
from pipeline.demo import MODEL, metrics, world
from pipeline.demo.metrics import to_batch
from pipeline.models import load_weights  # the shipped weights load as load_clip loads them
from pipeline.storage import write_atomic

MODEL_NAME = MODEL
CONFIG_PATH = models.builtin_configs()[MODEL]
WEIGHTS_PATH = models.builtin_weights(MODEL)
EVAL_SEED = 20_250_506           # held-out test world for the recorded evaluation
VALIDATION_SEED = 4_242          # validation world for checkpoint selection (not the test world)
WARM_START_STEPS = (450, 150)    # supervised image-tower steps: concepts alone, then every attribute
SPLICE_RATE = 0.5                # share of spliced scenes in the warm start's second stage
SPLICE_KEEP = 16                 # spliced scenes per CLIP step that keep the edge backgrounds readable
NORM_WEIGHT = 10.0               # weight of the variance of the image embeddings' log-norm during CLIP

log = logging.getLogger(__name__)


def record_path(weights) -> Path:
    """The training record beside a weights file: ``NAME.safetensors`` -> ``NAME.train.json``."""
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".train.json")


RECORD_PATH = record_path(WEIGHTS_PATH)


def create_model():
    """A randomly initialised ``wclip-demo`` with its open_clip preprocess and tokenizer."""
    from pipeline.errors import require

    open_clip = require("open_clip", "the wclip-demo model")
    models.register_builtin_configs(open_clip)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=None)
    return model, preprocess, open_clip.get_tokenizer(MODEL_NAME)


def save_weights(model, path) -> str:
    """Write the state dict as float16 safetensors, crash-safe; return its sha256."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").half().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.state_dict().items()}
    data = save(state, metadata={"model": MODEL_NAME, "dtype": "float16"})
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def train_batch(seed: int, step: int, batch_size: int, twins: float = 0.0) -> tuple[list[bytes], list[str], list]:
    """The pairs seen at ``step``: shard ``step`` of the open (pre-training) world with ``seed``.

    Returns JPEGs, captions and the world samples (with labels) that the first pairs come from.
    A ``twins`` share of the batch is minimal pairs (:func:`pipeline.demo.world.make_twins`): scenes drawn
    twice, identical but for the shape, each the other's hardest negative; they come last.
    """
    n_twins = 2 * int(round(twins * batch_size / 2))
    pairs = [s for _, s in world.iter_world(seed, step, batch_size - n_twins, vocabulary="open")]
    jpegs, captions = [s.image for s in pairs], [s.caption for s in pairs]
    rng = np.random.default_rng([seed, step, 2])
    for _ in range(n_twins // 2):
        for image, caption, _scene in world.make_twins(rng):
            jpegs.append(world.encode_jpeg(image))
            captions.append(caption)
    return jpegs, captions, pairs


def word_order_negatives(captions: Sequence[str], rng: np.random.Generator) -> list[str]:
    """One hard negative per caption, NegCLIP-style: the same words in another order.

    Half the time two words trade places, otherwise all words are permuted; never the caption itself.
    Trained against, they make the text tower read word order instead of a bag of words.
    """
    out = []
    for caption in captions:
        words = caption.replace(",", "").split()
        for _ in range(10):
            if rng.random() < 0.5:
                i, j = rng.choice(len(words), 2, replace=False)
                perm = list(range(len(words)))
                perm[i], perm[j] = perm[j], perm[i]
            else:
                perm = rng.permutation(len(words))
            negative = " ".join(words[k] for k in perm)
            if negative != " ".join(words):
                break
        out.append(negative)
    return out


_SHAPE_WORDS = {world._plural(shape, n): (shape, n) for shape in world.OPEN_SHAPES for n in (1, 2)}


def shape_negatives(captions: Sequence[str], rng: np.random.Generator) -> list[str]:
    """One hard negative per caption: its shape named as another shape (NegCLIP's swapped concepts).

    Trained against, they make the image tower see shapes, not only colours, sizes and places. A
    caption naming no shape (an empty scene) gets a word-order negative instead.
    """
    out = []
    for caption in captions:
        words = caption.split()
        at = [i for i, w in enumerate(words) if w.rstrip(",") in _SHAPE_WORDS]
        if not at:
            out.extend(word_order_negatives([caption], rng))
            continue
        shape, n = _SHAPE_WORDS[words[at[0]].rstrip(",")]
        other = str(rng.choice([s for s in world.OPEN_SHAPES if s != shape]))
        for i in at:
            words[i] = world._plural(other, n) + ("," if words[i].endswith(",") else "")
        out.append(" ".join(words))
    return out


def contrastive_loss(image_features, text_features, negative_features, logit_scale):
    """CLIP's symmetric InfoNCE, with hard-negative texts (or None) added to each image's candidates."""
    import torch
    import torch.nn.functional as F

    labels = torch.arange(len(image_features), device=image_features.device)
    candidates = torch.cat([text_features, negative_features]) if negative_features is not None else text_features
    per_image = logit_scale * image_features @ candidates.T
    per_text = logit_scale * text_features @ image_features.T
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


SELECTION_KEYS = ("auroc_image_all", "auroc_caption", "auroc_pair",
                  "noise_frac_p_below_0.01", "gibberish_frac_p_below_0.01")


def selection_score(ev: dict) -> float:
    """Checkpoint-selection score: mean of the pooled AUROCs and the noise/gibberish p<0.01 fractions."""
    return float(np.mean([ev[k] for k in SELECTION_KEYS]))


def train(steps: int = 300, seed: int = 0, batch_size: int = 256, lr: float = 2e-3,
          weight_decay: float = 0.1, warmup: int = 30, threads: int = 2,
          select_every: int = 25, select_from: int = 100, val_samples: int = 1000, hard_negatives: bool = True,
          shape_negatives_too: bool = True, twins: float = 0.0,
          warm_start_steps: tuple[int, int] = WARM_START_STEPS, warm_start_batch: int = 128,
          warm_start_lr: float = 3e-3, concept_weight: float = 0.3, splice_rate: float = SPLICE_RATE,
          splice_keep: int = SPLICE_KEEP, norm_weight: float = NORM_WEIGHT):
    """Warm-start the image tower, then train ``wclip-demo`` with CLIP's loss; return (model, info).

    First the image tower alone learns the open world's labels (:mod:`pipeline.demo.warmstart`):
    ``warm_start_steps[0]`` steps of shapes and colours, each on its own embedding coordinate, then
    ``warm_start_steps[1]`` of every attribute. Then both towers train contrastively on clean
    pairs of the open (pre-training) world, each image against its caption, the batch's other
    captions and hard negatives: a word-order shuffle of its caption (:func:`word_order_negatives`,
    unless ``hard_negatives`` is False) and its caption with the shape swapped
    (:func:`shape_negatives`, if ``shape_negatives_too``), while ``concept_weight`` keeps the shape and
    colour coordinates (0 lets CLIP reuse them). A ``splice_rate`` share of the warm start's second
    stage is spliced scenes (:func:`pipeline.demo.warmstart.splice`) that teach the backgrounds at the
    top and bottom edge, and ``splice_keep`` spliced scenes join each CLIP step's image batch to keep
    them readable (with weight ``concept_weight``). A ``twins`` share of each batch can be minimal pairs
    (:func:`train_batch`; off: it did not help). From step ``select_from`` on, every ``select_every``
    steps (and at the end) the model is scored on a labelled validation world (its own seed,
    never the test world) and the checkpoint with the best :func:`selection_score` is kept.
    """
    import torch

    from pipeline.demo import warmstart as demo_warmstart

    opts = SimpleNamespace(**{k: v for k, v in locals().items() if k not in ("torch", "demo_warmstart")})
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    model, preprocess, tokenizer = create_model()
    model.train()
    begin = time.time()
    heads = demo_warmstart.AttributeHeads(model.text_projection.shape[1], concepts=demo_warmstart.CONCEPTS)
    warm = demo_warmstart.warm_start(model, preprocess, heads,
                                     [(warm_start_steps[0], heads.concepts),
                                      (warm_start_steps[1], tuple(demo_warmstart.ATTRIBUTES))],
                                     seed=seed, batch_size=warm_start_batch, lr=warm_start_lr,
                                     splice_rate=splice_rate)
    opt, sched, clipped = _optimiser(model, heads, opts)
    negatives_rng = np.random.default_rng([seed, 1])
    validation = metrics.eval_worlds(VALIDATION_SEED, val_samples, val_samples, 0.3) if select_every > 0 else None
    best, history = (None, -1.0, 0), []
    start, losses = time.time(), []
    log.info("training %s: %d steps x %d pairs, seed %d, %d threads, load average %s", MODEL_NAME, steps,
             batch_size, seed, threads, os.getloadavg())
    for step in range(steps):
        loss, loss_total = _step_loss(model, heads, preprocess, tokenizer, step, negatives_rng, opts)
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(clipped, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f logit_scale %.1f %.0fs", step + 1, steps, losses[-1],
                     model.logit_scale.exp().item(), time.time() - start)
        if validation and step + 1 >= select_from and ((step + 1) % select_every == 0 or step == steps - 1):
            best = _validate(model, preprocess, tokenizer, validation, step, history, best)
    if best[0] is not None:
        model.load_state_dict(best[0])
    model.eval()
    timing = {"train_seconds": round(time.time() - begin, 1), "contrastive_seconds": round(time.time() - start, 1)}
    return model, _train_info(model, heads, opts, warm, losses, timing, best, history, validation is not None)


def _optimiser(model, heads, opts) -> tuple:
    """AdamW (weight decay on the matrices only), warm-up then cosine schedule, and the clipped parameters."""
    import torch

    from pipeline.demo import warmstart as demo_warmstart

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    rest += [heads.scale, heads.bias] + [p for e in demo_warmstart.EDGES for p in heads.linear[e].parameters()]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=opts.lr, betas=(0.9, 0.98), eps=1e-6)
    steps, warmup = opts.steps, opts.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    return opt, sched, decay + rest


def _step_loss(model, heads, preprocess, tokenizer, step: int, negatives_rng, opts) -> tuple:
    """One CLIP step's contrastive loss and the total it is trained on (concepts, spliced edges, norms)."""
    import torch
    import torch.nn.functional as F

    from pipeline.demo import warmstart as demo_warmstart

    seed = opts.seed
    jpegs, captions, samples = train_batch(seed, step, opts.batch_size, opts.twins)
    images, tokens = to_batch(jpegs, captions, preprocess, tokenizer)
    spliced = []
    if opts.concept_weight and opts.splice_rate and opts.splice_keep:
        # spliced scenes join the batch's single image forward, so BatchNorm sees them only as a
        # small share of one batch (a separate small forward would skew its running statistics)
        spliced = demo_warmstart.splice(samples[:opts.splice_keep], 1.0, np.random.default_rng([seed, step, 4]))
        images = torch.cat([images, demo_warmstart.image_batch(spliced, preprocess)])
    features = model.encode_image(images)
    image_features = F.normalize(features[:len(jpegs)], dim=-1)
    text_features = model.encode_text(tokens, normalize=True)
    negatives = None
    if opts.hard_negatives:
        texts = word_order_negatives(captions, negatives_rng)
        if opts.shape_negatives_too:
            texts += shape_negatives(captions, negatives_rng)
        negatives = model.encode_text(tokenizer(texts), normalize=True)
    loss = contrastive_loss(image_features, text_features, negatives, model.logit_scale.exp())
    loss_total = loss
    if opts.concept_weight:
        concepts = heads.loss(image_features[:len(samples)], samples, heads.concepts)
        if spliced:
            concepts = concepts + heads.loss(features[len(jpegs):], spliced, demo_warmstart.EDGES)
        loss_total = loss + opts.concept_weight * concepts
    if opts.norm_weight:
        loss_total = loss_total + opts.norm_weight * features[:len(jpegs)].norm(dim=-1).log().var()
    return loss, loss_total


def _validate(model, preprocess, tokenizer, validation, step: int, history: list, best: tuple) -> tuple:
    """Score the model on the validation world, record it in ``history``; the new best ``(state, score, step)``."""
    model.eval()
    ev = metrics.evaluate(model, preprocess, tokenizer, *validation)
    model.train()
    history.append({"step": step + 1, "score": round(selection_score(ev), 4), "auroc": ev["auroc"],
                    **{k: ev[k] for k in SELECTION_KEYS}})
    log.info("validation at step %d: score %.4f %s", step + 1, history[-1]["score"], ev["auroc"])
    if history[-1]["score"] > best[1]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, history[-1]["score"], step + 1
    return best


def _train_info(model, heads, opts, warm, losses: list, timing: dict, best: tuple, history: list,
                validated: bool) -> dict:
    """What ``wclip-demo.train.json`` records of a training run."""
    tail = losses[-min(20, len(losses)):]
    return {"seed": opts.seed, "steps": opts.steps, "batch_size": opts.batch_size, "lr": opts.lr,
            "weight_decay": opts.weight_decay, "warmup": opts.warmup, "threads": opts.threads, "world": "open",
            "hard_negatives": opts.hard_negatives, "shape_negatives": opts.shape_negatives_too, "twins": opts.twins,
            "warm_start_steps": list(opts.warm_start_steps), "warm_start": warm,
            "concepts": list(heads.concepts), "concept_weight": opts.concept_weight,
            "splice_rate": opts.splice_rate, "splice_keep": opts.splice_keep, "norm_weight": opts.norm_weight,
            **timing, "final_loss": round(float(np.mean(tail)), 4), "first_loss": round(losses[0], 4),
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count(),
            "logit_scale": round(model.logit_scale.exp().item(), 2),
            "selection": {"validation_seed": VALIDATION_SEED, "validation_samples": opts.val_samples,
                          "every": opts.select_every, "from": opts.select_from, "selected_step": best[2] or opts.steps,
                          "score": "mean of " + ", ".join(SELECTION_KEYS),
                          "history": history} if validated else None}


def main(steps: int = 300, seed: int = 0, output=WEIGHTS_PATH, eval_samples: int = 4000, **train_kwargs) -> dict:
    """Train, save to ``output`` (+ ``.train.json`` beside it), reload as shipped, evaluate; return the record."""
    import open_clip
    import torch

    wall = time.time()
    model, info = train(steps=steps, seed=seed, **train_kwargs)
    output = Path(output)
    sha = save_weights(model, output)
    sel = info["selection"]
    model, preprocess, tokenizer = create_model()
    load_weights(model, output)
    record = {"model": MODEL_NAME, "config": json.loads(CONFIG_PATH.read_text()), "weights": output.name,
              "weights_sha256": sha, "weights_bytes": output.stat().st_size, **info,
              "command": (f"wclip train-demo --steps {steps} --seed {seed} --lr {info['lr']:g} "
                          f"--batch-size {info['batch_size']} --threads {info['threads']} "
                          f"--select-every {sel['every'] if sel else 0} --select-from {sel['from'] if sel else 0} "
                          f"--eval-samples {eval_samples}"
                          + f" --warm-start {info['warm_start_steps'][0]},{info['warm_start_steps'][1]}"
                          + f" --concept-weight {info['concept_weight']:g}"
                          + f" --splice-rate {info['splice_rate']:g} --splice-keep {info['splice_keep']}"
                          + f" --norm-weight {info['norm_weight']:g}"
                          + ("" if info["shape_negatives"] else " --no-shape-negatives")
                          + (f" --twins {info['twins']:g}" if info["twins"] else "")),
              "world_seed": seed, "samples_seen": steps * info["batch_size"],
              "torch": torch.__version__, "open_clip": open_clip.__version__, "python": platform.python_version(),
              "machine": platform.machine()}
    if eval_samples > 0:
        t = time.time()
        record["eval"] = evaluate(model, preprocess, tokenizer, n_reference=eval_samples, n_target=eval_samples)
        record["eval_seconds"] = round(time.time() - t, 1)
    record["wall_seconds"] = round(time.time() - wall, 1)
    write_record(record_path(output), record)
    return record


def write_record(path, record: dict) -> None:
    """Write a training record (indented JSON), crash-safe."""
    write_atomic(path, (json.dumps(record, indent=2) + "\n").encode())


def evaluate(model, preprocess, tokenizer, n_reference: int = 4000, n_target: int = 4000,
             anomaly_rate: float = 0.2, seed: int = EVAL_SEED) -> dict:
    """The recorded evaluation of ``model``: :func:`pipeline.demo.metrics.evaluate` on the test world ``seed``
    (a clean reference of ``n_reference`` samples, a target of ``n_target`` with ``anomaly_rate`` anomalies)."""
    worlds = metrics.eval_worlds(seed, n_reference, n_target, anomaly_rate)
    return {"eval_seed": seed, **metrics.evaluate(model, preprocess, tokenizer, *worlds)}


def reevaluate(output=WEIGHTS_PATH, eval_samples: int = 4000, threads: int = 2) -> dict:
    """Evaluate the weights at ``output`` again, without training, and rewrite the evaluation in their record.

    The record beside them (:func:`record_path`) must describe these weights (same sha256). The evaluation
    it held moves to ``eval_previous``; ``eval_note`` says when and how the new one was made. Returns the record.
    """
    import torch

    from pipeline.errors import ConfigError

    output, path = Path(output), record_path(output)
    record = json.loads(path.read_text())
    sha = models.file_sha256(output)
    if record.get("weights_sha256") != sha:
        raise ConfigError(f"{path} describes weights with sha256 {record.get('weights_sha256')}, not {output} "
                          f"(sha256 {sha}); retrain with `wclip train-demo` to get a record of these weights")
    torch.set_num_threads(threads)
    model, preprocess, tokenizer = create_model()
    load_weights(model, output)
    t = time.time()
    ev = evaluate(model, preprocess, tokenizer, n_reference=eval_samples, n_target=eval_samples)
    if "eval" in record:
        record["eval_previous"] = {**record["eval"], "eval_seconds": record.get("eval_seconds")}
    record["eval"], record["eval_seconds"] = ev, round(time.time() - t, 1)
    record["eval_note"] = (f"evaluation recomputed on {datetime.date.today().isoformat()} with the product's "
                           f"scorer, pipeline.whitening.WhiteningStats.fit(components={metrics.FIT['components']!r}, "
                           f"shrinkage={metrics.FIT['shrinkage']:g}, holdout={metrics.FIT['holdout']:g}, hold-out by "
                           f"a hash of the sample key, seed {metrics.FIT['seed']}) and its sqnorm, loglik and pvalue, "
                           f"on the same test world (seed {ev['eval_seed']}, {eval_samples} reference and "
                           f"{eval_samples} target samples), without retraining: the weights are unchanged "
                           f"(sha256 {sha}). eval_previous holds the evaluation it replaced.")
    write_record(path, record)
    return record
