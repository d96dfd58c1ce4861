#!/usr/bin/env bash
# Every method on passkey and on PG19-style perplexity at 4k-32k, one job per (method, length) so that PI's
# default factor (target / pretrained) fits each length. The README's baseline tables come from this script.
#   bash experiments/baselines.sh            # about 8 minutes on one H100 for the embedded model
set -euo pipefail
lengths="[4096],[8192],[16384],[32768]"
longheads="method.atten_length=2048"
common="logger=${LOGGER:-none} seed=1"
python run.py -m $common task.num_samples=10 method=pi,ntk,window task.lengths=$lengths
python run.py -m $common task.num_samples=10 method=longheads $longheads task.lengths=$lengths
python run.py -m $common task.num_samples=10 method=full task.lengths=[4096],[8192]
python run.py -m $common task.num_samples=3 method=full task.lengths=[16384],[32768]
python run.py -m $common task=pg19 task.segments_per_length=4 method=full,pi,ntk,window task.lengths=$lengths
python run.py -m $common task=pg19 task.segments_per_length=4 method=longheads $longheads task.lengths=$lengths
