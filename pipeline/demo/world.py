"""A procedurally generated image–caption world (:mod:`pipeline.demo.shards` writes it as
img2dataset-style WebDataset shards).

Scenes are coloured shapes on a background; captions describe them in varied phrasing.
Labelled anomalies (image, caption or pair) can be injected, so scores can be checked
against ground truth. Output is deterministic for a given seed: same seed, same bytes.

Two vocabularies. The ``reference`` world (the default) is the corpus a data team curates: four
shapes, six colours, every scene holds objects; anomalies are defined against it ("unseen" means
absent from it). The ``open`` world is what the demo CLIP is pre-trained on, as a real CLIP is
pre-trained on the web: every shape and colour, and some empty scenes. It holds no anomalies.

A reference world made with ``unseen_pairs=True`` (``wclip demo``'s) never pairs the shapes and colours
of :data:`UNSEEN_PAIRS`, though each of them is common there; its one extra anomaly kind,
``unseen_pairing``, is a scene of exactly such a pair, drawn and described consistently. A scene whose
first draw would show a withheld pair is drawn again from the sample's own RNG, so every other sample
is the one the world without ``unseen_pairs`` holds; that world, the default, is unchanged.

A world made with ``duplicate_rate`` (``wclip demo``'s target) holds near-duplicates: of its normal rows, a
share are copies of another normal row's scene (:func:`make_duplicate`: the same drawing with fresh sensor
noise, near but not byte-identical, under a worse caption), labelled ``duplicate_of`` (the faithful row's
key; None on every other row). They are normal rows, not anomalies; every other sample is the one the world
without duplicates holds, and a world without them (the default) is unchanged, its labels included.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64                      # image side in pixels
JPEG_QUALITY = 90

SHAPES = ("circle", "square", "triangle", "diamond")
UNSEEN_SHAPES = ("star", "cross")
COLOURS = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 65, 215),
           "yellow": (235, 215, 35), "white": (242, 242, 242), "black": (18, 18, 18)}
UNSEEN_COLOURS = {"orange": (250, 135, 0), "purple": (140, 40, 190), "pink": (250, 120, 190),
                  "cyan": (0, 215, 215)}
BACKGROUNDS = {"white": (242, 242, 242), "black": (18, 18, 18), "gray": (128, 128, 128),
               "blue": (35, 65, 215), "green": (35, 165, 55), "yellow": (235, 215, 35)}
SIZES = {"small": (5.0, 7.5), "large": (10.0, 13.0)}   # radius range in pixels
POSITIONS = {"top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48),
             "bottom right": (48, 48), "center": (32, 32)}
NUMBERS = {1: "one", 2: "two", 3: "three"}
STYLES = ("photo", "drawing")

OPEN_SHAPES = SHAPES + UNSEEN_SHAPES                 # the open (pre-training) world's vocabulary
OPEN_COLOURS = {**COLOURS, **UNSEEN_COLOURS}
VOCABULARIES = ("reference", "open")
OPEN_EMPTY_RATE = 0.05         # share of empty scenes (background only) in the open world

IMAGE_ANOMALIES = ("noise", "blank", "damaged", "unseen_shape", "unseen_colour")
CAPTION_ANOMALIES = ("gibberish", "ungrammatical")
PAIR_ANOMALIES = ("mismatch",)
ANOMALY_KINDS = IMAGE_ANOMALIES + CAPTION_ANOMALIES + PAIR_ANOMALIES   # every world's kinds (the default)

#: (shape, colour) pairs that a world made with ``unseen_pairs=True`` never shows, but as its
#: ``unseen_pairing`` anomalies: one colour per shape, so each shape keeps five of its six colours and
#: each of these colours three of its four shapes.
UNSEEN_PAIRS = (("circle", "red"), ("square", "green"), ("triangle", "blue"), ("diamond", "yellow"))
#: Kinds only a world with ``unseen_pairs=True`` holds: a scene whose image and caption agree on a pair
#: of :data:`UNSEEN_PAIRS` (modality ``"scene"``: both sides show it, consistently).
SCENE_ANOMALIES = ("unseen_pairing",)
ALL_ANOMALY_KINDS = ANOMALY_KINDS + SCENE_ANOMALIES
#: Sensor noise (standard deviation, in 0-255 levels) a duplicate adds to its source's pixels: the demo CLIP
#: puts 97.5% of such copies at image cosine >= 0.997 to their source, where no two of 1000 distinct scenes are.
DUPLICATE_NOISE = 1.0


def anomaly_modality(kind: str | None) -> str | None:
    """Which side a kind of anomaly lives on: ``"image"``, ``"caption"``, ``"pair"``, ``"scene"`` or None."""
    if kind is None:
        return None
    for name, kinds in (("image", IMAGE_ANOMALIES), ("caption", CAPTION_ANOMALIES), ("pair", PAIR_ANOMALIES),
                        ("scene", SCENE_ANOMALIES)):
        if kind in kinds:
            return name
    raise ValueError(f"unknown anomaly kind {kind!r}; expected one of {', '.join(ALL_ANOMALY_KINDS)}")


@dataclass
class Scene:
    """A background and one to three identical objects, each (shape, colour, size, x, y, r)."""

    background: str
    objects: list = field(default_factory=list)
    position: str | None = None    # named position of a single object, when there is one
    style: str = "photo"           # "photo" (lighting gradient, sensor noise) or "drawing" (flat colours)

    def groups(self) -> list[tuple[str, str, str, int]]:
        """(shape, colour, size, count) per distinct group, in drawing order."""
        out: dict = {}
        for shape, colour, size, *_ in self.objects:
            out[(shape, colour, size)] = out.get((shape, colour, size), 0) + 1
        return [(*k, n) for k, n in out.items()]


@dataclass
class WorldSample:
    """One generated pair: JPEG bytes, caption and the labels stored in its .json."""

    image: bytes
    caption: str
    labels: dict


def _plural(shape: str, n: int) -> str:
    if n == 1:
        return shape
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


def _random_scene(rng: np.random.Generator, shapes=SHAPES, colours=COLOURS, empty_rate: float = 0.0) -> Scene:
    background = str(rng.choice(list(BACKGROUNDS)))
    if empty_rate and rng.random() < empty_rate:
        return Scene(background=background, style=str(rng.choice(STYLES)))
    shape = str(rng.choice(shapes))
    colour = str(rng.choice([c for c in colours if c != background]))
    size, count = str(rng.choice(list(SIZES))), int(rng.choice([1, 1, 2, 3]))
    scene = Scene(background=background, style=str(rng.choice(STYLES)))
    if count == 1:
        scene.position = str(rng.choice(list(POSITIONS)))
    placed: list = []
    for _ in range(count):
        r = float(rng.uniform(*SIZES[size]))
        if scene.position:
            cx, cy = (v + rng.uniform(-3, 3) for v in POSITIONS[scene.position])
        else:
            for _attempt in range(100):
                cx, cy = rng.uniform(r + 1, SIZE - r - 1, 2)
                if all(math.hypot(cx - x, cy - y) > r + pr for x, y, pr in placed):
                    break
        placed.append((cx, cy, r))
        scene.objects.append((shape, colour, size, float(cx), float(cy), r))
    return scene


def _pairing(scene: Scene) -> tuple[str, str] | None:
    """The (shape, colour) of a scene's objects (all alike), None for an empty scene."""
    return scene.objects[0][:2] if scene.objects else None


