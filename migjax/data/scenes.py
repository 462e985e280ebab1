"""Procedurally generated CLEVR-style scenes (simple shaded 3-D objects on a ground plane,
rendered with PIL) with multi-step questions, reference answers and step-by-step solutions.

Splits follow CLEVR-CoGenT: `train` and `test` draw scenes under condition A (cubes are gray,
blue, brown or yellow; cylinders red, green, purple or cyan), `ood` under condition B (the two
colour sets swapped) and with more objects per scene. Spheres take every colour in both.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from PIL import Image, ImageDraw

COLORS = {  # CLEVR's palette
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
SHAPES = ("cube", "sphere", "cylinder")
SIZES = ("small", "large")
MATERIALS = ("rubber", "metal")
ATTRIBUTES = ("size", "color", "material", "shape")  # the order descriptions use
VALUES = {"size": SIZES, "color": tuple(COLORS), "material": MATERIALS, "shape": SHAPES}
QTYPES = ("count", "compare", "spatial", "query", "remove")
CONDITIONS = {  # CLEVR-CoGenT: the colours cubes and cylinders may take
    "A": {"cube": ("gray", "blue", "brown", "yellow"),
          "cylinder": ("red", "green", "purple", "cyan")},
    "B": {"cube": ("red", "green", "purple", "cyan"),
          "cylinder": ("gray", "blue", "brown", "yellow")},
}
_WORD = {"color": "colour", "shape": "shape", "material": "material", "size": "size"}

# Ground plane x (left-right) and z (near-far) in [-EXTENT, EXTENT]; a pinhole camera maps the
# ground point (x, z) to normalised image coordinates u = 0.5 + F x / d, v = V0 + G / d with
# depth d = z + DEPTH. An object of diameter D appears F D / d image widths wide.
EXTENT = 3.0
_DEPTH, _F, _G, _V0 = 10.0, 0.85, 7.6, -0.235
_RADIUS = {"small": 0.35, "large": 0.7}
_GAP = 0.15  # least ground distance between two objects' footprints
_MIN_DU = 0.02  # least horizontal image distance between two objects: left/right is clear
_MIN_VISIBLE = 0.55  # least fraction of an object's box that nearer objects leave visible
_FRAME = 0.02  # margin every object box keeps from the image border
_GRID = 64  # resolution of the visibility check
_PLACE_TRIES = 60
_MAX_ATTEMPTS = 1000


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """Distribution of scenes and questions: object counts, CoGenT condition, image size,
    question types and seed."""

    min_objects: int = 3
    max_objects: int = 10
    condition: str = "A"  # CoGenT condition, a key of CONDITIONS
    width: int = 224
    height: int = 224
    qtypes: tuple[str, ...] = QTYPES
    supersample: int = 2  # render at this multiple of the size, then downsample (antialiasing)
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects <= 16:
            raise ValueError(
                f"SceneSpec: need 1 <= min_objects <= max_objects <= 16, got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}")
        if self.condition not in CONDITIONS:
            raise ValueError(f"SceneSpec: condition must be one of {tuple(CONDITIONS)}, "
                             f"got {self.condition!r}")
        if self.width < 16 or self.height < 16:
            raise ValueError(f"SceneSpec: width and height must be >= 16, got "
                             f"{self.width}x{self.height}")
        if not self.qtypes or set(self.qtypes) - set(QTYPES) or \
                len(set(self.qtypes)) != len(self.qtypes):
            raise ValueError(f"SceneSpec: qtypes must be a non-empty subset of {QTYPES} "
                             f"without repeats, got {self.qtypes!r}")
        if not 1 <= self.supersample <= 4:
            raise ValueError(f"SceneSpec: supersample must be in [1, 4], got {self.supersample}")


_PRESETS = {
    "train": SceneSpec(min_objects=3, max_objects=10, condition="A", seed=0),
    "test": SceneSpec(min_objects=3, max_objects=10, condition="A", seed=1),
    "ood": SceneSpec(min_objects=11, max_objects=13, condition="B", seed=2),
}
VARIANTS = tuple(_PRESETS)


def scene_spec(variant: str) -> SceneSpec:
    """The preset spec for `variant` in ("train", "test", "ood")."""
    if variant not in _PRESETS:
        raise ValueError(f"scene_spec: unknown variant {variant!r}; expected one of {VARIANTS}")
    return _PRESETS[variant]


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object: attributes, ground position (x, z) and image position (u, v) of its
    footprint centre as fractions of the image width and height."""

    shape: str
    color: str
    size: str
    material: str
    x: float
    z: float
    u: float
    v: float

    def attr(self, name: str) -> str:
        return getattr(self, name)


