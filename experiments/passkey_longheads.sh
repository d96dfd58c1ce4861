#!/usr/bin/env bash
# LongHeads vs full attention on passkey retrieval past the embedded model's 8k training length.
# The README's LongHeads table comes from this script (run on one H100; seed 1, depths spread evenly).
#   SAMPLES=20 TOKEN_SAMPLES=3 bash experiments/passkey_longheads.sh
set -euo pipefail
common="logger=${LOGGER:-none} seed=1 task.num_samples=${SAMPLES:-20}"
python run.py -m $common method=full task.lengths=[16384,32768]
python run.py -m $common method=longheads method.atten_length=2048 model.dtype=bfloat16,float32 task.lengths=[16384,32768]
python run.py -m $common method=longheads method.atten_length=4096 model.dtype=float32 task.lengths=[16384,32768]
# per-token selection for the whole prefill (the authors' release) next to the block path, at 16k
python run.py -m $common task.num_samples=${TOKEN_SAMPLES:-3} method=longheads method.atten_length=2048 \
  method.block_size=1 task.lengths=[16384]
