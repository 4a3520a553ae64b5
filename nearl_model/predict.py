"""Class probabilities for image files: ``python -m nearl_model.predict --adapter A.safetensors IMG...``."""

import argparse
import sys
from typing import List, Optional

import torch

from .adapter_io import load_trained
from .data import DataError, preprocess, read_image


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nearl_model.predict", description=__doc__)
    p.add_argument("--adapter", required=True, help="adapter.safetensors written by nearl_model.train")
    p.add_argument("--pretrained", help="backbone weights, if not where the training run found them")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("images", nargs="+", help="image or DICOM files")
    args = p.parse_args(argv)
    try:
        model, run, texts = load_trained(args.adapter, args.pretrained, fused=args.fused)
        size = model.image_size[0]
        batch = torch.stack([preprocess(read_image(path), size) for path in args.images])
    except (DataError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with torch.no_grad():
        probs = torch.softmax(model(batch, texts).float(), dim=-1)
    classes = run["classes"]
    width = max(len(c) for c in classes)
    for path, row in zip(args.images, probs):
        best = int(row.argmax())
        print(f"{path}: {classes[best]} ({row[best]:.3f})")
        for name, prob in zip(classes, row):
            print(f"  {name:<{width}}  {prob:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
