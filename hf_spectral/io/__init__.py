"""Everything that reads or writes a spectral adapter outside the model: what a load checks and how a failed
one is undone (``loading``), the saved files (``adapter_files``), the model card, the Hub, and Trainer
checkpoints that resume safely."""