@dataclasses.dataclass(frozen=True, eq=False)
class SceneItem:
    """One problem: question, reference answer, steps and solution, the rendered image
    (uint8, height x width x 3) and the scene's objects (for checking)."""

    id: str
    question: str
    answer: str
    steps: tuple[str, ...]  # "Step n: ..." lines, one fact each
    solution: str  # "<think>\n<steps>\n</think>\n<answer>...</answer>"
    image: np.ndarray
    objects: tuple[SceneObject, ...]
    qtype: str


# ----------------------------------------------------------------------------- geometry


def project(x: float, z: float) -> tuple[float, float]:
    """Normalised image coordinates (u, v) of the ground point (x, z)."""
    d = z + _DEPTH
    return 0.5 + _F * x / d, _V0 + _G / d


def apparent_size(size: str, z: float) -> float:
    """An object's diameter in image widths at depth z."""
    return _F * 2 * _RADIUS[size] / (z + _DEPTH)


def _box(shape: str, u: float, v: float, s: float) -> tuple[float, float, float, float]:
    """Normalised (left, top, right, bottom) of an object drawn at (u, v) with diameter s."""
    if shape == "cube":
        a = 0.8 * s
        return u - 0.5 * a - 0.3 * a, v - 1.1 * a, u + 0.5 * a + 0.3 * a, v + 0.25 * a
    if shape == "cylinder":
        r = 0.45 * s
        return u - r, v - 0.85 * s - 0.3 * r, u + r, v + 0.1 * s + 0.3 * r
    return u - 0.5 * s, v - 0.9 * s, u + 0.5 * s, v + 0.1 * s


def _in_frame(box) -> bool:
    left, top, right, bottom = box
    return left >= _FRAME and top >= _FRAME and right <= 1 - _FRAME and bottom <= 1 - _FRAME


def _fits(obj: SceneObject, placed: list[SceneObject]) -> bool:
    """Whether `obj` keeps its distance from every placed object, on the ground and in u."""
    for o in placed:
        gap = _RADIUS[obj.size] + _RADIUS[o.size] + _GAP
        if (obj.x - o.x) ** 2 + (obj.z - o.z) ** 2 < gap * gap or abs(obj.u - o.u) < _MIN_DU:
            return False
    return True


def _grid_box(box) -> tuple[int, int, int, int]:
    left, top, right, bottom = (int(round(c * _GRID)) for c in box)
    return left, top, max(right, left + 1), max(bottom, top + 1)


def visible_fractions(objects) -> list[float]:
    """Per object, the fraction of its box that nearer objects' boxes leave uncovered."""
    covered = np.zeros((_GRID, _GRID), bool)
    out = [0.0] * len(objects)
    for i in sorted(range(len(objects)), key=lambda i: -objects[i].v):  # nearest first
        o = objects[i]
        left, top, right, bottom = _grid_box(_box(o.shape, o.u, o.v, apparent_size(o.size, o.z)))
        cells = covered[top:bottom, left:right]
        out[i] = 1.0 - float(cells.mean())
        cells[:] = True
    return out


# ----------------------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _sample_object(rng: np.random.Generator, spec: SceneSpec) -> tuple[str, str, str, str]:
    shape = _pick(rng, SHAPES)
    colors = CONDITIONS[spec.condition].get(shape, tuple(COLORS))
    return shape, _pick(rng, colors), _pick(rng, SIZES), _pick(rng, MATERIALS)


def _place(rng: np.random.Generator, attrs, placed: list[SceneObject]) -> SceneObject | None:
    shape, color, size, material = attrs
    for _ in range(_PLACE_TRIES):
        x, z = (round(float(c), 4) for c in rng.uniform(-EXTENT, EXTENT, 2))
        u, v = project(x, z)
        obj = SceneObject(shape, color, size, material, x, z, u, v)
        if _in_frame(_box(shape, u, v, apparent_size(size, z))) and _fits(obj, placed):
            return obj
    return None


def sample_scene(rng: np.random.Generator, spec: SceneSpec) -> tuple[SceneObject, ...]:
    """A scene of min_objects..max_objects objects that keep apart and stay visible."""
    for _ in range(_MAX_ATTEMPTS):
        n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
        placed: list[SceneObject] = []
        for _ in range(n):
            obj = _place(rng, _sample_object(rng, spec), placed)
            if obj is None:
                break
            placed.append(obj)
        if len(placed) == n and min(visible_fractions(placed)) >= _MIN_VISIBLE:
            return tuple(placed)
    raise RuntimeError(f"sample_scene: no valid scene after {_MAX_ATTEMPTS} attempts; "
                       f"spec={spec}")


