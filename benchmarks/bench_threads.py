"""A busy machine should cost its fair share, not 5-40x: SSA-GAN step time quiet and beside busy processes.

Each cell is a fresh process timing one SynthBirds-sized SSA-GAN `f2f_r2f` iteration (64 px, ngf/ndf 16,
batch 12, untrained encoders: weights do not change the speed) under one threading setting:

- `spin, 2 threads`: torch's defaults (OpenMP waiters spin; every core), what training used before this release;
- `passive, 2 threads`: OMP_WAIT_POLICY=PASSIVE (waiters sleep), every core;
- `spin 30k` / `spin 3k, 2 threads`: libgomp waiters spin 30,000 / 3,000 times (GOMP_SPINCOUNT; default 300,000), then sleep;
- `spin, 1 thread` and `passive, 1 thread`;
- `auto`: what training does now (`t2i_nb.core.cpu_threads()`: spinning waiters, threads = the cores other
  processes leave free, measured when the cell starts).

Conditions: quiet, then beside `--busy` single-threaded spinning processes (pure Python loops, started before
the cell and killed after). Settings alternate within each condition, `--rounds` times; the median s/step is
reported with the busy/quiet ratio, so every number in a row comes from the same run.

    python benchmarks/bench_threads.py                 # 2 rounds, 6 timed steps, 1 busy process
    python benchmarks/bench_threads.py --busy 2 --steps 4
"""
from __future__ import annotations
import argparse, json, os, statistics, subprocess, sys, time

CHILD = r"""
import json, os, sys, time
a = json.loads(sys.argv[1])
import torch
import t2i_nb.core as core
core.keep_freed_memory()
threads = core.cpu_threads(a["threads"])       # None: auto
from t2i_nb.archs import Encoders, build_models, train_step
from t2i_nb.config import make_config
from t2i_nb.cost import damsm_encoders
from t2i_nb.losses import loss_config
core.seed_everything(0)
cfg = make_config(loss="f2f_r2f", device="cpu")
m, lc = build_models(cfg, "cpu"), loss_config("f2f_r2f")
text, image = damsm_encoders(cfg, 300)
enc = Encoders(text.eval(), image.eval())
B = cfg.batch_size
g = torch.Generator().manual_seed(0)
batch = dict(img=torch.rand(B, 3, 64, 64, generator=g) * 2 - 1, caption=torch.randint(1, 300, (B, 14), generator=g),
             cap_len=torch.full((B,), 14), caption2=torch.randint(1, 300, (B, 12), generator=g),
             cap_len2=torch.full((B,), 12), class_id=torch.arange(B))
step = lambda: train_step(m, batch, enc, lc, torch.randn(B, 100, generator=g))
step(); step()
times = []
for _ in range(a["steps"]):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps(dict(times=times, threads=threads)))
"""

SETTINGS = {"spin, 2 threads": ({}, 2), "passive, 2 threads": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2),
            "spin 30k, 2 threads": ({"GOMP_SPINCOUNT": "30000"}, 2), "spin 3k, 2 threads": ({"GOMP_SPINCOUNT": "3000"}, 2),
            "spin, 1 thread": ({}, 1), "passive, 1 thread": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1), "auto": (None, None)}
THREAD_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def cell(extra, threads, steps):
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    env.update(extra or {})          # auto (None): no threading variables, `cpu_threads()` decides
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(dict(threads=threads, steps=steps))], env=env,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if out.returncode: raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--busy", type=int, default=1, help="single-threaded busy processes beside the busy cells")
    p.add_argument("--only", nargs="*", default=None, help=f"settings to run (default all): {list(SETTINGS)}")
    a = p.parse_args()
    settings = {k: SETTINGS[k] for k in (a.only or SETTINGS)}
    res = {}
    for cond in ("quiet", "busy"):
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy if cond == "busy" else 0)]
        time.sleep(1.0 if spinners else 0)
        try:
            for r in range(a.rounds):
                for name, (extra, threads) in settings.items():
                    out = cell(extra, threads, a.steps)
                    res.setdefault((name, cond), []).extend(out["times"]); res[(name, "threads", cond)] = out["threads"]
                    print(f"round {r + 1} {cond:5s} {name:20s} {statistics.median(out['times']):.3f} s/step "
                          f"({out['threads']} threads)", file=sys.stderr, flush=True)
        finally:
            for s in spinners: s.kill()
    print(f"\nSSA-GAN f2f_r2f step, SynthBirds size, {os.cpu_count()} cores, {a.busy} busy process(es) beside the busy column;"
          f" median of {a.rounds} x {a.steps} steps\n")
    print(f"| setting | threads quiet / busy | quiet s/step | busy s/step | busy / quiet | vs spin 2 threads quiet |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(res[("spin, 2 threads", "quiet")]) if "spin, 2 threads" in settings else float("nan")
    for name in settings:
        q, b = statistics.median(res[(name, "quiet")]), statistics.median(res[(name, "busy")])
        print(f"| {name} | {res[(name, 'threads', 'quiet')]} / {res[(name, 'threads', 'busy')]} | {q:.3f} | {b:.3f} | "
              f"{b / q:.2f}x | quiet {q / base:.2f}x, busy {b / base:.2f}x |")


if __name__ == "__main__":
    main()
