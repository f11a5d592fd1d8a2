"""Class names: the built-in datasets' (ADE20K, Cityscapes, the synthetic set) and the names of a model.

A model's names live in its config (``model.config.id2label``, ``{0: "wall", ...}``, as in Hugging
Face's configs; None when unnamed). :func:`class_names` reads names from a config, a model, a
dataset or a list, with "class 0", "class 1", ... where none are known.

Example:
    >>> from segformer_fast.classes import ADE20K_CLASSES, class_names
    >>> ADE20K_CLASSES[12]
    'person'
    >>> model = segformer_fast.segformer("b0", num_classes=150, id2label=ADE20K_CLASSES)
    >>> class_names(model)[:3]
    ('wall', 'building', 'sky')
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["ADE20K_CLASSES", "CITYSCAPES_CLASSES", "SYNTHETIC_CLASSES", "DATASET_CLASSES", "class_names",
           "model_class_names", "id2label_of"]

# ADE20K / SceneParse150 in training-id order (label k + 1 in the annotation PNGs is class k after
# reduce_zero_label), as mmsegmentation's ADE20KDataset and Hugging Face's ADE20K checkpoints name them.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# Cityscapes' 19 evaluation classes in train-id order (gtFine *_labelTrainIds.png values 0..18).
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)


def __getattr__(name: str):
    """``SYNTHETIC_CLASSES`` (the synthetic dataset's own tuple) and ``DATASET_CLASSES`` (names by
    dataset layout, "ade", "cityscapes" as ``train.datasets`` calls them, and "synthetic"), made on
    first use: importing ``train.synthetic`` here would import ``train``, which imports this module."""
    if name not in ("SYNTHETIC_CLASSES", "DATASET_CLASSES"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .train.synthetic import SYNTHETIC_CLASSES

    table = {"ade": ADE20K_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "synthetic": SYNTHETIC_CLASSES}
    globals().update(SYNTHETIC_CLASSES=SYNTHETIC_CLASSES, DATASET_CLASSES=table)
    return globals()[name]


def class_names(source=None, num_classes: int | None = None) -> tuple[str, ...]:
    """The class names ``source`` knows, in id order, with "class k" for any it does not.

    Args:
        source: a model (its ``config``), a SegFormerConfig / SETRConfig (its ``id2label``), a
            dataset (its ``class_names``), a ``{id: name}`` mapping, a sequence of names, or None.
        num_classes: how many names to return (default: the source's own count); names the source
            lacks are "class k", names beyond it are dropped.
    Returns:
        A tuple of ``num_classes`` strings.

    Example:
        >>> class_names({0: "sky"}, 2)
        ('sky', 'class 1')
    """
    names: dict[int, str] = {}
    config = getattr(source, "config", None)
    if config is not None and hasattr(config, "num_classes"):  # a model
        source = config
    if hasattr(source, "id2label") and hasattr(source, "num_classes"):  # one of our configs
        names = dict(source.id2label or {})
        num_classes = source.num_classes if num_classes is None else num_classes
    elif hasattr(source, "class_names") and not isinstance(source, Mapping):  # a dataset
        names = dict(enumerate(source.class_names or ()))
        if num_classes is None:
            num_classes = getattr(source, "num_classes", None)
    elif isinstance(source, Mapping):
        names = {int(k): v for k, v in source.items()}
    elif source is not None:
        names = dict(enumerate(source))
    if num_classes is None:
        num_classes = max(names, default=-1) + 1
    return tuple(str(names[k]) if k in names else f"class {k}" for k in range(num_classes))


def model_class_names(model, dataset=None) -> tuple[str, ...]:
    """Names for a model's outputs: its ``config.id2label``, else ``dataset``'s ``class_names`` when
    they name as many classes, else "class 0", "class 1", ...

    Example:
        >>> model_class_names(segformer_fast.segformer("b0", num_classes=6), SyntheticSegmentation("val", 4))[1]
        'h-stripes'
    """
    k = model.config.num_classes
    if model.config.id2label is None:
        names = getattr(dataset, "class_names", None)
        if names is not None and len(names) == k:
            return class_names(names, k)
    return class_names(model.config, k)


def id2label_of(names) -> dict[int, str] | None:
    """``{0: names[0], ...}`` of a sequence of names (None stays None): a config's ``id2label``."""
    return None if names is None else dict(enumerate(names))
