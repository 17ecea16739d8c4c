"""How two one-thread processes share a 2-core machine with a busy one: pinned or not, the helper niced or not.

`prepare_assets(background=True)` (`07d_assets`) runs, on a busy CPU, a helper process beside training. Training is
the job's critical path, so what matters is its share of a core, and how much the helper still gets. Each cell
starts one single-threaded busy process (a pure Python loop), then two fresh one-thread processes timing the same
small conv forward/backward for `--seconds`: the "trainer" (niceness 0) and the "helper" (niceness as in the row),
each left to Linux or pinned (the trainer to the first allowed CPU, the helper to the last). Shares are iterations per second relative to one
process alone on the quiet machine (measured first). Rows alternate `--rounds` times; medians are printed.

The second table (`--assets EPOCHS`) is what this means for `prepare_assets` when nothing may be left running
(`background=False`: `evaluate_run`, `reproduce`): the four SynthBirds networks of the main job, pretrained for
EPOCHS epochs each on a fresh copy of one SynthBirds build, one after another (`workers=1`: one thread beside the
busy process) or as a pinned pair (`workers=2`), beside one busy process and, for reference, on the quiet machine.

    python benchmarks/bench_share.py                   # 2 rounds of 20 s per row, about 5 minutes
    python benchmarks/bench_share.py --assets 3 --rounds 0    # only the asset builds, 3 epochs each
"""
from __future__ import annotations
import argparse, os, statistics, subprocess, sys, time

CHILD = r"""
import os, sys, time, torch
torch.set_num_threads(1)
cpu, nice, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
if cpu >= 0: os.sched_setaffinity(0, {cpu})
if nice: os.nice(nice)
m = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1))
x = torch.randn(8, 32, 64, 64)
for _ in range(3): m(x).sum().backward()
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds: m(x).sum().backward(); n += 1
print(n / (time.perf_counter() - t0))
"""

ASSETS = r"""
import shutil, sys, tempfile, time
from t2i_nb.assets import prepare_assets
from t2i_nb.config import make_config
from t2i_nb.core import keep_freed_memory
keep_freed_memory()
src, workers, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with tempfile.TemporaryDirectory() as d:
    shutil.copytree(src, d + "/sb", ignore=shutil.ignore_patterns("t2i_cache"))
    cfg = make_config(data_dir=d + "/sb", pretrain_epochs=epochs, device="cpu")
    t = time.perf_counter(); prepare_assets(cfg, "cpu", workers=workers); print(time.perf_counter() - t)
"""

# row: (trainer pinned to the first CPU, helper pinned to the last, helper's niceness)
ROWS = {"both left to Linux, nice 0": (False, False, 0), "both pinned, nice 0": (True, True, 0),
        "both pinned, nice 5": (True, True, 5), "both pinned, nice 10": (True, True, 10),
        "helper pinned, nice 5": (False, True, 5), "helper pinned, nice 10": (False, True, 10)}


def start(cpu: int, nice: int, seconds: float) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", CHILD, str(cpu), str(nice), str(seconds)], env=env,
                            stdout=subprocess.PIPE, text=True)


def assets_table(epochs: int):
    "Seconds of prepare_assets (four networks, `epochs` each): in sequence or as a pinned pair, busy and quiet."
    import tempfile
    from t2i_nb.synthbirds import make_synth_birds
    with tempfile.TemporaryDirectory() as d:
        make_synth_birds(d + "/sb", progress=False)
        res = {}
        for cond, workers in (("busy", 1), ("busy", 2), ("quiet", 1), ("quiet", 2)):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if cond == "busy" else None
            time.sleep(1 if busy else 0)
            out = subprocess.run([sys.executable, "-c", ASSETS, d + "/sb", str(workers), str(epochs)],
                                 capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if busy: busy.kill(); busy.wait()
            if out.returncode: sys.exit(out.stderr[-2000:])
            res[cond, workers] = float(out.stdout.strip().splitlines()[-1])
            print(f"{cond:5s} {'pinned pair' if workers == 2 else 'in sequence'}: {res[cond, workers]:.0f} s", flush=True)
    print(f"\nprepare_assets, the main job's four SynthBirds networks at {epochs} epochs each (seconds, one run per cell)\n")
    print("| builds | quiet | beside one busy process | busy / quiet |\n|---|---|---|---|")
    for w, name in ((1, "in sequence (one thread when busy, both cores when quiet)"), (2, "pinned pair (two one-thread processes)")):
        print(f"| {name} | {res['quiet', w]:.0f} | {res['busy', w]:.0f} | {res['busy', w] / res['quiet', w]:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--assets", type=int, default=0, help="also time prepare_assets with this many epochs per network")
    a = p.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2: sys.exit("needs two CPUs")
    if a.assets: assets_table(a.assets)
    if not a.rounds:
        if not a.assets: print("nothing to do: --rounds 0 and no --assets")
        return
    alone = float(start(-1, 0, a.seconds).communicate()[0])
    print(f"one process alone, quiet: {alone:.2f} it/s")
    res = {k: [] for k in ROWS}
    for r in range(a.rounds):
        for name, (pin_trainer, pin_helper, nice) in ROWS.items():
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1)
            procs = [start(cpus[0] if pin_trainer else -1, 0, a.seconds),
                     start(cpus[-1] if pin_helper else -1, nice, a.seconds)]
            rates = [float(q.communicate()[0]) / alone for q in procs]
            busy.kill(); busy.wait()
            res[name].append(rates)
            print(f"round {r + 1}  {name:28s} trainer {rates[0]:.2f}  helper {rates[1]:.2f}", flush=True)
    print(f"\nTwo one-thread processes beside one busy process, {len(cpus)} CPUs; share of a quiet core, "
          f"median of {a.rounds} x {a.seconds:.0f} s\n")
    print("| trainer / helper | trainer | helper | both |\n|---|---|---|---|")
    for name, rr in res.items():
        t, h = statistics.median(x[0] for x in rr), statistics.median(x[1] for x in rr)
        print(f"| {name} | {t:.2f} | {h:.2f} | {t + h:.2f} |")


if __name__ == "__main__":
    main()
