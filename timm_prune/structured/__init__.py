"""Structured (channel) pruning, shared by every structured method (``methods/structured_base.py``).

- ``groups``: coupled channel groups from torch-pruning's dependency graph (``rules``: what its tracer misses);
- ``gates``: where each channel's gate sits, and the forward hook that applies it;
- ``measure``: FLOPs differentiable in the gates, measured FLOPs / latency / parameters, refill to a budget;
- ``graph``: one trace of a model into all of the above;
- ``removal``: transactional physical removal (checked against the plan, rolled back on failure);
- ``record``: the JSON record that rebuilds the narrowed architecture on load.
"""

from .removal import StructuredPruneError

__all__ = ["StructuredPruneError"]
