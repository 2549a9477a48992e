"""remax-megatron: a Megatron-style model-parallel trainer for ReMax (RLHF with a greedy baseline)."""

__version__ = "0.1.0"
