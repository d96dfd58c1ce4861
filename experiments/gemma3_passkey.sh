#!/usr/bin/env bash
# Gemma 3 270M (trained on 32k tokens) on passkey at 32k, 64k and 128k: full attention, dynamic NTK and LongHeads
# (the config's A = 2048, w = 256; selection on the 3 global layers, the 15 local ones keep their 512-token window).
# The README's Gemma 3 table comes from this script (one GPU, bfloat16; seed 1, 10 samples per cell, depths spread
# evenly). 64k and 128k are the extension test. One sweep per method, lengths in increasing order: if full attention
# runs out of memory at 128k (transformers builds an O(length^2) mask for the local sliding-window layers), the
# shorter cells are already written and the other methods still run.
#   bash experiments/gemma3_passkey.sh    # set LONGCTX_CACHE=<dir holding gemma-3-270m/> where the package is absent
#   METHODS="ntk full" bash experiments/gemma3_passkey.sh    # a subset, e.g. to stay inside a time limit per command
set -uo pipefail
common="model=gemma3 logger=${LOGGER:-none} seed=1 task.num_samples=${SAMPLES:-10}"
for method in ${METHODS:-longheads ntk full}; do
  python run.py -m $common method=$method task.lengths=[32768],[65536],[131072]
done
