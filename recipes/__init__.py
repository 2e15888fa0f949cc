"""Recipes that train and compare spectral models (run them from the repository root)."""
