#!/usr/bin/env bash
# Every GPU measurement in one run (issues 12 and 13, then issue 11's rehearsal when its cache is brought; about 9
# minutes on an H200; the steps in order of importance). Each step has its own timeout and writes its log and JSON
# line to "$OUT"; a failed or timed-out step does not stop the others.
#
# Run from the repository root on the GPU machine, with these git-ignored folders brought along
# (data/rehearsal-cache: `python benchmarks/coco_rehearsal.py --stage prepare`, the token cache of the rehearsal):
#   .whl/    hydra-core, omegaconf, antlr4 wheels, and pytest's (bash ../shared/device/wheels.sh pytest pluggy
#            iniconfig pygments)
#   .bench/  ref_limits.py (cp ../shared/bench/ref_limits.py .bench/), and gpudata/ + gpudata.json
#            (python benchmarks/gpu_data.py build: the shapes caches, built on a CPU with spaCy)
#   OUT=/some/folder bash benchmarks/gpu_suite.sh
# Only some steps: ONLY="train train_bare" bash benchmarks/gpu_suite.sh (a rerun of what changed).
# A plumbing check on a CPU: SCALE=small CLI_EXTRA="--captions 1024 --epochs 2" bash benchmarks/gpu_suite.sh
set -u
OUT=${OUT:-gpu-out}
SCALE=${SCALE:-coco}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD${GPU_EXTRA_PATH:+:$GPU_EXTRA_PATH}  # .bench/site: pycocoevalcap's Python part
export PYTHONUNBUFFERED=1
export CAPTIONER_REF=${CAPTIONER_REF:-$PWD/.bench/ref_limits.py}
ln -sfn ../conf captioner/conf

cps() {  # cps NAME: captions/s from the JSON line of step NAME (empty if it failed)
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['captions_per_s'])" "$OUT/$1.json" 2>/dev/null
}

step() {  # step NAME SECONDS COMMAND...: log to $OUT/NAME.log, the last line (the JSON) to $OUT/NAME.json
  local name=$1 limit=$2
  shift 2
  case " ${ONLY:-$name} " in *" $name "*) ;; *) return 0 ;; esac  # ONLY="train beam": rerun just those steps
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
  echo "$name rc=$rc $((SECONDS - start))s $(cat "$OUT/$name.json")" | tee -a "$OUT/summary.txt"
}

step env 30 bash -c 'nvidia-smi -L; python3 -c "import torch, pytorch_lightning as pl; print(torch.__version__, pl.__version__, torch.cuda.get_device_name())"'
# compile=graphs: the CUDA-graphed step equals the plain one (tests/test_fast_paths.py), then its speed
step graphs_test 120 python3 -m pytest -q -p no:cacheprovider tests/test_fast_paths.py -k "gpu or graphed or padded"
step train 120 python3 benchmarks/train_throughput.py --scale "$SCALE"
step train_graphs 120 python3 benchmarks/train_throughput.py --scale "$SCALE" --compile graphs
GRAPHS_CPS=$(cps train_graphs)
step cli_loop_graphs 150 python3 benchmarks/cli_loop.py --scale "$SCALE" ${CLI_EXTRA:-} ${GRAPHS_CPS:+--bench-cps $GRAPHS_CPS} -- compile=graphs
if [ -f benchmarks/recipes.py ]; then  # issue 12: one SCST step vs one cross-entropy step at batch 256
  step scst_timing 90 python3 benchmarks/recipes.py --step-timing --batch 256 --device cuda   # bf16, as trainer=gpu
  # compile=reduce-overhead: SCST's sampling loop and reward as CUDA graphs, XE's compiled loss (compiling: ~1-2 min)
  step scst_timing_graphs 200 python3 benchmarks/recipes.py --step-timing --batch 256 --device cuda --compile reduce-overhead
fi
step beam 90 python3 benchmarks/beam_search.py --repeats 3
BENCH=$(cps train)
step cli_loop 150 python3 benchmarks/cli_loop.py --scale "$SCALE" ${CLI_EXTRA:-} ${BENCH:+--bench-cps $BENCH}
step train_bare 150 python3 benchmarks/train_throughput.py --scale "$SCALE" --bare --no-reference  # what the Trainer costs
# issue 28: a COCO-sized epoch of each attention model (7 x 7 x 2048 grids), beside `train`'s Show and Tell epoch_s
step train_sat 300 python3 benchmarks/train_throughput.py --scale "$SCALE" --model show_attend_tell --epochs 2
step train_transformer 300 python3 benchmarks/train_throughput.py --scale "$SCALE" --model transformer --epochs 2
if [ -f .bench/gpudata.json ]; then
  python3 benchmarks/gpu_data.py restore > "$OUT/gpudata.log" 2>&1
  CAPTIONER_DATA_DIR=/tmp/captioner-gpudata step shapes 100 python3 benchmarks/cli_loop.py --shapes
else
  echo "shapes skipped: no .bench/gpudata (python benchmarks/gpu_data.py build)" | tee -a "$OUT/summary.txt"
fi
step sync_check 60 python3 benchmarks/sync_check.py --steps 200
if [ -f .bench/gpudata.json ]; then
  CAPTIONER_DATA_DIR=/tmp/captioner-gpudata step shapes_graphs 100 python3 benchmarks/cli_loop.py --shapes -- compile=graphs
fi
if [ -f benchmarks/recipes.py ]; then
  step scst_timing_fp32 90 python3 benchmarks/recipes.py --step-timing --batch 256 --device cuda --precision 32
fi
if [ "$SCALE" = coco ]; then
  step train_compiled 120 python3 benchmarks/train_throughput.py --scale coco --no-reference --compile reduce-overhead
fi
step step_profile 90 python3 benchmarks/step_profile.py --out "$OUT/step_profile"  # host vs GPU time of a step
step step_profile_graphs 90 python3 benchmarks/step_profile.py --out "$OUT/step_profile_graphs" --compile graphs
if [ -d data/rehearsal-cache ] && [ "$SCALE" = coco ]; then  # issue 11 (resolved): COCO-sized Karpathy rehearsal
  step rehearsal 330 python3 benchmarks/coco_rehearsal.py --out /tmp/rehearsal-out --timeout 240
fi
