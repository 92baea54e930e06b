"""Compositional prompts of the shapes task: two related objects, or several of one kind.

Grammar (on top of the single-object prompts of ``shapes``)::

    relation := "a" COLOUR SHAPE RELATION "a" COLOUR SHAPE     (two different colours)
    RELATION := left of | right of | above | below
    count    := NUMBER COLOUR SHAPES
    NUMBER   := two | three
    SHAPES   := circles | squares | triangles

e.g. ``"a red circle left of a blue square"`` (6 x 3 x 4 x 5 x 3 = 1080 combinations) and
``"two green triangles"`` (2 x 6 x 3 = 36). The objects keep the single-object sizes and sit on the
centres of the same 3x3 grid of cells, one object per cell, so a scene is a sum of single-object
renders. A prompt has many valid layouts: "A left of B" is any pair of cells with A's column left of
B's (rows free), a count is any set of distinct cells. ``render_scene`` samples one with a generator;
without one it takes a fixed layout (the first valid one), so ``render`` stays deterministic.

Splits by combination: a relation (cA, kA, r, cB, kB) is held out iff
(3 cA + kA + 5 (3 cB + kB) + 7 r) mod 9 == 0, a count (n, c, k) iff (c + k + n) mod 6 == 0; a
combination neither held out nor validation is a training one. Validation (for learning-rate sweeps)
is carved from the rest the same way (residue 4 mod 9 for relations, (c + k + n) mod 6 == 3 for
counts) and, like held-out, is never used in pre-training, so it measures generalisation as the
held-out split does without touching it. Single-object prompts keep their split (``shapes``); their
validation part is the training combinations with index mod 16 == 5 (kept in pre-training: the
single-object part of the task is meant to be learned).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Literal, Sequence, Union

import torch

from egrpo_ray.tasks import shapes
from egrpo_ray.tasks.shapes import COLOUR_NAMES, SHAPES, ShapeSpec

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: dict[str, int] = {"two": 2, "three": 3}
PLURALS: tuple[str, ...] = tuple(s + "s" for s in SHAPES)
GRID_CELLS = 9
PROMPT_ORDER_SEED = 20261127  # fixed: the order of ``prompts`` is part of the task's definition


@dataclass(frozen=True, order=True)
class RelationSpec:
    """Object A (colour, shape) stands in ``relation`` to object B; colours differ."""

    colour_a: int
    shape_a: int
    relation: int
    colour_b: int
    shape_b: int

    @property
    def prompt(self) -> str:
        return (f"a {COLOUR_NAMES[self.colour_a]} {SHAPES[self.shape_a]} {RELATIONS[self.relation]} "
                f"a {COLOUR_NAMES[self.colour_b]} {SHAPES[self.shape_b]}")

    @property
    def key(self) -> int:
        return (3 * self.colour_a + self.shape_a) + 5 * (3 * self.colour_b + self.shape_b) + 7 * self.relation


@dataclass(frozen=True, order=True)
class CountSpec:
    """``number`` objects of one colour and shape."""

    number: int
    colour: int
    shape: int

    @property
    def prompt(self) -> str:
        word = next(w for w, n in NUMBERS.items() if n == self.number)
        return f"{word} {COLOUR_NAMES[self.colour]} {PLURALS[self.shape]}"


Scene = Union[ShapeSpec, RelationSpec, CountSpec]
Kind = Literal["single", "relation", "count"]
Split = Literal["train", "validation", "heldout"]


def kind_of(scene: Scene) -> Kind:
    return "single" if isinstance(scene, ShapeSpec) else "relation" if isinstance(scene, RelationSpec) else "count"


def relation_specs() -> list[RelationSpec]:
    n = len(COLOUR_NAMES)
    return [RelationSpec(ca, ka, r, cb, kb) for ca in range(n) for ka in range(3) for r in range(4)
            for cb in range(n) if cb != ca for kb in range(3)]


def count_specs() -> list[CountSpec]:
    return [CountSpec(n, c, k) for n in sorted(NUMBERS.values()) for c in range(len(COLOUR_NAMES)) for k in range(3)]


def split_of(scene: Scene) -> Split:
    if isinstance(scene, ShapeSpec):
        return "heldout" if shapes.is_heldout(scene) else "validation" if scene.index % 16 == 5 else "train"
    if isinstance(scene, RelationSpec):
        r = scene.key % 9
        return "heldout" if r == 0 else "validation" if r == 4 else "train"
    r = (scene.colour + scene.shape + scene.number) % 6
    return "heldout" if r == 0 else "validation" if r == 3 else "train"


def scenes(kind: Kind, split: Split | None = None) -> list[Scene]:
    """All combinations of a kind (deterministic order), optionally of one split."""
    every = {"single": shapes.all_specs, "relation": relation_specs, "count": count_specs}[kind]()
    return [s for s in every if split is None or split_of(s) == split]


def in_pretraining(scene: Scene) -> bool:
    """Pre-training sees training combinations, plus single-object validation ones (see module doc)."""
    split = split_of(scene)
    return split == "train" or (split == "validation" and isinstance(scene, ShapeSpec))


def _interleave(lists: Sequence[Sequence[str]]) -> list[str]:
    """Round-robin by share, so that any prefix mixes every list in proportion."""
    total = sum(len(x) for x in lists)
    keyed = [((i + 0.5) / len(x), j, p) for j, x in enumerate(lists) for i, p in enumerate(x)]
    out = [p for _, _, p in sorted(keyed)]
    assert len(out) == total
    return out


def prompts(split: Split, kinds: Sequence[Kind] = ("single", "relation", "count")) -> list[str]:
    """Prompts of a split over the given kinds: each kind in a fixed shuffled order (so that a prefix
    is not all "a red circle ..."), interleaved evenly (so that a prefix keeps the mixture of kinds)."""
    per_kind = []
    for k in dict.fromkeys(kinds):
        items = [s.prompt for s in scenes(k, split)]
        random.Random(PROMPT_ORDER_SEED).shuffle(items)
        per_kind.append(items)
    return _interleave([x for x in per_kind if x])


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------
def parse_scene(text: str) -> Scene:
    """Any prompt of the task -> its scene; raises ValueError when it fits none of the three forms."""
    words = shapes.tokenize(text)
    numbers = [w for w in words if w in NUMBERS]
    colours = [w for w in words if w in shapes.COLOURS]
    if numbers:
        plural = [w for w in words if w in PLURALS]
        if len(numbers) != 1 or len(set(colours)) != 1 or len(colours) != 1 or len(plural) != 1 or any(w in SHAPES for w in words):
            raise ValueError(f"cannot parse prompt {text!r}: a count is NUMBER COLOUR SHAPES, e.g. 'two red circles'")
        return CountSpec(NUMBERS[numbers[0]], COLOUR_NAMES.index(colours[0]), PLURALS.index(plural[0]))
    if len(colours) == 2:
        joined = " ".join(words)
        rels = [i for i, r in enumerate(RELATIONS) if f" {r} " in f" {joined} "]
        kinds = [w for w in words if w in SHAPES]
        if len(rels) != 1 or len(kinds) != 2 or colours[0] == colours[1]:
            raise ValueError(f"cannot parse prompt {text!r}: a relation is 'a COLOUR SHAPE {'|'.join(RELATIONS)} a COLOUR SHAPE' "
                             "with two different colours")
        rel_word = RELATIONS[rels[0]].split()[0]
        pos = words.index(rel_word)
        first = [w for w in words[:pos] if w in shapes.COLOURS or w in SHAPES]
        if [w in shapes.COLOURS for w in first] != [True, False]:
            raise ValueError(f"cannot parse prompt {text!r}: the relation must stand between the two objects")
        return RelationSpec(COLOUR_NAMES.index(colours[0]), SHAPES.index(kinds[0]), rels[0],
                            COLOUR_NAMES.index(colours[1]), SHAPES.index(kinds[1]))
    return shapes.parse_prompt(text)


def as_scene(x: Union[Scene, str]) -> Scene:
    return parse_scene(x) if isinstance(x, str) else x


# --------------------------------------------------------------------------------------------------
# Layouts and rendering
# --------------------------------------------------------------------------------------------------
def _relation_holds(relation: int, cell_a: int, cell_b: int) -> bool:
    (ra, ca), (rb, cb) = divmod(cell_a, 3), divmod(cell_b, 3)
    return (ca < cb, ca > cb, ra < rb, ra > rb)[relation]


RELATION_LAYOUTS: tuple[tuple[tuple[int, int], ...], ...] = tuple(
    tuple((a, b) for a in range(GRID_CELLS) for b in range(GRID_CELLS) if _relation_holds(r, a, b)) for r in range(len(RELATIONS))
)
COUNT_LAYOUTS: dict[int, tuple[tuple[int, ...], ...]] = {n: tuple(itertools.combinations(range(GRID_CELLS), n)) for n in NUMBERS.values()}


def layouts(scene: Scene) -> tuple[tuple[int, ...], ...]:
    """Every valid assignment of grid cells to the scene's objects (in the scene's object order)."""
    if isinstance(scene, ShapeSpec):
        return ((scene.position,),)
    if isinstance(scene, RelationSpec):
        return RELATION_LAYOUTS[scene.relation]
    return COUNT_LAYOUTS[scene.number]


def objects(scene: Scene, cells: Sequence[int]) -> list[ShapeSpec]:
    """The single objects of a scene placed on ``cells``."""
    if isinstance(scene, ShapeSpec):
        return [ShapeSpec(scene.colour, scene.shape, cells[0])]
    if isinstance(scene, RelationSpec):
        return [ShapeSpec(scene.colour_a, scene.shape_a, cells[0]), ShapeSpec(scene.colour_b, scene.shape_b, cells[1])]
    return [ShapeSpec(scene.colour, scene.shape, c) for c in cells]


def sample_objects(scene: Scene, generator: torch.Generator | None = None) -> list[ShapeSpec]:
    """The objects of one layout: drawn uniformly with ``generator``, the first valid one without."""
    options = layouts(scene)
    i = 0 if generator is None else int(torch.randint(len(options), (1,), generator=generator))
    return objects(scene, options[i])


def render_objects(objs: Sequence[ShapeSpec], size: int = shapes.IMAGE_SIZE) -> torch.Tensor:
    """[3, size, size]: objects in distinct cells never overlap, so the canvas is their sum."""
    return torch.stack([shapes._render_cached(o, size) for o in objs]).sum(0).clamp(0, 1)


def render_scene(scene: Union[Scene, str], generator: torch.Generator | None = None, size: int = shapes.IMAGE_SIZE) -> torch.Tensor:
    """A ground-truth image [3, size, size] of a prompt or scene (a sampled layout with a generator)."""
    return render_objects(sample_objects(as_scene(scene), generator), size)


def render_scenes(items: Sequence[Union[Scene, str]], generator: torch.Generator | None = None, size: int = shapes.IMAGE_SIZE) -> torch.Tensor:
    """[B, 3, size, size] ground-truth images, one sampled layout each."""
    return torch.stack([render_scene(x, generator, size) for x in items])
