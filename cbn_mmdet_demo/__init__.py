"""Datasets: the bundled, generated demo dataset."""
from .demo_shapes import CLASSES, PALETTE, generate_split, make_demo_dataset
from .demo_shapes_dataset import DemoShapesDataset

__all__ = ['CLASSES', 'PALETTE', 'DemoShapesDataset', 'generate_split', 'make_demo_dataset']
