"""Class probabilities for image files: ``python -m nearl_model.predict --adapter A.safetensors IMG...``."""

if __name__ == "__main__":
    # torch, open_clip and triton take seconds to import; say something first.
    print("nearl: starting (importing torch, open_clip, triton)", flush=True)

import argparse
import sys
from typing import List, Optional

from nearl_kernels import KernelBuildError

from ._cli import CLIError, HelpFormatter, add_inference_args, fail, load_run
from .data import DataError, LabeledImages, read_image
from .train import predict_probs


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nearl_model.predict", description=__doc__,
                                formatter_class=HelpFormatter)
    add_inference_args(p)
    p.add_argument("images", nargs="+", help="image or DICOM files")
    args = p.parse_args(argv)
    try:
        return _predict(args)
    except KeyboardInterrupt:
        return fail("interrupted")
    except (CLIError, DataError, KernelBuildError) as err:
        return fail(err)


def _predict(args) -> int:
    model, run, texts, device, precision = load_run(args)
    for path in args.images:
        read_image(path)  # every file decoded and checked before any is scored
    images = LabeledImages(list(args.images), [0] * len(args.images), model.image_size[0])
    probs = predict_probs(model, images, texts, device, precision)
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
