"""The world: seeded scenes of coloured shapes and written words, rendered with exact ground truth.

A scene is a 3 x 3 grid over a small square canvas. Each occupied cell holds one shape (a colour, a kind, a size)
or one short word drawn with PIL's built-in bitmap font. Everything a task asks about (colours, kinds, sizes,
cells, counts, left/right/above/below, the word) is read from the :class:`Scene`, never from the pixels, so every
answer is exact. Images are stored as PNG so that the colour at a shape's centre is exactly the colour named.

Every shape and word sits at the centre of its cell. The image encoder sees one patch per cell, and its patch
embedding is linear: a shape moved a few pixels inside its patch is other pixels, and a linear probe of the demo
encoder's cell tokens told the three kinds apart in 80% of cells with such jitter against 100% without
(experiments/README.md, "Session 6").

A clip is a short frame sequence of one shape moving one cell per frame along a row or a column, next to a still
distractor shape; it stands in for a video.

Randomness comes only from the ``random.Random`` passed in: the same seed gives the same scenes, pixels included.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 72   # a 3 x 3 grid of 24 px cells: a written word (18 x 11 px) fits in one cell
GRID = 3
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 230),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (255, 130, 0),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 5, "large": 10}  # radius in pixels (24 px cells)
WORDS = ("cat", "dog", "sun", "box", "hat", "cup", "key", "owl")
# cell (row, col) -> the phrase the text uses for it
CELL_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass
class Shape:
    kind: str                    # circle | square | triangle
    color: str                   # a key of COLORS
    size: str                    # small | large
    cell: tuple[int, int]        # (row, col) in the 3 x 3 grid
    center: tuple[int, int]      # pixel centre

    @property
    def radius(self) -> int:
        return SIZES[self.size]

    @property
    def name(self) -> str:
        return f"{self.size} {self.color} {self.kind}"

    @property
    def where(self) -> str:
        return CELL_NAMES[self.cell]

    @property
    def placed(self) -> str:
        """'a large red circle at the top left': how the description and the captions name a shape."""
        return f"a {self.name} at the {self.where}"


@dataclass
class Word:
    text: str
    cell: tuple[int, int]
    box: tuple[int, int, int, int]   # (left, top, right, bottom) of the drawn glyphs, exclusive right/bottom

    @property
    def where(self) -> str:
        return CELL_NAMES[self.cell]


@dataclass
class Scene:
    shapes: list[Shape]
    word: Word | None = None
    size: int = IMAGE_SIZE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        shapes = [Shape(s["kind"], s["color"], s["size"], tuple(s["cell"]), tuple(s["center"])) for s in data["shapes"]]
        word = data.get("word")
        if word is not None:
            word = Word(word["text"], tuple(word["cell"]), tuple(word["box"]))
        return cls(shapes=shapes, word=word, size=data.get("size", IMAGE_SIZE))


@dataclass
class Clip:
    """A moving shape over ``len(positions)`` frames beside a still one."""

    mover: Shape                              # its cell/center are those of the first frame
    still: Shape
    direction: str                            # right | left | down | up
    positions: list[tuple[int, int]] = field(default_factory=list)   # the mover's cell in each frame
    size: int = IMAGE_SIZE

    def frame_scene(self, t: int) -> Scene:
        row, col = self.positions[t]
        moved = Shape(self.mover.kind, self.mover.color, self.mover.size, (row, col), _cell_center((row, col), self.size))
        return Scene(shapes=[moved, self.still], size=self.size)

    def to_dict(self) -> dict:
        return asdict(self)


def _cell_center(cell: tuple[int, int], size: int) -> tuple[int, int]:
    step = size / GRID
    return int(cell[1] * step + step / 2), int(cell[0] * step + step / 2)


def sample_scene(rng: random.Random, *, min_shapes: int = 1, max_shapes: int = 3, word_prob: float = 0.5,
                 size: int = IMAGE_SIZE) -> Scene:
    """Draw a scene: ``min_shapes``..``max_shapes`` shapes with distinct (colour, kind), and maybe a word."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    rng.shuffle(cells)
    count = rng.randint(min_shapes, max_shapes)
    combos = [(color, kind) for color in COLORS for kind in SHAPES]
    rng.shuffle(combos)
    shapes = []
    for i in range(count):
        color, kind = combos[i]
        size_name = rng.choice(tuple(SIZES))
        shapes.append(Shape(kind, color, size_name, cells[i], _cell_center(cells[i], size)))
    word = None
    if rng.random() < word_prob:
        word = _make_word(rng.choice(WORDS), cells[count], size)
    return Scene(shapes=shapes, word=word, size=size)


def _make_word(text: str, cell: tuple[int, int], size: int) -> Word:
    left, top, right, bottom = _font().getbbox(text)
    width, height = right - left, bottom - top
    cx, cy = _cell_center(cell, size)
    x, y = cx - width // 2, cy - height // 2
    return Word(text, cell, (x, y, x + width, y + height))


_FONT = None


