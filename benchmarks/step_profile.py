"""Where a GPU training step's time goes: host or GPU, the Trainer or the step (issue 13's diagnosis).

On train_throughput.py's workload (batch 256, bf16-mixed, resident data; 51,200 captions, 3 epochs each):
- trainer_ms_per_step, bare_ms_per_step: the Lightning Trainer and the same loss, batches and optimizer in a plain
  loop (as train_throughput.py --bare);
- bare_host_ms_per_step: the host's time to issue a bare step, in runs of 5 steps from an idle GPU (fewer kernels
  than the launch queue holds, so the host does not wait);
- gpu_kernel_ms_per_step, gpu_kernels_per_step: the GPU's busy time and kernel count per bare step (torch profiler).
A step whose host time exceeds its GPU time is bound by the host: then only fewer launches or less Python help.
With --out, the Trainer's host profile (cProfile, 2 epochs) and the kernel table go there. Made for a GPU; on a CPU
(a plumbing check, e.g. --captions 1024 --steps 3) the GPU figures are null.

    python benchmarks/step_profile.py [--out FOLDER] [--compile graphs]   # the Trainer's step as CUDA graphs
"""
import argparse
import cProfile
import io
import itertools
import json
import pstats
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import train_throughput as tt


def bare_profile(ds, out, steps):
    """Host time and GPU time of bare steps (`steps` per measurement)."""
    cuda = torch.cuda.is_available()
    loader, bare_step = tt.bare_loop(ds)
    batches = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run(n):
        for _ in range(n):
            bare_step(next(batches))

    run(2 * steps)  # warm-up: allocator, cuDNN plans
    host = []
    for _ in range(8):
        sync()
        start = time.perf_counter()
        run(steps)
        host.append((time.perf_counter() - start) / steps)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        run(4 * steps)
        sync()
    if out:
        (out / "kernels.txt").write_text(prof.key_averages().table(sort_by="device_time_total", row_limit=40))
    result = {"bare_host_ms_per_step": round(sorted(host)[len(host) // 2] * 1000, 3),
              "gpu_kernel_ms_per_step": None, "gpu_kernels_per_step": None}
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        result.update(gpu_kernel_ms_per_step=round(sum(e.device_time_total for e in kernels) / (4 * steps) / 1000, 3),
                      gpu_kernels_per_step=round(len(kernels) / (4 * steps), 1))
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=None, help="folder for the cProfile and kernel tables")
    p.add_argument("--captions", type=int, default=tt.BS * 200)
    p.add_argument("--steps", type=int, default=5, help="bare steps per host-time measurement")
    p.add_argument("--compile", default="false", help="the Trainer run's compile setting (e.g. graphs)")
    a = p.parse_args()
    compile = tt.compile_setting(a.compile)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "compile": compile}
    with tempfile.TemporaryDirectory() as folder:
        ds = tt.synthetic(a.captions, folder)
        result["trainer_ms_per_step"] = round(1000 * tt.BS / tt.run_captioner(ds, 3, -1, compile), 3)
        result["bare_ms_per_step"] = round(1000 * tt.BS / tt.run_bare(ds, 3), 3)
        result.update(bare_profile(ds, a.out, a.steps))
        if a.out:
            prof = cProfile.Profile()
            prof.enable()
            tt.run_captioner(ds, 2, -1, compile)
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(50)
            pstats.Stats(prof, stream=text).sort_stats("cumtime").print_stats(70)
            (a.out / "trainer_cprofile.txt").write_text(text.getvalue())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
