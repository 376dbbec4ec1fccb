"""Compatibility fixes for the OpenMMLab stack on current torch/numpy (owned by the foundation work)."""
