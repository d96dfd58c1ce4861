#!/usr/bin/env bash
# LongHeads at 64k and 128k (8x and 16x the embedded model's training length), with and without KV offload.
set -euo pipefail
common="logger=${LOGGER:-none} seed=1 method=longheads method.atten_length=2048"
python run.py -m $common task.num_samples=${SAMPLES:-5} task.lengths=[65536,131072]
python run.py -m $common task.num_samples=2 method.cpu_offload=true task.lengths=[131072]
