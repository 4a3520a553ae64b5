"""Input checks shared by the ops: run before anything is allocated or launched."""

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, t, ndim: int, shape_doc: str) -> None:
    """Raise TypeError/ValueError naming ``name`` unless it is a float tensor of ``ndim`` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}; got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, bfloat16 or float16; got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {shape_doc}; got shape {tuple(t.shape)}")


def reference_dtype(t: torch.Tensor) -> torch.dtype:
    """The reference maths' compute dtype: float64 for a float64 input (the oracle), else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_fusable(op: str, *tensors: torch.Tensor) -> None:
    """The kernels compute in float32 at most: float64 is the reference's, refused in one line."""
    if any(t.dtype == torch.float64 for t in tensors):
        raise TypeError(f"{op}(fused=True) runs float32, bfloat16 or float16; float64 is the reference maths' "
                        "dtype: pass fused=False (NearlCLIP(..., fused=False)) for a float64 run")


def check_shape(name: str, t: torch.Tensor, expected: tuple, shape_doc: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must be {shape_doc} = {tuple(expected)}; got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device; got {listing}")


def check_heads(r: int, n_heads: int) -> int:
    """Return the head width, checking that ``r`` splits into ``n_heads`` heads."""
    if not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive int; got {n_heads!r}")
    if r % n_heads:
        raise ValueError(f"adapter width r={r} must be a multiple of n_heads={n_heads}")
    return r // n_heads
