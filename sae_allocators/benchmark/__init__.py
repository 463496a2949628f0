"""Offline benchmark of every registered SAE architecture at matched L0.

``python -m sae_allocators.benchmark [--quick]`` trains each registered architecture (ours,
third-party plugins, SAELens's ``topk`` and ``batchtopk``) through SAELens's runner on synthetic
data with known features and on a real language model's activations, evaluates the saved models
and writes a report folder. See docs/benchmark.md.
"""