# ----------------------------------------------------------------------------- rendering

_LIGHT = (-0.55, -0.65)  # direction towards the light in the image plane (upper left)
_BACKGROUND_CACHE: dict[tuple[int, int], Image.Image] = {}


def _shade(rgb, k: float) -> tuple[int, int, int]:
    """`rgb` scaled by k (> 1 brightens towards white)."""
    if k <= 1:
        return tuple(int(c * k) for c in rgb)
    t = min(k - 1, 1.0)
    return tuple(int(c + (255 - c) * t) for c in rgb)


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(x + (y - x) * t) for x, y in zip(a, b, strict=True))


def _background(width: int, height: int) -> Image.Image:
    """The ground: a vertical gray gradient, lighter towards the camera (cached per size)."""
    key = (width, height)
    if key not in _BACKGROUND_CACHE:
        ramp = np.linspace(112, 158, height, dtype=np.float32)[:, None, None]
        tint = np.array([1.0, 1.0, 0.97], np.float32)[None, None, :]
        arr = np.broadcast_to(ramp * tint, (height, width, 3)).astype(np.uint8)
        _BACKGROUND_CACHE[key] = Image.fromarray(arr, "RGB")
    return _BACKGROUND_CACHE[key]


def _draw_shadow(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float) -> None:
    draw.ellipse([cx - 0.45 * s, cy - 0.08 * s, cx + 0.75 * s, cy + 0.22 * s], fill=(92, 92, 90))


def _draw_sphere(draw, cx, cy, s, rgb, metal: bool) -> None:
    r, oy = 0.5 * s, cy - 0.4 * s
    n = 6
    for k in range(n):
        t = k / n
        rk = r * (1 - 0.75 * t)
        ox, oyk = cx + _LIGHT[0] * r * 0.5 * t, oy + _LIGHT[1] * r * 0.5 * t
        gain = (0.55 + 0.75 * t) if metal else (0.7 + 0.45 * t)
        draw.ellipse([ox - rk, oyk - rk, ox + rk, oyk + rk], fill=_shade(rgb, gain))
    if metal:
        hx, hy, hr = cx + _LIGHT[0] * r * 0.45, oy + _LIGHT[1] * r * 0.45, 0.14 * r
        draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=(250, 250, 250))


def _draw_cube(draw, cx, cy, s, rgb, metal: bool, lean: float) -> None:
    a = 0.8 * s
    x0, x1, y0, y1 = cx - 0.5 * a, cx + 0.5 * a, cy - 0.75 * a, cy + 0.25 * a
    t, sx = 0.35 * a, lean * 0.3 * a  # top face depth, horizontal recession (towards centre)
    top = [(x0, y0), (x1, y0), (x1 + sx, y0 - t), (x0 + sx, y0 - t)]
    xs = x1 if sx > 0 else x0
    side = [(xs, y0), (xs + sx, y0 - t), (xs + sx, y1 - t), (xs, y1)]
    draw.polygon(side, fill=_shade(rgb, 0.55))
    draw.polygon(top, fill=_shade(rgb, 1.25 if metal else 1.12))
    draw.rectangle([x0, y0, x1, y1], fill=_shade(rgb, 0.85))
    if metal:
        draw.polygon([(x0, y1), (x0, y0), (x0 + 0.35 * a, y0)], fill=_shade(rgb, 1.15))
        gx, gy, gr = x0 + 0.2 * a, y0 - 0.5 * t, 0.07 * a
        draw.ellipse([gx - 2 * gr, gy - gr, gx + 2 * gr, gy + gr], fill=(250, 250, 250))


