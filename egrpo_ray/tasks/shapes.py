"""The procedural text-to-image task of the embedded default: one coloured shape on a black 32x32 canvas.

Grammar (lower case, words separated by single spaces)::

    prompt   := "a" COLOUR SHAPE "at the" POSITION
    COLOUR   := red | green | blue | yellow | magenta | cyan
    SHAPE    := circle | square | triangle
    POSITION := top left | top | top right | left | center | right | bottom left | bottom | bottom right

e.g. ``"a red circle at the top left"``; 6 x 3 x 9 = 162 combinations. The parser (``parse_prompt``)
is lenient: case, punctuation and filler words are ignored, ``centre``/``middle`` mean ``center``, and
``"top center"`` / ``"middle left"`` are accepted; it needs exactly one colour and one shape word.

Rendering (``render``): a black 32x32 RGB canvas, float in [0, 1]; the 3x3 positions are the centres
of a 3x3 grid of cells (x, y in {16/3, 16, 80/3} px). Shapes, centred on the cell centre: a circle of
radius 4 px, an axis-aligned square of side 7 px, an upward triangle (apex at top) with base 9 px
and height 9 px (bounding box centred on the cell centre). Anti-aliasing by 4x4 supersampling of the
coverage; pixel value = coverage * colour (the colours are the six saturated RGB primaries and
secondaries). Deterministic: the same spec always gives the same bits.

Split by combination (``train_prompts`` / ``heldout_prompts``): with colours, shapes and positions
indexed in the orders above (positions row-major, 0 = top left ... 8 = bottom right), combination
(c, k, p) is held out iff p == (c + 3k) mod 9. That holds out 18 of 162 combinations: exactly one
position per (colour, shape) pair, two combinations per position, and every (colour, shape),
(colour, position) and (shape, position) pair still appears in training. Held-out combinations are
never used in pre-training.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence, Union

import torch

DATA_VERSION = "shapes-v2"  # v2: compositional prompts (tasks/scenes.py) in the mixture
IMAGE_SIZE = 32
SUPERSAMPLE = 4

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

CIRCLE_RADIUS = 4.0
SQUARE_SIDE = 7.0
TRIANGLE_BASE = 9.0
TRIANGLE_HEIGHT = 9.0

# Every word the grammar can produce (the tiny text encoder's vocabulary, after its PAD and UNK ids).
# The last eight words are the compositional prompts' (tasks/scenes.py): relations and counts.
VOCAB: tuple[str, ...] = ("a", "at", "the", *COLOUR_NAMES, *SHAPES, "top", "bottom", "left", "right", "center",
                          "of", "above", "below", "two", "three", *(s + "s" for s in SHAPES))
MAX_PROMPT_WORDS = 7  # "a red circle at the top left" (a relation prompt has up to 8)


@dataclass(frozen=True, order=True)
class ShapeSpec:
    """One combination: indices into COLOUR_NAMES, SHAPES and POSITIONS."""

    colour: int
    shape: int
    position: int

    @property
    def colour_name(self) -> str:
        return COLOUR_NAMES[self.colour]

    @property
    def shape_name(self) -> str:
        return SHAPES[self.shape]

    @property
    def position_name(self) -> str:
        return POSITIONS[self.position]

    @property
    def index(self) -> int:
        """A unique id in [0, 162): (colour * 3 + shape) * 9 + position."""
        return (self.colour * len(SHAPES) + self.shape) * len(POSITIONS) + self.position

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) in pixels of the cell centre."""
        row, col = divmod(self.position, 3)
        cell = IMAGE_SIZE / 3
        return (col + 0.5) * cell, (row + 0.5) * cell

    @property
    def prompt(self) -> str:
        return spec_to_prompt(self)


SpecLike = Union[ShapeSpec, str]


def spec_to_prompt(spec: ShapeSpec) -> str:
    return f"a {spec.colour_name} {spec.shape_name} at the {spec.position_name}"


def all_specs() -> list[ShapeSpec]:
    """All 162 combinations, ordered by ``ShapeSpec.index``."""
    return [ShapeSpec(c, k, p) for c in range(len(COLOURS)) for k in range(len(SHAPES)) for p in range(len(POSITIONS))]


def is_heldout(spec: ShapeSpec) -> bool:
    return spec.position == (spec.colour + 3 * spec.shape) % len(POSITIONS)


