"""NearlConfig: the adapter hyper-parameters, a dataclass with a JSON round trip."""

import dataclasses
import json
from dataclasses import dataclass

MODES = ("paired", "shared")
CONSTRAINTS = ("project", "penalty")
# Far above any adapter the method calls for (defaults 32, 2, 16, 14), far below
# a size that would exhaust memory: a config file asking for more is refused
# before anything is allocated.
SIZE_LIMITS = {"r": 1024, "n_heads": 64, "n_queries": 1024, "ffn_ratio": 64}


@dataclass
class NearlConfig:
    """Adapter configuration (SPEC.md). Defaults land at 1.46M parameters on ViT-B/16.

    Attributes:
        r: adapter width (down-projection rank, synergy-query width).
        n_heads: attention heads in the OCA and the USEformer; ``r % n_heads == 0``.
        n_queries: M, synergy queries per group.
        ffn_ratio: USEformer FFN hidden width is ``ffn_ratio * r``; 14 puts the
            default on ViT-B/16 at 1.452M trainable parameters.
        mode: ``"paired"`` (image + its own K prompts per group) or ``"shared"``.
        oca_constraint: ``"project"`` (hard orthogonal split) or ``"penalty"``.
        penalty_weight: lambda of the ``"penalty"`` constraint.
        train_incremental: also train ``s_incr`` (the ablation); frozen at 0 otherwise.
        eps: the OCA projection's epsilon.
    """

    r: int = 32
    n_heads: int = 2
    n_queries: int = 16
    ffn_ratio: int = 14
    mode: str = "paired"
    oca_constraint: str = "project"
    penalty_weight: float = 0.1
    train_incremental: bool = False
    eps: float = 1e-6

    def __post_init__(self):
        for name, most in SIZE_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
                raise ValueError(f"NearlConfig.{name} must be an int in 1..{most}; got {value!r}")
        if self.r % self.n_heads:
            raise ValueError(f"NearlConfig.r={self.r} must be a multiple of n_heads={self.n_heads}")
        if self.mode not in MODES:
            raise ValueError(f"NearlConfig.mode must be one of {MODES}; got {self.mode!r}")
        if self.oca_constraint not in CONSTRAINTS:
            raise ValueError(f"NearlConfig.oca_constraint must be one of {CONSTRAINTS}; got {self.oca_constraint!r}")
        for name in ("penalty_weight", "eps"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise ValueError(f"NearlConfig.{name} must be a number; got {getattr(self, name)!r}")
        if not isinstance(self.train_incremental, bool):
            raise ValueError(f"NearlConfig.train_incremental must be true or false; got {self.train_incremental!r}")
        if not 0 <= self.penalty_weight < float("inf"):
            raise ValueError(f"NearlConfig.penalty_weight must be a finite number >= 0; got {self.penalty_weight!r}")
        if not 0 < self.eps < float("inf"):
            raise ValueError(f"NearlConfig.eps must be a finite number > 0; got {self.eps!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "NearlConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a NearlConfig is a JSON object of fields; got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown NearlConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "NearlConfig":
        return cls.from_dict(json.loads(text))

    def check_fused(self) -> None:
        """Raise ValueError unless the fused kernels can run this configuration.

        ``SIZE_LIMITS`` bound what the reference maths (``fused=False``) runs;
        the kernels hold an adapter's tiles in registers and take less: the
        bounds come from ``nearl_kernels`` itself, so the two never disagree.

        Raises:
            ValueError: naming the field, its value and the bound, e.g.
                ``r = 64 is above 32, the widest adapter the fused kernels run``.
        """
        from nearl_kernels.oca import ops as oca_ops
        from nearl_kernels.synergy import ops as synergy_ops

        bounds = (("r", min(oca_ops.MAX_WIDTH, synergy_ops.MAX_WIDTH), "the widest adapter"),
                  ("n_queries", min(oca_ops.MAX_QUERIES, synergy_ops.MAX_QUERIES), "the most synergy queries"))
        for name, most, what in bounds:
            if getattr(self, name) > most:
                raise ValueError(f"{name} = {getattr(self, name)} is above {most}, {what} the fused kernels run; "
                                 f"use {name} <= {most}, or the reference maths (--no-fused, fused=False)")
        tile = _tile(self.r) * _tile(self.n_queries)
        if tile > oca_ops.MAX_TILE_PRODUCT:
            raise ValueError(f"r = {self.r} with n_queries = {self.n_queries} is outside the fused kernels' envelope: "
                             f"their tiles, {_tile(self.r)} x {_tile(self.n_queries)} = {tile}, must be at most "
                             f"{oca_ops.MAX_TILE_PRODUCT}; lower one of them, or use the reference maths (--no-fused, "
                             "fused=False)")


def _tile(n: int) -> int:
    """The kernels' block size for a dimension of ``n``: a power of two, at least 16."""
    return max(16, 1 << (n - 1).bit_length())
