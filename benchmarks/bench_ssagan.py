"""Images/s of a full SSA-GAN training iteration (D hinge step + MA-GP step + G step) on this machine.

Each configuration runs in its own subprocess, with and without `t2i_nb.core.keep_freed_memory()`
(a process-wide mallopt setting, so it cannot be toggled inside one process); peak RSS is the
subprocess's `ru_maxrss`.

    python benchmarks/bench_ssagan.py                      # 64-px CPU preset + 256-px paper model
    python benchmarks/bench_ssagan.py --only 64 --steps 5  # quicker
    python benchmarks/bench_ssagan.py --sweep              # a few 64-px widths/batches (to pick the CPU preset)
"""
from __future__ import annotations
import argparse, json, os, resource, subprocess, sys, time
from dataclasses import replace

CASES = {  # name -> (preset, overrides, timed steps, warm-up steps)
    "64px preset": ("synth_birds_64", {}, 4, 1),
    "256px paper, batch 2": ("paper_256", dict(batch_size=2), 1, 0),   # minutes per step on a CPU: no warm-up
}
SWEEP = {f"64px ngf{g} ndf{d} b{b}": ("synth_birds_64", dict(ngf=g, ndf=d, batch_size=b), 3, 1)
         for g, d, b in [(16, 16, 24), (16, 16, 32), (32, 16, 24), (32, 32, 24)]}


def worker(preset: str, overrides: dict, steps: int, warmup: int, keep: bool, device: str, threads: int) -> dict:
    "Time `steps` training iterations after `warmup` untimed ones; runs inside the subprocess."
    import torch
    if threads: torch.set_num_threads(threads)
    from t2i_nb.core import get_device, keep_freed_memory, seed_everything
    from t2i_nb.data import mismatch_index
    from t2i_nb.ssagan import PRESETS, make_models, make_optimizers, n_params, train_step
    kept = keep_freed_memory() if keep else False
    dev = get_device(device)
    seed_everything(0)
    cfg = replace(PRESETS[preset], **overrides)
    G, D = make_models(cfg, dev)
    optG, optD = make_optimizers(G, D, cfg)
    B, R = cfg.batch_size, cfg.img_size
    real = torch.rand(B, 3, R, R, device=dev) * 2 - 1
    sent = torch.randn(B, cfg.cond_dim, device=dev)
    mis = sent[mismatch_index(torch.arange(B) // 2).to(dev)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup): train_step(G, D, optG, optD, real, sent, mis, cfg)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps): train_step(G, D, optG, optD, real, sent, mis, cfg)
    sync(); dt = (time.perf_counter() - t0) / steps
    return dict(ngf=cfg.ngf, ndf=cfg.ndf, px=R, batch=B, params_G=n_params(G), params_D=n_params(D),
                step_s=dt, img_s=B / dt, rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                keep=kept, threads=torch.get_num_threads(), device=str(dev))


def run_case(preset, overrides, steps, warmup, keep, device, threads):
    args = [sys.executable, __file__, "--worker", json.dumps([preset, overrides, steps, warmup, keep, device, threads])]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=["64", "256"], help="run only this resolution")
    ap.add_argument("--steps", type=int, help="timed steps per case (default: 4 at 64 px, 1 at 256 px)")
    ap.add_argument("--sweep", action="store_true", help="64-px width/batch sweep instead of the two presets")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, nargs="+", default=[0],
                    help="torch threads to try (0 = torch default); on a shared, loaded machine 1 is often fastest")
    ap.add_argument("--no-channels-last", action="store_true", help="contiguous weights instead of channels-last")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*json.loads(a.worker)))); return
    cases = SWEEP if a.sweep else {k: v for k, v in CASES.items() if a.only is None or k.startswith(a.only + "px")}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"SSA-GAN training iteration (D hinge + MA-GP + G), device {a.device}, {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at start")
    print(f"| case | ngf | ndf | px | batch | threads | channels_last | keep_freed_memory | s/step | images/s | peak RSS GiB |")
    print(f"|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (preset, ov, steps, warmup) in cases.items():
        ov = ov | dict(channels_last=not a.no_channels_last)
        for threads in a.threads:
            for keep in (False, True):
                r = run_case(preset, ov, a.steps or steps, warmup, keep, a.device, threads)
                print(f"| {name} | {r['ngf']} | {r['ndf']} | {r['px']} | {r['batch']} | {r['threads']} | {'yes' if ov['channels_last'] else 'no'} "
                      f"| {'yes' if r['keep'] else 'no'} | {r['step_s']:.2f} | {r['img_s']:.3g} | {r['rss_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