def _draw_cylinder(draw, cx, cy, s, rgb, metal: bool) -> None:
    r = 0.45 * s
    ry = 0.3 * r
    top, bottom = cy - 0.85 * s, cy + 0.1 * s
    draw.ellipse([cx - r, bottom - ry, cx + r, bottom + ry], fill=_shade(rgb, 0.6))
    bands = ((0.0, 0.25, 0.75), (0.25, 0.7, 0.9), (0.7, 1.0, 0.62)) if not metal else \
        ((0.0, 0.2, 0.7), (0.2, 0.32, 1.45), (0.32, 0.75, 0.85), (0.75, 1.0, 0.5))
    for lo, hi, gain in bands:
        draw.rectangle([cx - r + 2 * r * lo, top, cx - r + 2 * r * hi, bottom],
                       fill=_shade(rgb, gain))
    draw.ellipse([cx - r, top - ry, cx + r, top + ry], fill=_shade(rgb, 1.2 if metal else 1.1))
    if metal:
        gx, gy = cx - 0.35 * r, top - 0.2 * ry
        draw.ellipse([gx - 0.2 * r, gy - 0.3 * ry, gx + 0.2 * r, gy + 0.3 * ry],
                     fill=(250, 250, 250))


def render_scene(objects, width: int = 224, height: int = 224,
                 supersample: int = 2) -> np.ndarray:
    """The scene as a uint8 image (height x width x 3): the shadows, then the objects far to
    near, so that nearer ones occlude farther ones."""
    w, h = width * supersample, height * supersample
    img = _background(w, h).copy()
    draw = ImageDraw.Draw(img)
    px = min(w, h)
    order = sorted(objects, key=lambda o: o.v)
    for o in order:  # shadows lie on the ground, under every object
        _draw_shadow(draw, o.u * w, o.v * h, apparent_size(o.size, o.z) * px)
    for o in order:
        cx, cy, s = o.u * w, o.v * h, apparent_size(o.size, o.z) * px
        rgb, metal = COLORS[o.color], o.material == "metal"
        if o.shape == "sphere":
            _draw_sphere(draw, cx, cy, s, rgb, metal)
        elif o.shape == "cube":
            _draw_cube(draw, cx, cy, s, rgb, metal, lean=float(np.clip((0.5 - o.u) * 4, -1, 1)))
        else:
            _draw_cylinder(draw, cx, cy, s, rgb, metal)
    if supersample > 1:
        img = img.reduce(supersample)
    return np.asarray(img, dtype=np.uint8)


# ----------------------------------------------------------------------------- language


def matches(obj: SceneObject, filt: dict[str, str]) -> bool:
    """Whether `obj` has every attribute value in `filt`."""
    return all(obj.attr(k) == v for k, v in filt.items())


def describe(filt: dict[str, str], plural: bool = False) -> str:
    """The noun phrase of a filter, e.g. {"color": "red", "material": "metal"} -> "red metal
    thing(s)", {"size": "small", "shape": "cube"} -> "small cube(s)"."""
    words = [filt[k] for k in ATTRIBUTES[:3] if k in filt]
    noun = filt.get("shape", "thing")
    return " ".join([*words, noun + ("s" if plural else "")])


def _full(obj: SceneObject) -> dict[str, str]:
    return {k: obj.attr(k) for k in ATTRIBUTES}


def _mention(obj: SceneObject, known: dict[str, str] | None = None) -> str:
    """"the <attributes> <shape>" of `obj`, leaving out the attributes `known` already states
    (the shape always stays)."""
    filt = {k: v for k, v in _full(obj).items() if k == "shape" or k not in (known or {})}
    return "the " + describe(filt)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count_phrase(n: int, filt: dict[str, str]) -> str:
    """"1 red thing" / "3 red things" / "0 red things"."""
    return f"{n} {describe(filt, plural=n != 1)}"


def _there_are(n: int, filt: dict[str, str]) -> str:
    return f"There {'is' if n == 1 else 'are'} {_count_phrase(n, filt)}."


def _that_is(n: int) -> str:
    return f"That is {n} {'thing' if n == 1 else 'things'}."


def _listing(members: list[SceneObject], filt: dict[str, str]) -> str:
    """The fact naming which objects a filter selects."""
    if not members:
        return f"None of the objects is a {describe(filt)}."
    if len(members) == 1:
        return f"The only {describe(filt)} is {_mention(members[0], filt)}."
    names = _join([_mention(o, filt) for o in members])
    return f"The {describe(filt, plural=True)} are {names}."


def _random_filter(rng: np.random.Generator, obj: SceneObject | None, lo: int, hi: int):
    """A filter of lo..hi attributes: `obj`'s values, or random values when obj is None."""
    k = int(rng.integers(lo, hi + 1))
    keys = sorted(rng.choice(len(ATTRIBUTES), size=k, replace=False).tolist())
    names = [ATTRIBUTES[i] for i in keys]
    if obj is None:
        return {n: _pick(rng, VALUES[n]) for n in names}
    return {n: obj.attr(n) for n in names}


