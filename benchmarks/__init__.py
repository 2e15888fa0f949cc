"""Benchmarks of spectral layers against nn.Linear, PEFT LoRA and PEFT FourierFT (see README.md)."""
