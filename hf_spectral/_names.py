"""The names that saved adapter files and PEFT agree on. Importing this module imports nothing, so code
that only reads adapter files (``hf-spectral inspect``) starts without torch or PEFT."""

NAME = "spectral"
PREFIX = "spectral_"  # every adapter attribute of a spectral layer starts with it (PEFT saves by this prefix)
PEFT_KEY_PREFIX = "base_model.model."  # what PeftModel puts before a module's name in a saved state dict