def unique_filter(obj: SceneObject, objects, exclude: str | None = None):
    """The smallest filter without `exclude` that picks out `obj` alone among `objects`,
    always naming the shape unless `exclude` is "shape"; None when there is none."""
    keys = [k for k in ("shape", "color", "size", "material") if k != exclude]
    for k in range(1, len(keys) + 1):
        for combo in itertools.combinations(keys, k):
            if exclude != "shape" and "shape" not in combo:
                continue
            filt = {a: obj.attr(a) for a in combo}
            if sum(matches(o, filt) for o in objects) == 1:
                return filt
    return None


# ----------------------------------------------------------------------------- questions


def _q_count(rng, objects):
    base = None if rng.random() < 0.15 else _pick(rng, objects)
    filt = _random_filter(rng, base, 1, 3)
    members = [o for o in objects if matches(o, filt)]
    question = f"How many {describe(filt, plural=True)} are there?"
    return question, str(len(members)), [_listing(members, filt), _that_is(len(members))]


_COMPARE = {  # relation -> (question template, truth of the relation)
    "more": ("Are there more {a} than {b}?", lambda x, y: x > y),
    "fewer": ("Are there fewer {a} than {b}?", lambda x, y: x < y),
    "same": ("Are there the same number of {a} and {b}?", lambda x, y: x == y),
}


def _relation_fact(na: int, nb: int) -> str:
    if na > nb:
        return f"{na} is more than {nb}."
    if na < nb:
        return f"{na} is fewer than {nb}."
    return f"{na} is the same as {nb}."


def _q_compare(rng, objects):
    """Two filters differing in one attribute, one of them taken from an object in the scene
    (so that not both counts are 0), in random order, and a relation that holds or fails
    with equal chance."""
    obj, attr = _pick(rng, objects), _pick(rng, ATTRIBUTES)
    other = _pick(rng, tuple(v for v in VALUES[attr] if v != obj.attr(attr)))
    fa, fb = {attr: obj.attr(attr)}, {attr: other}
    if attr != "shape" and rng.random() < 0.5:  # e.g. "red cubes" vs "blue cubes"
        fa, fb = {**fa, "shape": obj.shape}, {**fb, "shape": obj.shape}
    if rng.random() < 0.5:
        fa, fb = fb, fa
    na = sum(matches(o, fa) for o in objects)
    nb = sum(matches(o, fb) for o in objects)
    want = bool(rng.random() < 0.5)  # the answer: yes and no equally often
    relation = _pick(rng, tuple(r for r, (_, h) in _COMPARE.items() if h(na, nb) == want))
    template, holds = _COMPARE[relation]
    question = template.format(a=describe(fa, plural=True), b=describe(fb, plural=True))
    steps = [_there_are(na, fa), _there_are(nb, fb), _relation_fact(na, nb)]
    return question, "yes" if holds(na, nb) else "no", steps


def _q_spatial(rng, objects):
    candidates = [(o, f) for o in objects if (f := unique_filter(o, objects)) is not None]
    if not candidates or len(objects) < 2:  # a relation needs another object
        return None
    ref, ref_filt = _pick(rng, candidates)
    side = _pick(rng, ("left", "right"))
    others = [o for o in objects if o is not ref]
    filt = {} if rng.random() < 0.5 else _random_filter(rng, _pick(rng, others), 1, 2)
    near = sorted((o for o in others if (o.u < ref.u) == (side == "left")), key=lambda o: o.u)
    where = f"to the {side} of the {describe(ref_filt)}"
    noun = describe(filt, plural=True) if filt else "things"
    question = f"How many {noun} are {where}?"
    if not near:
        steps = [f"No object is {where}."]
    elif len(near) == 1:
        steps = [f"The only object {where} is {_mention(near[0])}."]
    else:
        steps = [f"The objects {where} are {_join([_mention(o) for o in near])}."]
    members = [o for o in near if matches(o, filt)]
    if filt and len(near) == 1:
        steps.append(f"It is {'' if members else 'not '}a {describe(filt)}.")
    elif filt and near:
        if not members:
            steps.append(f"None of these is a {describe(filt)}.")
        elif len(members) == 1:
            steps.append(f"Of these, the only {describe(filt)} is {_mention(members[0])}.")
        else:
            steps.append(f"Of these, the {describe(filt, plural=True)} are "
                         f"{_join([_mention(o) for o in members])}.")
    steps.append(_that_is(len(members)))
    return question, str(len(members)), steps


