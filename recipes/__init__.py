"""Recipes that train and compare spectral models (run them from the repository root).

``shakespeare_char`` trains char-level GPT-2s from scratch (dense vs spectral vs low rank); ``finetune`` compares
spectral deltas with LoRA, FourierFT, WaveFT, VeRA, C3A and full fine-tuning; ``method_comparison`` holds its
profiles for the comparison in PEFT's terms and the experiments for PEFT's own MetaMathQA benchmark. What every recipe needs and none is about
(profiles and ``key=value`` overrides, run records, the hardware line, stable rank, optimiser names, a progress
bar, table helpers) is in ``recipes.common``.
"""
