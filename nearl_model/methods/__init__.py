"""Few-shot comparison methods behind one interface (``Method``: fit, predict_proba).

Every method shares the frozen backbone, the splits, the prompts, precision,
device and metrics through ``Backbone`` and ``Task`` (base.py).
"""

from typing import Callable, Dict

from .base import Backbone, ClassSet, Method, Task, View
from .clip_adapter import ClipAdapter
from .coop import CoOp
from .linear_probe import LinearProbe
from .lora import LoRA
from .nearl import Nearl
from .tip_adapter import TipAdapter, TipAdapterF
from .zeroshot import ZeroShot

METHODS: Dict[str, Callable[[], Method]] = {
    "zeroshot": ZeroShot,
    "linear-probe": LinearProbe,
    "clip-adapter": ClipAdapter,
    "tip-adapter": TipAdapter,
    "tip-adapter-f": TipAdapterF,
    "coop": CoOp,
    "lora": LoRA,
    "nearl": lambda: Nearl("paired"),
    "nearl-shared": lambda: Nearl("shared"),
}

__all__ = ["METHODS", "Backbone", "ClassSet", "Method", "Task", "View", "ZeroShot", "LinearProbe", "ClipAdapter",
           "TipAdapter", "TipAdapterF", "CoOp", "LoRA", "Nearl"]