def _font():
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default_imagefont()  # the bitmap font: identical glyphs on every machine
    return _FONT


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape)
    if scene.word is not None:
        x, y = scene.word.box[:2]
        draw.text((x, y), scene.word.text, fill=INK, font=_font())
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x, y = shape.center
    r = shape.radius
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x - r + 1, y - r + 1, x + r - 1, y + r - 1), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r - 1), (x + r, y + r - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; known: {', '.join(SHAPES)}")


def sample_clip(rng: random.Random, *, num_frames: int = 4, size: int = IMAGE_SIZE) -> Clip:
    """One shape moving one cell per frame (bouncing back at the border keeps 4 frames on a 3-cell grid)."""
    direction = rng.choice(tuple(DIRECTIONS))
    dr, dc = DIRECTIONS[direction]
    # start on the border the motion leaves from, so the first GRID frames move strictly one way
    lane = rng.randrange(GRID)
    start_index = 0 if (dr + dc) > 0 else GRID - 1
    start = (start_index, lane) if dr else (lane, start_index)
    positions = [start]
    for _ in range(min(num_frames, GRID) - 1):
        r, c = positions[-1]
        positions.append((r + dr, c + dc))
    while len(positions) < num_frames:   # hold the last position: the motion stays one-directional
        positions.append(positions[-1])
    combos = [(color, kind) for color in COLORS for kind in SHAPES]
    rng.shuffle(combos)
    (mcolor, mkind), (scolor, skind) = combos[0], combos[1]
    msize = rng.choice(tuple(SIZES))
    mover = Shape(mkind, mcolor, msize, start, _cell_center(start, size))
    used = set(positions)
    free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]
    still_cell = rng.choice(free)
    ssize = rng.choice(tuple(SIZES))
    still = Shape(skind, scolor, ssize, still_cell, _cell_center(still_cell, size))
    return Clip(mover=mover, still=still, direction=direction, positions=positions, size=size)


def render_clip(clip: Clip) -> list[Image.Image]:
    return [render(clip.frame_scene(t)) for t in range(len(clip.positions))]


def cell_contents(scene: Scene) -> list[tuple[Shape | None, Word | None]]:
    """What each cell holds, row by row (the order of the image encoder's patch tokens): its shape and its word."""
    shapes = {s.cell: s for s in scene.shapes}
    word = scene.word
    return [(shapes.get((r, c)), word if word is not None and word.cell == (r, c) else None)
            for r in range(GRID) for c in range(GRID)]


# ---------------------------------------------------------------------------------------------- relations and text
def relation(a: Shape, b: Shape) -> list[str]:
    """The relations that hold from a to b, by grid cell: 'left of', 'right of', 'above', 'below'."""
    out = []
    if a.cell[1] < b.cell[1]:
        out.append("left of")
    if a.cell[1] > b.cell[1]:
        out.append("right of")
    if a.cell[0] < b.cell[0]:
        out.append("above")
    if a.cell[0] > b.cell[0]:
        out.append("below")
    return out


SIDES = ("top", "bottom", "left", "right")
OPPOSITE_SIDE = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}


def sides(shape: Shape) -> list[str]:
    """The sides of the image the shape's cell lies along ("top" and "left" for the top-left cell; none for the
    centre)."""
    row, column = shape.cell
    at = {"top": row == 0, "bottom": row == GRID - 1, "left": column == 0, "right": column == GRID - 1}
    return [side for side in SIDES if at[side]]


def describe(scene: Scene) -> str:
    """The detailed description: the count, every shape with its size, colour, kind and cell, then the word."""
    ordered = sorted(scene.shapes, key=lambda s: s.cell)
    count = len(scene.shapes)
    text = f"{NUMBER_WORDS[count]} shape{'s' if count > 1 else ''}: " + ", ".join(
        s.placed for s in ordered) + "."
    if scene.word is not None:
        text += f" the word {scene.word.text} at the {scene.word.where}."
    return text


def compact(scene: Scene) -> str:
    """The scene in as few words as it takes, cell by cell: 'large red circle top left. word cat right.' This is the
    text the image encoder is contrastively paired with and the context the LLM reads in its text pretraining:
    short, because the LLM later finds the Q-Former's few query embeddings in its place."""
    parts = [f"{s.size} {s.color} {s.kind} {s.where}" for s in sorted(scene.shapes, key=lambda s: s.cell)]
    if scene.word is not None:
        parts.append(f"word {scene.word.text} {scene.word.where}")
    return ". ".join(parts) + "."


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A short caption naming each shape and where it is; with ``rng`` the shapes are listed in a random order
    (several references per image).

    The cell is in every caption because BLIP-2's two pretraining stages learn from captions alone: from captions
    that never said where a shape is, the Q-Former handed on a bag of attributes and the instruction-tuned model
    answered 9 of 50 cell questions; with the cells in stages 1 and 2 (same LLM), 28 of 50 (experiments/README.md,
    "Session 12")."""
    shapes = list(scene.shapes)
    if rng is None:
        shapes.sort(key=lambda s: s.cell)
    else:
        rng.shuffle(shapes)
    names = [s.placed for s in shapes]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    if scene.word is not None:
        text += f" with the word {scene.word.text}"
    return text