def _scene_of(rng: np.random.Generator, shapes, colours, unseen: bool | None) -> Scene:
    """A scene of ``shapes`` and ``colours``; ``unseen`` True: redrawn until it pairs as in :data:`UNSEEN_PAIRS`,
    False: until it does not, None: the first draw. A first draw that fits is the scene of a world without
    ``unseen_pairs`` (same RNG draws), so only scenes that would show a pair of them change."""
    while True:
        scene = _random_scene(rng, shapes, colours)
        if unseen is None or (_pairing(scene) in UNSEEN_PAIRS) == unseen:
            return scene


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        d = r * 0.85
        return [(cx - d, cy - d), (cx + d, cy - d), (cx + d, cy + d), (cx - d, cy + d)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                 cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
    if shape == "cross":
        a, b = r, r * 0.35
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(f"unknown shape {shape!r}")


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 18) -> tuple[int, ...]:
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255))


def render(scene: Scene, rng: np.random.Generator, scale: int = 4) -> np.ndarray:
    """Draw ``scene`` as a ``(SIZE, SIZE, 3)`` uint8 array in its style."""
    big = SIZE * scale
    img = Image.new("RGB", (big, big), _jitter(rng, BACKGROUNDS[scene.background], 10))
    draw = ImageDraw.Draw(img)
    for shape, colour, _size, cx, cy, r in scene.objects:
        fill = _jitter(rng, OPEN_COLOURS[colour])
        if shape == "circle":
            draw.ellipse([(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale], fill=fill)
        else:
            draw.polygon([(x * scale, y * scale) for x, y in _polygon(shape, cx, cy, r)], fill=fill)
    pixels = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32)
    if scene.style == "photo":                               # lighting gradient and sensor noise
        slope, sigma = rng.uniform(-14, 14, 2), rng.uniform(3, 7)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) - 0.5
        pixels += (slope[0] * yy + slope[1] * xx)[..., None] + rng.normal(0, sigma, pixels.shape)
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


