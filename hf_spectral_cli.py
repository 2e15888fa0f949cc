"""The ``hf-spectral`` command's entry point; the commands themselves live in ``hf_spectral/cli/``.

It sits outside the package because ``import hf_spectral`` imports PEFT, and PEFT imports the optional
quantization libraries when they are installed; their import-time notes (a CUDA-only extension that did not
load, a kernel not in the local cache) concern nothing a command does. Their loggers are set to errors before
the package is imported, unless ``--verbose`` is given.
"""

from __future__ import annotations

import logging
import sys

# loggers of optional libraries that PEFT imports when they are installed
OPTIONAL_EXTRAS_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree", "hqq", "kernels")


def main() -> int:
    if "--verbose" not in sys.argv[1:]:
        for name in OPTIONAL_EXTRAS_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    from hf_spectral.cli import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
