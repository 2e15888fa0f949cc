"""The README's main job: a short char-Shakespeare comparison that prints its table.

    pip install -e ".[recipes]" && python -m recipes.shakespeare_char.main_job

Prepares the data (``--input PATH`` for a local input.txt; otherwise the shared copy if there is one, else
the copy shipped in ``data/``: no network needed), then trains three arms of ``configs/main_job.yaml`` one
after another in this process: a dense 4-layer GPT-2, the same model with every block linear layer stored
as K = mn/2 DCT coefficients (trained with SpectralAdamW), and a low-rank B A model with the same parameter
count. Shows a progress bar per arm, then prints the table (``compare``) and writes it, the plots and
samples under ``--out``; each run's per-step losses are in its ``run.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..common import quiet_loading

CONFIG = Path(__file__).resolve().parent / "configs" / "main_job.yaml"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=None, help="tiny Shakespeare's input.txt (default: shared or shipped copy)")
    parser.add_argument("--out", default="runs/shakespeare_char", help="root folder of the runs")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings for every arm")
    args = parser.parse_args(argv)
    quiet_loading()  # what the job prints is the bars and the table; before the imports, which log
    from .compare import compare
    from .prepare import prepare
    from .train import load_profile, run_settings, train

    start = time.perf_counter()
    data_dir = Path(args.out) / "data"
    meta = prepare(args.input, data_dir)
    print(f"data: {meta['vocab_size']} characters from {meta['source']}", flush=True)
    profile = load_profile(CONFIG)
    for arm in profile["arms"]:
        settings = run_settings(profile, arm["arm"], 0, [f"runs_dir={args.out}", f"data_dir={data_dir}", *args.set])
        result = train(settings)
        print(
            f"[{time.perf_counter() - start:5.0f} s] {arm['arm']}: val loss {result['final_val_loss']:.3f} "
            f"({result['params']['block']:,} block parameters)",
            flush=True,
        )
    print()
    print(compare(Path(args.out) / profile["name"]))
    print(
        f"main job: {time.perf_counter() - start:.0f} s in all; table, plots and samples in {Path(args.out) / profile['name']}"
    )


if __name__ == "__main__":
    main()