_TEMPLATES_ONE = ("a {size} {colour} {shape}", "a {size} {colour} {shape} in the {pos}",
                  "a {colour} {shape} on a {bg} background", "a {size} {colour} {shape} in the {pos} of the image",
                  "a {colour} {shape} in the {pos}, {bg} background", "a {size} {colour} {shape} on {bg}")
_TEMPLATES_MANY = ("{num} {size} {colour} {shapes} on a {bg} background", "{num} {colour} {shapes}",
                   "{num} {colour} {shapes} against a {bg} background", "{num} {size} {colour} {shapes}")
_TEMPLATES_EMPTY = ("an empty {bg} background", "a plain {bg} background", "nothing on a {bg} background",
                    "a blank {bg} image")
_PREFIXES = {"photo": ("a photo of ", "a photograph of "), "drawing": ("a drawing of ", "a flat illustration of ")}


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """A caption for ``scene`` in one of several phrasings, most of them naming its style."""
    if not scene.objects:
        body = str(rng.choice(_TEMPLATES_EMPTY)).format(bg=scene.background)
        return (str(rng.choice(_PREFIXES[scene.style])) if rng.random() < 0.8 else "") + body
    shape, colour, size, n = scene.groups()[0]
    if n == 1:
        body = str(rng.choice(_TEMPLATES_ONE)).format(size=size, colour=colour, shape=shape,
                                                      pos=scene.position, bg=scene.background)
    else:
        body = str(rng.choice(_TEMPLATES_MANY)).format(num=NUMBERS[n], size=size, colour=colour,
                                                       shapes=_plural(shape, n), bg=scene.background)
    return (str(rng.choice(_PREFIXES[scene.style])) if rng.random() < 0.8 else "") + body


