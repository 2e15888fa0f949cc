"""Character-level tiny Shakespeare, trained from scratch: dense vs spectral vs low rank (see README.md)."""
