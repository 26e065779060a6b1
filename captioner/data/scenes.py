"""`data=scenes`: a generated dataset that behaves like COCO where training recipes matter, in the COCO layout.

Each image holds 2-4 objects (six colours, four shapes, two sizes) in the cells of a 3 x 3 grid on one of several
backgrounds. Each gets five reference captions written the way different people would: one names two objects and
how they are placed, another lists every object, another counts them, another mentions the background; with
synonyms ("big"/"large", "square"/"box"/"block", "under"/"below") and optional details. So references disagree,
and multi-reference metrics (CIDEr) and the choice of training caption (`caption_idx`) mean something.
Some colour-shape pairs (HELD_OUT) never occur in the training split: validation tests generalisation to them.
"""
from pathlib import Path

from PIL import Image, ImageDraw

from captioner.data.shapes import write_dataset


COLOURS = {"red": (215, 35, 35), "green": (40, 165, 50), "blue": (35, 70, 220), "yellow": (240, 215, 30),
           "purple": (140, 50, 170), "orange": (245, 135, 20)}
BACKGROUNDS = {"white": (240, 240, 236), "grey": (128, 128, 132), "black": (28, 28, 30), "beige": (225, 205, 165)}
SHAPES = ["circle", "square", "triangle", "diamond"]
NOUNS = {"circle": ["circle", "circle", "disc", "dot"], "square": ["square", "square", "box", "block"],
         "triangle": ["triangle"], "diamond": ["diamond", "diamond", "rhombus"]}
SIZES = {"big": ["big", "large", ""], "small": ["small", "little", "tiny", ""]}
HELD_OUT = {("red", "triangle"), ("blue", "circle"), ("green", "square"), ("yellow", "diamond")}
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = {"left": ["to the left of", "left of", "on the left of"], "right": ["to the right of", "right of"],
             "above": ["above", "over"], "below": ["below", "under", "beneath"], "near": ["next to", "beside", "near"]}


def _article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _object(rng, obj, size=True) -> str:
    """'a large red box', 'an orange disc', ... (the size word is sometimes left out)."""
    words = [rng.choice(SIZES[obj["size"]]) if size else "", obj["colour"], rng.choice(NOUNS[obj["shape"]])]
    return _article(" ".join(w for w in words if w))


def _relation(a, b) -> str:
    """Where a is, seen from b."""
    dx, dy = a["cell"][0] - b["cell"][0], a["cell"][1] - b["cell"][1]
    if abs(dx) + abs(dy) > 2:
        return "near"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _plural(rng, shape) -> str:
    noun = rng.choice(NOUNS[shape])
    return noun + ("es" if noun.endswith("x") else "s")


def captions_for(rng, objects, background) -> list:
    """Five references by five "annotators", each with their own habit."""
    a, b = rng.sample(objects, 2)
    rel = lambda x, y: rng.choice(RELATIONS[_relation(x, y)])
    on_bg = lambda: rng.choice(["", f" on a {background} background", f" against a {background} background"])
    count = NUMBERS[len(objects)]
    listed = [_object(rng, o, size=rng.random() < .5) for o in rng.sample(objects, len(objects))]
    others = "one other shape" if len(objects) == 2 else f"{NUMBERS[len(objects) - 1]} other shapes"
    same_shape = len({o["shape"] for o in objects}) == 1
    styles = [
        lambda: f"{_object(rng, a)} {rel(a, b)} {_object(rng, b)}{on_bg()}",
        lambda: ", ".join(listed[:-1]) + f" and {listed[-1]}",
        lambda: f"{count} {_plural(rng, objects[0]['shape']) if same_shape else rng.choice(['shapes', 'objects'])}"
                f" on a {background} background" + rng.choice(["", f" including {_object(rng, a, False)}"]),
        lambda: f"there is {_object(rng, b)} {rel(b, a)} {_object(rng, a, False)}",
        lambda: rng.choice(["a picture of ", "an image of ", ""]) + f"{_object(rng, a)} and {others}",
        lambda: f"a {background} background with {_object(rng, a, False)} and {_object(rng, b, False)}",
    ]
    return [style() for style in rng.sample(styles, 5)]


def draw_scene(rng, size: int, held_out_ok: bool):
    """One image, its objects and its background name."""
    bg_name = rng.choice(list(BACKGROUNDS))
    bg = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in BACKGROUNDS[bg_name])
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    cell = size // 3
    objects = []
    for c in rng.sample(range(9), rng.randint(2, 4)):
        while True:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if held_out_ok or (colour, shape) not in HELD_OUT:
                break
        big = rng.random() < 0.5
        r = rng.randint(int(.36 * cell), int(.46 * cell)) if big else rng.randint(int(.2 * cell), int(.27 * cell))
        cx = (c % 3) * cell + rng.randint(r + 1, cell - r - 1)
        cy = (c // 3) * cell + rng.randint(r + 1, cell - r - 1)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        objects.append({"colour": colour, "shape": shape, "size": "big" if big else "small", "cell": (c % 3, c // 3)})
    return img, objects, bg_name


def make_scenes(root, splits: dict, image_px: int = 128, seed: int = 0) -> Path:
    """Write the dataset under `root` (an existing complete one with the same settings is reused). `splits`
    maps a split name to its number of images; a split whose name starts with "train" never shows HELD_OUT pairs."""
    def example(rng, split):
        img, objects, bg = draw_scene(rng, image_px, held_out_ok=not split.startswith("train"))
        return img, ".jpg", captions_for(rng, objects, bg)

    spec = {"splits": dict(splits), "image_px": image_px, "seed": seed, "version": 1, "kind": "scenes"}
    return write_dataset(root, splits, spec, "scenes", example, f"scenes-{seed}-{{}}")
