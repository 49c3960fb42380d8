"""Class names, colors and label ids of the builtin datasets (facts of the official releases).

The ids are used by ``algm_d2.data.prepare`` (behind ``datasets/prepare_*.py``) to write the label maps that the
builtin datasets read: contiguous train ids ``0..K-1`` and 255 for "unlabeled / ignore".
"""
from __future__ import annotations

from typing import Dict, Tuple

Color = Tuple[int, int, int]
IGNORE_LABEL = 255


def label_palette(num_classes: int) -> Tuple[Color, ...]:
    """Distinct colors by PASCAL VOC's bit-interleaving rule (class i's bits spread over R, G and B)."""
    colors = []
    for label in range(num_classes):
        r = g = b = 0
        bits = label + 1  # start at 1 so class 0 is not black, which reads as "unlabeled" in visualisations
        for shift in range(7, -1, -1):
            r |= (bits & 1) << shift
            g |= ((bits >> 1) & 1) << shift
            b |= ((bits >> 2) & 1) << shift
            bits >>= 3
        colors.append((r, g, b))
    return tuple(colors)


# ADE20K SceneParsing (ADEChallengeData2016), 150 classes in objectInfo150 order (label value i+1 -> class i).
ADE20K_150_CLASSES: Tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# COCO-Stuff 164K: 80 thing + 91 stuff classes. The official stuffthingmaps store (COCO id - 1); ids 1..182 minus
# the 11 ids COCO never used (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91) give the 171 contiguous train ids.
COCO_STUFF_UNUSED_IDS: Tuple[int, ...] = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
COCO_STUFF_IDS: Tuple[int, ...] = tuple(i for i in range(1, 183) if i not in COCO_STUFF_UNUSED_IDS)
COCO_STUFF_171_CLASSES: Tuple[str, ...] = (
    # things (ids 1..90)
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
    # stuff (ids 92..182)
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel",
    "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)

# Cityscapes: the 19 evaluated classes in train-id order, with the official colors.
CITYSCAPES_CLASSES: Tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_COLORS: Tuple[Color, ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# labelIds (the 34 Cityscapes ids) of the 19 train ids, in train-id order; every other id is ignored.
CITYSCAPES_LABEL_IDS: Tuple[int, ...] = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

# PASCAL-Context 59: the most frequent 59 of the 459 full-label classes, alphabetical (the order everyone uses),
# with their ids in the full 459-class list (labels.txt of the PASCAL-Context release, 1-based).
PASCAL_CONTEXT_59_CLASSES: Tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building", "bus",
    "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door", "fence",
    "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky",
    "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)
PASCAL_CONTEXT_59_FULL_IDS: Tuple[int, ...] = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144, 158, 159,
    162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355, 360, 366, 368,
    397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)
PASCAL_CONTEXT_NUM_FULL_CLASSES = 459


def _check_lengths(expected: Dict[str, Tuple[int, int]]) -> None:
    for name, (got, want) in expected.items():
        if got != want:
            raise AssertionError(f"{name}: {got} entries, expected {want}")


_check_lengths({
    "ADE20K_150_CLASSES": (len(ADE20K_150_CLASSES), 150),
    "COCO_STUFF_171_CLASSES": (len(COCO_STUFF_171_CLASSES), 171),
    "COCO_STUFF_IDS": (len(COCO_STUFF_IDS), 171),
    "CITYSCAPES_CLASSES": (len(CITYSCAPES_CLASSES), 19),
    "CITYSCAPES_COLORS": (len(CITYSCAPES_COLORS), 19),
    "CITYSCAPES_LABEL_IDS": (len(CITYSCAPES_LABEL_IDS), 19),
    "PASCAL_CONTEXT_59_CLASSES": (len(PASCAL_CONTEXT_59_CLASSES), 59),
    "PASCAL_CONTEXT_59_FULL_IDS": (len(PASCAL_CONTEXT_59_FULL_IDS), 59),
})