def _damage(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = img.copy()
    if rng.random() < 0.5:                       # truncated download: rows below a cut are flat filler
        filler = (128, 128, 128) if abs(int(out[-1, 0].astype(int).sum()) - 384) > 60 else (0, 135, 0)
        out[int(rng.integers(SIZE // 4, SIZE // 2)):] = filler
    else:                                        # a large block of scrambled (random) bytes
        h, w = rng.integers(SIZE // 2, SIZE * 3 // 4 + 1, 2)
        y, x = rng.integers(0, SIZE - h + 1), rng.integers(0, SIZE - w + 1)
        out[y:y + h, x:x + w] = rng.integers(0, 256, (h, w, 3))
    return out


def _gibberish(rng: np.random.Generator) -> str:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, int(rng.integers(2, 9)))) for _ in range(int(rng.integers(3, 8))))


def _shuffled(caption: str, rng: np.random.Generator) -> str:
    words = caption.replace(",", "").split()
    for _ in range(10):
        out = " ".join(words[i] for i in rng.permutation(len(words)))
        if out != caption.replace(",", ""):
            return out
    return " ".join(reversed(words))


def make_pair(rng: np.random.Generator, anomaly: str | None = None,
              vocabulary: str = "reference", unseen_pairs: bool = False) -> tuple[np.ndarray, str, Scene]:
    """One ``(image array, caption, scene)``; ``anomaly`` (a kind name or None) corrupts it.

    ``vocabulary="open"`` draws a clean pair from the pre-training world (see the module doc).
    ``unseen_pairs``: no scene (nor a mismatch's caption) pairs as in :data:`UNSEEN_PAIRS`, but the
    ``unseen_pairing`` anomaly's, which always does.
    """
    anomaly_modality(anomaly)
    _check_world(() if anomaly is None else (anomaly,), vocabulary, unseen_pairs)
    if vocabulary == "open":
        if anomaly is not None:
            raise ValueError("the open world holds no anomalies: they are defined against the reference world")
        scene = _random_scene(rng, OPEN_SHAPES, OPEN_COLOURS, OPEN_EMPTY_RATE)
        return render(scene, rng), describe(scene, rng), scene
    shapes = UNSEEN_SHAPES if anomaly == "unseen_shape" else SHAPES
    colours = UNSEEN_COLOURS if anomaly == "unseen_colour" else COLOURS
    unseen = (anomaly == "unseen_pairing") if unseen_pairs else None
    scene = _scene_of(rng, shapes, colours, unseen)
    image, caption = render(scene, rng), describe(scene, rng)
    if anomaly == "noise":
        image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    elif anomaly == "blank":
        image = np.full((SIZE, SIZE, 3), _jitter(rng, BACKGROUNDS[str(rng.choice(list(BACKGROUNDS)))], 10), np.uint8)
    elif anomaly == "damaged":
        image = _damage(image, rng)
    elif anomaly == "gibberish":
        caption = _gibberish(rng)
    elif anomaly == "ungrammatical":
        caption = _shuffled(caption, rng)
    elif anomaly == "mismatch":
        key = {g[:2] for g in scene.groups()}
        while True:
            other = _scene_of(rng, SHAPES, COLOURS, False if unseen_pairs else None)
            if not key & {g[:2] for g in other.groups()}:
                break
        caption = describe(other, rng)
    return image, caption, scene


def make_twins(rng: np.random.Generator) -> list[tuple[np.ndarray, str, Scene]]:
    """Two open-world pairs identical but for their objects' shape: a minimal pair for training.

    Same background, colour, size, places, style, lighting, noise and phrasing; only the shape (and
    the shape's word in the caption) differs, so telling them apart takes seeing the shape.
    """
    scene = _random_scene(rng, OPEN_SHAPES, OPEN_COLOURS)
    other = str(rng.choice([s for s in OPEN_SHAPES if s != scene.objects[0][0]]))
    twin = Scene(scene.background, [(other, *o[1:]) for o in scene.objects], scene.position, scene.style)
    render_seed, phrasing_seed = (int(v) for v in rng.integers(0, 2 ** 63, 2))
    return [(render(s, np.random.default_rng(render_seed)), describe(s, np.random.default_rng(phrasing_seed)), s)
            for s in (scene, twin)]


def make_duplicate(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A near-duplicate of a normal pair's ``image`` of ``scene``: ``(image, caption)``.

    The same drawing (shapes, colours, layout, lighting) with fresh sensor noise (:data:`DUPLICATE_NOISE`),
    under a worse caption: one phrased as :func:`describe` does but giving the wrong number of objects (two
    or three for one object, one, "in the center", for several). So of the two copies the source is the one
    whose caption fits its image: the demo CLIP scores it higher in 98.8% of 1000 scenes.
    """
    if not scene.objects:
        raise ValueError("a duplicate needs a scene with objects: its caption miscounts them")
    noisy = np.clip(image + rng.normal(0.0, DUPLICATE_NOISE, image.shape), 0, 255).round().astype(np.uint8)
    n = len(scene.objects)
    wrong = int(rng.choice([2, 3])) if n == 1 else 1
    told = Scene(scene.background, [scene.objects[0]] * wrong, (scene.position or "center") if wrong == 1 else None,
                 scene.style)
    return noisy, describe(told, rng)


def encode_jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes of a uint8 RGB array at the world's quality."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _plan(rng: np.random.Generator, n: int, rate: float, kinds: Sequence[str]) -> list[str | None]:
    """Exactly ``round(rate * n)`` anomalies, kinds spread evenly, at random positions."""
    plan: list[str | None] = [None] * n
    count = int(round(rate * n)) if kinds else 0
    order = list(rng.permutation(len(kinds)))
    for j, pos in enumerate(rng.choice(n, count, replace=False)):
        plan[int(pos)] = kinds[order[j % len(kinds)]]
    return plan


def _duplicates(rng: np.random.Generator, plan: list, rate: float) -> dict[int, int]:
    """``{copy position: source position}``: ``round(rate * n)`` copies (at most half the normal rows), each of
    its own source, both normal positions drawn at random."""
    normal = [i for i, kind in enumerate(plan) if kind is None]
    count = min(int(round(rate * len(plan))), len(normal) // 2)
    chosen = [int(i) for i in rng.choice(normal, 2 * count, replace=False)] if count else []
    return dict(zip(chosen[count:], chosen[:count]))


def _check_vocabulary(vocabulary: str) -> None:
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"unknown vocabulary {vocabulary!r}; expected one of {', '.join(VOCABULARIES)}")


def _check_world(kinds, vocabulary: str, unseen_pairs: bool) -> None:
    _check_vocabulary(vocabulary)
    if unseen_pairs and vocabulary != "reference":
        raise ValueError(f"unseen_pairs withholds pairs of the reference world; the {vocabulary} world has all")
    if not unseen_pairs and set(kinds or ()) & set(SCENE_ANOMALIES):
        raise ValueError("unseen_pairing anomalies need a world that never shows those pairs otherwise: "
                         "pass unseen_pairs=True")


def validate(anomaly_rate: float, anomaly_kinds, vocabulary: str = "reference",
             unseen_pairs: bool = False, duplicate_rate: float = 0.0) -> tuple[str, ...]:
    """Check a world's anomaly rate, kinds (None: all it can hold), vocabulary and duplicate rate; return the
    kinds."""
    if not 0.0 <= anomaly_rate <= 1.0:
        raise ValueError(f"anomaly_rate must be in [0, 1], got {anomaly_rate!r}")
    _check_vocabulary(vocabulary)
    if vocabulary == "open" and anomaly_rate > 0:
        raise ValueError("the open world holds no anomalies (they are defined against the reference "
                         "world): use anomaly_rate 0 with vocabulary 'open'")
    _check_duplicates(duplicate_rate, anomaly_rate, vocabulary)
    if anomaly_kinds is None:
        anomaly_kinds = ALL_ANOMALY_KINDS if unseen_pairs else ANOMALY_KINDS
    kinds = tuple(anomaly_kinds)
    for kind in kinds:
        anomaly_modality(kind)
    _check_world(kinds, vocabulary, unseen_pairs)
    return kinds


def _check_duplicates(duplicate_rate: float, anomaly_rate: float, vocabulary: str) -> None:
    if not 0.0 <= duplicate_rate <= 0.5:
        raise ValueError(f"duplicate_rate must be in [0, 0.5], got {duplicate_rate!r}")
    if duplicate_rate > 0 and vocabulary != "reference":
        raise ValueError(f"duplicates copy scenes of the reference world; the {vocabulary} world holds none")
    if anomaly_rate + 2 * duplicate_rate > 1.0:
        raise ValueError(f"each duplicate and its source are normal rows: anomaly_rate + 2 * duplicate_rate "
                         f"must be <= 1, got {anomaly_rate!r} + 2 * {duplicate_rate!r}")


def _labels(key: str, sample: tuple, jpeg: bytes, seed: int, vocabulary: str, anomaly: str | None) -> dict:
    """The .json of one sample: img2dataset's fields and the scene's truth (of the image, whatever the caption)."""
    _, caption, scene = sample
    groups = scene.groups()
    open_tag = "" if vocabulary == "reference" else "open"
    return {
        "url": f"https://world.wclip.invalid/{open_tag and open_tag + '/'}s{seed}/{key}.jpg",
        "uid": hashlib.md5(f"wclip-world:{open_tag and open_tag + ':'}{seed}:{key}".encode()).hexdigest(),
        "key": key, "caption": caption, "status": "success", "error_message": None,
        "width": SIZE, "height": SIZE, "original_width": SIZE, "original_height": SIZE,
        "sha256": hashlib.sha256(jpeg).hexdigest(),
        "anomaly": anomaly, "anomaly_modality": anomaly_modality(anomaly),
        "background": scene.background, "count": len(scene.objects), "position": scene.position,
        "style": scene.style,
        "shapes": ",".join(g[0] for g in groups), "colours": ",".join(g[1] for g in groups),
        "sizes": ",".join(g[2] for g in groups),
        "objects": [dict(zip(("shape", "colour", "size", "x", "y", "r"), (*o[:3], *(round(v, 2) for v in o[3:]))))
                    for o in scene.objects],
    }


def iter_world(seed: int, shard: int, n: int, anomaly_rate: float = 0.0,
               anomaly_kinds: Sequence[str] | None = None, key_digits: int = 4,
               vocabulary: str = "reference", unseen_pairs: bool = False,
               duplicate_rate: float = 0.0) -> Iterator[tuple[str, WorldSample]]:
    """The ``(key, sample)`` pairs of one shard, in memory; what :func:`pipeline.demo.shards.generate_world` writes.

    ``unseen_pairs``: the world withholds :data:`UNSEEN_PAIRS` and its kinds (None: all) include
    ``unseen_pairing``; ``duplicate_rate``: that share of its rows are near-duplicates of another of its
    normal rows, labelled ``duplicate_of`` (see the module doc)."""
    kinds = validate(anomaly_rate, anomaly_kinds, vocabulary, unseen_pairs, duplicate_rate)
    plan = _plan(np.random.default_rng([seed, shard, 1]), n, anomaly_rate, kinds)
    copies = _duplicates(np.random.default_rng([seed, shard, 2]), plan, duplicate_rate)

    def key_of(i: int) -> str:
        return f"{shard * 10 ** key_digits + i:0{5 + key_digits}d}"

    for i, anomaly in enumerate(plan):
        source = copies.get(i, i)
        image, caption, scene = make_pair(np.random.default_rng([seed, shard, 0, source]), anomaly, vocabulary,
                                          unseen_pairs)
        if i in copies:
            image, caption = make_duplicate(image, scene, np.random.default_rng([seed, shard, 3, i]))
        jpeg = encode_jpeg(image)
        labels = _labels(key_of(i), (image, caption, scene), jpeg, seed, vocabulary, anomaly)
        if duplicate_rate > 0:
            labels["duplicate_of"] = key_of(copies[i]) if i in copies else None
        yield key_of(i), WorldSample(jpeg, caption, labels)
