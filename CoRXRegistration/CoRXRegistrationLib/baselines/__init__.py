"""Baseline registration methods for side-by-side comparison (Elastix via the itk-elastix wheel)."""