def _q_query(rng, objects):
    attr = "color" if rng.random() < 0.5 else _pick(rng, ("shape", "material", "size"))
    candidates = [(o, f) for o in objects if (f := unique_filter(o, objects, attr)) is not None]
    if not candidates:
        return None
    obj, filt = _pick(rng, candidates)
    question = f"What {_WORD[attr]} is the {describe(filt)}?"
    steps = [f"The {describe(filt)} is {_mention(obj)}.",
             f"Its {_WORD[attr]} is {obj.attr(attr)}."]
    return question, obj.attr(attr), steps


def _q_remove(rng, objects):
    n_sub = 1 if rng.random() < 0.6 else 2
    filters = [_random_filter(rng, _pick(rng, objects), 1, 2) for _ in range(n_sub)]
    left = list(objects)
    steps = [f"There {'is' if len(left) == 1 else 'are'} {len(left)} "
             f"{'object' if len(left) == 1 else 'objects'}."]
    for j, filt in enumerate(filters):
        k = sum(matches(o, filt) for o in left)
        fact = _there_are(k, filt)
        steps.append(fact if j == 0 else "Of the remaining objects, " + fact[0].lower() + fact[1:])
        steps.append(f"{len(left)} - {k} = {len(left) - k}.")
        left = [o for o in left if not matches(o, filt)]
    subtract = " ".join(f"Subtract all {describe(f, plural=True)}." for f in filters)
    return f"{subtract} How many objects are left?", str(len(left)), steps


_QUESTIONS = {"count": _q_count, "compare": _q_compare, "spatial": _q_spatial,
              "query": _q_query, "remove": _q_remove}


def _solution(steps, answer: str) -> str:
    """A demonstration: the step lines inside <think>, then the answer."""
    return "<think>\n" + "\n".join(steps) + f"\n</think>\n<answer>{answer}</answer>"


def make_item(spec: SceneSpec, index: int) -> SceneItem:
    """The item at `index` for `spec`; a pure function of (spec, index). Question types are
    tried in random order until one fits the scene (spatial and attribute questions need an
    object that a description picks out alone); a scene that fits none gets a count."""
    rng = np.random.default_rng([spec.seed, index])
    objects = sample_scene(rng, spec)
    qtypes = list(spec.qtypes)
    while True:  # a type with no valid question for this scene yields to the next one
        qtype = qtypes.pop(int(rng.integers(len(qtypes))))
        made = _QUESTIONS[qtype](rng, objects)
        if made is not None or not qtypes:
            break
    if made is None:
        qtype, made = "count", _q_count(rng, objects)
    question, answer, facts = made
    steps = tuple(f"Step {k}: {f}" for k, f in enumerate(facts, start=1))
    image = render_scene(objects, spec.width, spec.height, spec.supersample)
    return SceneItem(id=f"scenes/{spec.condition}/{spec.seed}/{index}", question=question,
                     answer=answer, steps=steps, solution=_solution(steps, answer),
                     image=image, objects=objects, qtype=qtype)


def describe_item(spec: SceneSpec, index: int) -> SceneItem:
    """The scene of `make_item(spec, index)` with a description question for the warm start:
    "How many objects are there?", solved by naming every object from left to right, one step
    each. Every step depends on the image, so these demonstrations teach the vision tower what
    the scenes hold (an alignment stage, as captioning is for pretrained vision-language
    models)."""
    rng = np.random.default_rng([spec.seed, index])
    objects = sample_scene(rng, spec)  # the same first draw as make_item's
    ordered = sorted(objects, key=lambda o: o.u)
    facts = [f"Object {k} from the left is {_mention(o)}." for k, o in enumerate(ordered, 1)]
    facts.append(_that_is(len(objects)))
    steps = tuple(f"Step {k}: {f}" for k, f in enumerate(facts, start=1))
    answer = str(len(objects))
    image = render_scene(objects, spec.width, spec.height, spec.supersample)
    return SceneItem(id=f"scenes/{spec.condition}/{spec.seed}/{index}/describe",
                     question="How many objects are there? Name them from left to right.",
                     answer=answer, steps=steps, solution=_solution(steps, answer), image=image,
                     objects=objects, qtype="describe")


class SceneTask:
    """A deterministic, indexable collection of `size` scene items drawn from `spec`."""

    def __init__(self, spec: SceneSpec, size: int = 10_000_000):
        if size < 0:
            raise ValueError(f"SceneTask: size must be >= 0, got {size}")
        self.spec = spec
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> SceneItem:
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"SceneTask: index {index} out of range for size {self.size}")
        return make_item(self.spec, index)
