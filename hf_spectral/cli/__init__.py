"""The ``hf-spectral`` command line: inspect an adapter, compress a model, plot layer spectra.

    hf-spectral inspect DIR_OR_REPO [--json]
    hf-spectral compress MODEL --fraction 0.5 --out DIR [--layout lowfreq]
    hf-spectral spectrum MODEL_OR_ADAPTER --out spectrum.png [--json spectrum.json]

One module per command (``inspect``, ``compress``, ``spectrum``), each with its parser and its ``run``.
Bad arguments get a one-line message and a non-zero exit (2 for usage, 1 for a failure), never a
traceback; ``--debug`` shows it. Other libraries' warnings are hidden unless ``--verbose``. Model loading and plotting libraries are imported inside the commands.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .._version import __version__
from . import compress, inspect, spectrum
from .common import CLIError, quiet_libraries


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-spectral",
        description="Spectral (DCT-coefficient) adapters for Hugging Face models: inspect, compress, analyse.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    parser.add_argument(
        "--verbose", action="store_true",
        help="show the warnings of transformers, PEFT and optional libraries (hidden by default)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for command in (inspect, compress, spectrum):
        command.add_parser(commands)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``hf-spectral``; returns the exit status (0 ok, 1 failure, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage and the error
        return int(exit_.code or 0)
    try:
        with quiet_libraries(verbose=args.verbose):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("hf-spectral: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        kind = "" if isinstance(error, CLIError) else f"{type(error).__name__}: "
        message = str(error).strip() or repr(error)
        print(f"hf-spectral {args.command}: error: {kind}{message}", file=sys.stderr)
        if not isinstance(error, CLIError):
            print("(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
