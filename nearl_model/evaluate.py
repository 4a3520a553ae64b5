"""Score a trained adapter on a data split: ``python -m nearl_model.evaluate --adapter A [--data D]``.

By default it rebuilds exactly the training run's data and split (its data,
seed and classes come from the adapter's run record), so ``--split test``
never scores images the run trained on.
"""

if __name__ == "__main__":
    # torch, open_clip and triton take seconds to import; say something first.
    print("nearl: starting (importing torch, open_clip, triton)", flush=True)

import argparse
import json
import os
import sys
from typing import List, Optional

from nearl_kernels import KernelBuildError

from ._cli import CLIError, HelpFormatter, add_inference_args, check_outputs, fail, load_run, writing
from ._io import atomic_write_text
from .run_dir import LOCK_NAME, RUN_FILES
from .data import DataError, is_named_source, load_dataset
from .metrics import format_per_class, format_scores
from .train import evaluate


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nearl_model.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_inference_args(p)
    p.add_argument("--data", help="same forms as nearl_model.train --data (default: the training run's data)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test", help="which split to score")
    p.add_argument("--seed", type=int, default=None,
                   help="split seed for data without its own splits (default: the training run's)")
    p.add_argument("--out", help="write the metrics here as JSON (a new file, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    try:
        return _evaluate(args)
    except KeyboardInterrupt:
        return fail("interrupted; nothing was written")
    except (CLIError, DataError, KernelBuildError) as err:
        return fail(err)


def check_out(args, run=None) -> None:
    """``--out`` is a new file (or ``--overwrite``), and never an input, a run's file or its checkpoint."""
    if args.out is None:
        return
    if os.path.isdir(args.out):
        raise CLIError(f"--out {args.out!r} is a directory; name the JSON file to write")
    inputs = {"--adapter": args.adapter, "--pretrained": args.pretrained, "--data": args.data}
    if run is not None:
        inputs.update({"the run's data": run.get("data"), "the run's --pretrained": run.get("pretrained"),
                       "the run's --model": run.get("model")})
    check_outputs("--out", args.out, [args.out], inputs, out_is_dir=False)
    folder = os.path.dirname(os.path.abspath(args.out))
    is_run_dir = any(os.path.exists(os.path.join(folder, f)) for f in ("adapter.safetensors", "checkpoint.pt", LOCK_NAME))
    if os.path.basename(args.out) in RUN_FILES and is_run_dir:
        raise CLIError(f"--out {args.out!r} is one of a training run's files; write the metrics beside them, "
                       f"e.g. {os.path.join(os.path.dirname(args.out), 'eval.json')!r}")
    if os.path.lexists(args.out) and not args.overwrite:
        raise CLIError(f"--out {args.out!r} already exists; pass --overwrite to replace it, or choose another --out")


def _evaluate(args) -> int:
    check_out(args)
    model, run, texts, device, precision = load_run(args)
    check_out(args, run)
    if args.data is None and "data" not in run:
        raise CLIError(f"adapter {args.adapter!r} does not record its training data; pass --data and --seed")
    data_path = args.data if args.data is not None else run["data"]
    if args.data is None and data_path and not is_named_source(data_path) and not os.path.exists(data_path):
        raise CLIError(f"the training data {data_path!r} of this run is not there any more (moved?); pass its new "
                       "place with --data")
    seed = args.seed if args.seed is not None else run["seed"]
    data = load_dataset(data_path, model.image_size[0], classes=run["classes"], seed=seed)
    same_data = args.data is None and args.seed is None
    if same_data and run.get("data_fingerprint") not in (None, data.fingerprint()):
        raise CLIError(f"the training data {data_path or '(synthetic demo)'} changed since the run (files added, "
                       "removed or edited), so its split is not the run's; pass --data and --seed explicitly to "
                       "score the data as it is now")
    split = data.splits[args.split]
    metrics = evaluate(model, split, texts, run["classes"], device, precision, f"scoring {args.split}")
    print(f"{args.split}: {format_scores(metrics)}  ({len(split)} images, {device}, {precision})")
    print(format_per_class(metrics))
    if args.out:
        with writing(args.out):
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            atomic_write_text(args.out, json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
