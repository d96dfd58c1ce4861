#!/usr/bin/env bash
# The PG19 cells of the README measured on 2 CPU cores (float32), one job per (method, length) so that PI's default
# factor (length / pretrained) fits each length. Slow: a 32k segment takes 8-10 minutes per method on 2 cores (about
# 3 hours for the 32k column). experiments/baselines.sh is the same sweep for a GPU: a few minutes.
set -euo pipefail
common="logger=${LOGGER:-none} seed=1 task=pg19 task.segments_per_length=4"
run() { python run.py $common "$@"; }
run method=longheads method.atten_length=2048 task.lengths=[4096]
run method=longheads method.atten_length=2048 task.lengths=[8192]
run method=longheads method.atten_length=2048 task.lengths=[16384]
run method=longheads method.atten_length=2048 task.lengths=[32768]
run method=ntk task.lengths=[4096]
run method=ntk task.lengths=[8192]
run method=ntk task.lengths=[16384]
run method=pi task.lengths=[8192]
run method=pi task.lengths=[16384]
run method=window task.lengths=[4096]
run method=window task.lengths=[8192]
run method=window task.lengths=[16384]
run method=pi task.lengths=[32768]
run method=ntk task.lengths=[32768]
run method=window task.lengths=[32768]
