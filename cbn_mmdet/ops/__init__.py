"""Pure tensor maths of CBN (no module state)."""
