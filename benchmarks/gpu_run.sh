#!/usr/bin/env bash
# The device-tool call around gpu_suite.sh: the suite under a time limit, then its logs packed into one archive
# (the device tool brings back at most 8 files). Usage there: [ONLY="steps"] bash benchmarks/gpu_run.sh SECONDS
limit=${1:-540}
dest=${OUT:-gpu-out}
work=/tmp/gpuout
rm -rf "$work" && mkdir -p "$work"
OUT=$work GPU_EXTRA_PATH=$PWD/.bench/site timeout --kill-after=5 "$limit" bash benchmarks/gpu_suite.sh
tar czf "$dest/gpu.tgz" --exclude='*.ckpt' --exclude='*.npy' --exclude='*.jpg' -C / tmp/gpuout \
  $(test -d /tmp/rehearsal-out && echo tmp/rehearsal-out) 2>/dev/null
cp "$work/summary.txt" "$dest/summary.txt" 2>/dev/null
cat "$work/summary.txt"
