"""See every Triton launch from the outside, the way a profiler does.

Launchers call ``kernel[grid](*args, **kwargs)`` and know nothing of
measurement. Inside :func:`intercept_launches`, every such call goes to a
callback instead, which receives the kernel, its bound arguments by the
kernel's own parameter names, the grid, and a ``proceed()`` that performs the
original launch. The traffic audit (``audit.py``) counts bytes around
``proceed()``; the compile gate (``compile_check.py``) compiles for a target
GPU instead of launching.
"""

import contextlib
import inspect
import threading
from typing import Callable, Dict, NamedTuple, Tuple

from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_LOCK = threading.Lock()


class Launch(NamedTuple):
    """One intercepted ``kernel[grid](...)`` call."""

    kernel: object              # the JITFunction (compiled mode) or InterpretedFunction
    name: str                   # the kernel's Python name, e.g. "oca_fwd_kernel"
    arguments: Dict[str, object]  # every parameter by name, constexprs included
    options: Dict[str, object]  # launch options (num_warps, num_stages, ...)
    grid: Tuple[int, ...]
    args: tuple                 # positional arguments as the launcher passed them
    kwargs: dict                # keyword arguments as the launcher passed them
    proceed: Callable[[], object]


def _bind(fn, args, kwargs):
    sig = inspect.signature(fn)
    names = list(sig.parameters)
    params = {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound = sig.bind_partial(*args, **params)
    bound.apply_defaults()
    return dict(bound.arguments), options


@contextlib.contextmanager
def intercept_launches(callback: Callable[[Launch], object]):
    """Route every Triton launch in this process through ``callback`` while active.

    ``callback(launch)`` returns what the launch should return; call
    ``launch.proceed()`` to run the kernel as the launcher asked.
    """
    def hooked(original, self, args, grid, warmup, kwargs):
        if warmup:
            return original(*args, grid=grid, warmup=warmup, **kwargs)
        fn = self.fn
        arguments, options = _bind(fn, args, kwargs)
        grid_t = tuple(grid(arguments) if callable(grid) else grid)
        launch = Launch(self, fn.__name__, arguments, options, grid_t, args, kwargs,
                        lambda: original(*args, grid=grid, warmup=False, **kwargs))
        return callback(launch)

    def class_run(original):
        def run(self, *args, grid, warmup, **kwargs):
            return hooked(lambda *a, **kw: original(self, *a, **kw), self, args, grid, warmup, kwargs)

        return run

    def getitem(original):
        # Triton <= 3.5's interpreter launches from __getitem__, not from a class-level run.
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                return hooked(lambda *a, grid, warmup, **kw: original(self, grid)(*a, **kw), self, args, grid,
                              False, kwargs)

            return launch

        return __getitem__

    patches = {(JITFunction, "run"): class_run(JITFunction.run)}
    if "run" in vars(InterpretedFunction):
        patches[InterpretedFunction, "run"] = class_run(InterpretedFunction.run)
    else:
        patches[InterpretedFunction, "__getitem__"] = getitem(InterpretedFunction.__getitem__)
    originals = {key: getattr(key[0], key[1]) for key in patches}

    with _LOCK:
        for (cls, name), patch in patches.items():
            setattr(cls, name, patch)
    try:
        yield
    finally:
        with _LOCK:
            for (cls, name), original in originals.items():
                setattr(cls, name, original)
