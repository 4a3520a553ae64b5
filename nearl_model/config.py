"""NearlConfig: the adapter hyper-parameters, a dataclass with a JSON round trip."""

import dataclasses
import json
from dataclasses import dataclass

MODES = ("paired", "shared")
CONSTRAINTS = ("project", "penalty")


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
        for name in ("r", "n_heads", "n_queries", "ffn_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NearlConfig.{name} must be a positive int; got {value!r}")
        if self.r % self.n_heads:
            raise ValueError(f"NearlConfig.r={self.r} must be a multiple of n_heads={self.n_heads}")
        if self.mode not in MODES:
            raise ValueError(f"NearlConfig.mode must be one of {MODES}; got {self.mode!r}")
        if self.oca_constraint not in CONSTRAINTS:
            raise ValueError(f"NearlConfig.oca_constraint must be one of {CONSTRAINTS}; got {self.oca_constraint!r}")
        if not self.eps > 0:
            raise ValueError(f"NearlConfig.eps must be > 0; got {self.eps!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "NearlConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown NearlConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "NearlConfig":
        return cls.from_dict(json.loads(text))
