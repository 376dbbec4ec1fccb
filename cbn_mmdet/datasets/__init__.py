"""Datasets: the bundled, generated demo dataset."""
