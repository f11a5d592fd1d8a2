"""Make the README's example pictures: a synthetic photo, its label map, the overlay and the legend.

The example is one image of the built-in synthetic dataset (textured shapes on a smooth background)
with its ground-truth labels, drawn exactly as ``segformer-fast predict`` draws a prediction, so it
needs no model and no download. Deterministic; each PNG is well under 60 KB.

Usage (from the repository root):
    python docs/make_pictures.py            # writes docs/images/example_{photo,label,overlay,legend}.png
    python docs/make_pictures.py --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package

from segformer_fast.train.imageio import write_png  # noqa: E402
from segformer_fast.train.synthetic import SyntheticSegmentation  # noqa: E402
from segformer_fast.visualize import background_class, legend, overlay, save_label_png  # noqa: E402

SIZE, SEED, INDEX = 256, 0, 15  # an image holding all six classes


def make_pictures(out: str, size: int = SIZE, seed: int = SEED, index: int = INDEX) -> list[str]:
    """Write example_{photo,label,overlay,legend}.png into ``out``; returns their paths."""
    data = SyntheticSegmentation("val", index + 1, (size, size), seed=seed, noise=0.0)  # noise: 6x larger PNGs
    photo, labels = data[index]
    names = list(data.class_names)
    pictures = {"background": background_class(names), "names": names}
    k = data.num_classes
    paths = [os.path.join(out, f"example_{what}.png") for what in ("photo", "label", "overlay", "legend")]
    write_png(paths[0], photo)
    save_label_png(paths[1], labels, k, **pictures)  # palette PNG: viewers show colours, pixels hold the ids
    write_png(paths[2], overlay(photo, labels, k, alpha=0.6, paint_background=False, **pictures))
    write_png(paths[3], legend(labels, k, **pictures))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "images"),
                        help="output folder (default: docs/images beside this script)")
    args = parser.parse_args(argv)
    for path in make_pictures(args.out):
        print(f"{path} ({os.path.getsize(path) / 1024:.1f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
