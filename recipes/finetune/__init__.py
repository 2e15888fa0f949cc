"""Fine-tuning recipes: spectral delta against LoRA, FourierFT, WaveFT and full fine-tuning."""
