"""Recipes that train and compare spectral models (run them from the repository root).

``shakespeare_char`` trains char-level GPT-2s from scratch (dense vs spectral vs low rank); ``finetune`` compares
spectral deltas with LoRA, FourierFT, WaveFT and full fine-tuning. What every recipe needs and none is about
(profiles and ``key=value`` overrides, run records, the hardware line, stable rank, optimiser names, a progress
bar, table helpers) is in ``recipes.common``.
"""
