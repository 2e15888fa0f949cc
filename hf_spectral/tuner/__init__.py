"""The PEFT method: what can be configured (``config``), which modules become spectral layers and what
is saved (``model``), how one layer holds adapters, merges and computes (``layer``), and how it runs on a
quantized base (``quantized``)."""
