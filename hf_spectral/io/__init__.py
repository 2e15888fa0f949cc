"""What connects spectral adapters to the ecosystem around them: the saved files, the model card,
the Hub, and Trainer checkpoints that resume safely."""
