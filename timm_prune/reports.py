"""What ``prune()`` returns: ``PruneReport`` (unstructured: one row per masked layer) or ``StructuredReport``
(structured: sizes, FLOPs and latency before / after, channels kept per group). Both are plain data with
``to_dict`` / ``from_dict``, stored in ``pruning_config.json`` under ``"report"``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    name: str
    type: str
    shape: list[int]
    numel: int
    sparsity: float
    # Weight-standardising convs rescale their weight inside forward: stored zeros do not run as zeros.
    weight_transformed: bool = False


@dataclass
class PruneReport:
    """What ``prune()`` did: one row per targeted layer and the sparsity over all targeted weights."""

    method: str
    scope: str
    target_sparsity: float
    layers: list[LayerReport] = field(default_factory=list)
    # Layers whose bias prune(bias_correction_batches=...) corrected.
    bias_corrected: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def num_zeros(self) -> int:
        return sum(int(round(layer.sparsity * layer.numel)) for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.num_zeros / max(self.numel, 1)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "scope": self.scope,
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "numel": self.numel,
            "layers": [asdict(layer) for layer in self.layers],
            "bias_corrected": list(self.bias_corrected),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneReport:
        layers = [LayerReport(**row) for row in data["layers"]]
        # Files written before bias correction existed have no such key.
        return cls(data["method"], data["scope"], data["target_sparsity"], layers, list(data.get("bias_corrected", [])))

    def __str__(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'shape':<22} {'sparsity':>8}"]
        for layer in self.layers:
            flag = "  (weight transformed in forward)" if layer.weight_transformed else ""
            lines.append(f"{layer.name:<{width}}  {str(layer.shape):<22} {layer.sparsity:>8.2%}{flag}")
        lines.append(
            f"{self.method} ({self.scope}): {self.sparsity:.2%} of {self.numel:,} targeted weights pruned "
            f"(target {self.target_sparsity:.2%})"
        )
        if self.bias_corrected:
            lines.append(f"bias corrected in {len(self.bias_corrected)} of {len(self.layers)} layers")
        return "\n".join(lines)


@dataclass
class StructuredReport:
    """What ``prune()`` did for a structured method: sizes, FLOPs and CPU latency before / after, per-group channels."""

    method: str
    flops_target: float  # as configured
    target_flops: float  # absolute, 2 x MACs per image
    input_size: list[int]
    params_before: int
    params_after: int
    flops_before: float
    flops_after: float
    latency_ms_before: float | None
    latency_ms_after: float | None
    threshold: float  # the global gate threshold (channels with a lower gate were removed)
    groups: list[dict[str, Any]] = field(default_factory=list)  # {"root", "channels", "kept"}
    planned_flops: float | None = None  # what selection computed; equals flops_after when the count is exact
    # Interleaved dense / pruned rounds (measure.paired_latency): median speed-up and its quartiles.
    speedup_median: float | None = None
    speedup_q1: float | None = None
    speedup_q3: float | None = None
    latency_threads: int | None = None
    kind: str = "structured"

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before

    @property
    def speedup(self) -> float | None:
        if self.speedup_median is not None:
            return self.speedup_median
        if not self.latency_ms_before or not self.latency_ms_after:
            return None
        return self.latency_ms_before / self.latency_ms_after

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["flops_ratio"] = self.flops_ratio
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredReport:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def __str__(self) -> str:
        def lat(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.2f} ms"

        lines = [
            f"{self.method}: structured, FLOPs target {self.target_flops / 1e6:.2f} MFLOPs at {self.input_size}",
            f"  params  {self.params_before:,} -> {self.params_after:,} ({self.params_after / self.params_before:.1%})",
            f"  FLOPs   {self.flops_before / 1e6:.2f} -> {self.flops_after / 1e6:.2f} M ({self.flops_ratio:.1%}; "
            "2 x MACs, FlopCounterMode)",
            f"  latency {lat(self.latency_ms_before)} -> {lat(self.latency_ms_after)} (CPU, batch 1, median)"
            + (
                f"; speed-up x{self.speedup_median:.2f} (quartiles {self.speedup_q1:.2f}-{self.speedup_q3:.2f}, "
                f"interleaved rounds, {self.latency_threads} thread(s), torch.utils.benchmark)"
                if self.speedup_median is not None
                else ""
            ),
            f"  gate threshold {self.threshold:.4f}; {len(self.groups)} channel groups:",
        ]
        width = max((len(g["root"]) for g in self.groups), default=0)
        lines += [f"    {g['root']:<{width}}  {g['kept']:>5} / {g['channels']}" for g in self.groups]
        return "\n".join(lines)


Report = PruneReport | StructuredReport
