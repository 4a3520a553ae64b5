"""Score a trained adapter on a data split: ``python -m nearl_model.evaluate --adapter A --data D``."""

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from .adapter_io import load_trained
from .data import DataError, load_dataset
from .metrics import format_per_class, format_scores
from .train import evaluate


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nearl_model.evaluate", description=__doc__)
    p.add_argument("--adapter", required=True, help="adapter.safetensors written by nearl_model.train")
    p.add_argument("--data", help="same forms as nearl_model.train --data; omit for the synthetic demo")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--seed", type=int, default=0, help="split seed for data without its own splits")
    p.add_argument("--pretrained", help="backbone weights, if not where the training run found them")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", help="write the metrics here as JSON")
    args = p.parse_args(argv)
    try:
        model, run, texts = load_trained(args.adapter, args.pretrained, fused=args.fused)
        data = load_dataset(args.data, model.image_size[0], classes=run["classes"], seed=args.seed)
    except (DataError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = evaluate(model, data.splits[args.split], texts, run["classes"], torch.device("cpu"), "fp32")
    print(f"{args.split}: {format_scores(metrics)}  ({len(data.splits[args.split])} images)")
    print(format_per_class(metrics))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