def train_specs() -> list[ShapeSpec]:
    return [s for s in all_specs() if not is_heldout(s)]


def heldout_specs() -> list[ShapeSpec]:
    return [s for s in all_specs() if is_heldout(s)]


def train_prompts() -> list[str]:
    """The 144 pre-training / RL-training prompts (deterministic order)."""
    return [s.prompt for s in train_specs()]


def heldout_prompts() -> list[str]:
    """The 18 held-out prompts: combinations never seen in pre-training (deterministic order)."""
    return [s.prompt for s in heldout_specs()]


_SYNONYMS = {"centre": "center", "middle": "center", "centered": "center", "centred": "center", "circles": "circle",
             "squares": "square", "triangles": "triangle", "upper": "top", "lower": "bottom"}  # fmt: skip


def tokenize(text: str) -> list[str]:
    """Lower-case words with punctuation removed (the text encoder's tokenizer too)."""
    return re.findall(r"[a-z]+", text.lower())


def parse_prompt(text: str) -> ShapeSpec:
    """Prompt text -> spec; raises ValueError when the colour, shape or position is missing or ambiguous."""
    words = [_SYNONYMS.get(w, w) for w in tokenize(text)]
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    if len(set(colours)) != 1 or len(set(shapes)) != 1:
        raise ValueError(f"cannot parse prompt {text!r}: need exactly one colour {COLOUR_NAMES} and one shape {SHAPES}")
    vert = [w for w in words if w in ("top", "bottom")]
    horiz = [w for w in words if w in ("left", "right")]
    if len(set(vert)) > 1 or len(set(horiz)) > 1:
        raise ValueError(f"cannot parse prompt {text!r}: contradictory position words")
    row = {"top": 0, "bottom": 2}[vert[0]] if vert else 1
    col = {"left": 0, "right": 2}[horiz[0]] if horiz else 1
    if not vert and not horiz and "center" not in words:
        raise ValueError(f"cannot parse prompt {text!r}: no position ({', '.join(POSITIONS)})")
    return ShapeSpec(COLOUR_NAMES.index(colours[0]), SHAPES.index(shapes[0]), row * 3 + col)


def as_spec(x: SpecLike) -> ShapeSpec:
    return x if isinstance(x, ShapeSpec) else parse_prompt(x)


def _coverage(spec: ShapeSpec, size: int = IMAGE_SIZE, supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Anti-aliased coverage [size, size] in [0, 1] (float64 geometry, exact and deterministic)."""
    n = size * supersample
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / supersample  # sub-pixel centres in pixel units
    y, x = torch.meshgrid(t, t, indexing="ij")
    cx, cy = spec.centre
    scale = size / IMAGE_SIZE
    cx, cy = cx * scale, cy * scale
    if spec.shape_name == "circle":
        r = CIRCLE_RADIUS * scale
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif spec.shape_name == "square":
        h = SQUARE_SIDE * scale / 2
        inside = ((x - cx).abs() <= h) & ((y - cy).abs() <= h)
    else:
        b, hgt = TRIANGLE_BASE * scale, TRIANGLE_HEIGHT * scale
        top = cy - hgt / 2
        frac = (y - top) / hgt  # 0 at the apex, 1 at the base
        inside = (frac >= 0) & (frac <= 1) & ((x - cx).abs() <= frac * b / 2)
    cov = inside.double().reshape(size, supersample, size, supersample).mean(dim=(1, 3))
    return cov.float()


@lru_cache(maxsize=None)
def _render_cached(spec: ShapeSpec, size: int) -> torch.Tensor:
    cov = _coverage(spec, size)
    colour = torch.tensor(COLOURS[spec.colour_name], dtype=torch.float32).view(3, 1, 1)
    return cov.unsqueeze(0) * colour


def render(spec: SpecLike, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The ground-truth image [3, size, size] float32 in [0, 1] for a spec or a prompt."""
    return _render_cached(as_spec(spec), size).clone()


def render_batch(specs: Iterable[SpecLike], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Ground-truth images [B, 3, size, size]."""
    return torch.stack([_render_cached(as_spec(s), size) for s in specs])


def render_prompts(prompts: Sequence[str], size: int = IMAGE_SIZE) -> torch.Tensor:
    return render_batch(prompts, size)
