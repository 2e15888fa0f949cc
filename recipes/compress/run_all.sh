#!/usr/bin/env bash
# The README's full run, most wanted numbers first; each step resumes from the JSONs already written.
#   nohup bash recipes/compress/run_all.sh > runs/compress.log 2>&1 &
set -e
P=recipes/compress/configs/smollm2_cpu.yaml
python -m recipes.compress.run $P --stage compress fractions=[0.75,0.5] --only dct_energy,prune,svd,dct_act
python -m recipes.compress.run $P --stage heal
python -m recipes.compress.run $P --stage compress
python -m recipes.compress.run $P --stage audit
