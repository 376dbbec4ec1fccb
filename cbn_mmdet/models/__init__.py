"""Normalization layers (CBN) and their registration."""
