"""Training throughput per loss preset: images/s of one full SSA-GAN iteration, its ratio to `none`, peak memory.

One iteration is exactly `t2i_nb.archs.train_step`: D hinge step, MA-GP step, G step with the preset's
objective (F2F doubles the generator batch). Each preset runs in its own subprocess, so peak RSS is per preset
and the process-wide malloc setting can be compared: `--malloc both` times every preset with glibc's default
and with `t2i_nb.core.keep_freed_memory()`. Presets are measured in interleaved rounds (none, f2f, ..., none,
f2f, ...), so load from other processes hits every preset alike; the median is reported.

    python benchmarks/bench_train.py                       # SynthBirds 64 px, the synth_birds training preset
    python benchmarks/bench_train.py --rounds 3 --malloc both --threads 1
    python benchmarks/bench_train.py --img-size 256 --ngf 64 --ndf 64 --batch-size 4 --device cuda
    python benchmarks/bench_train.py --parallel 2 --presets f2f_r2f --steps 10   # 1 process x 2 threads vs 2 x 1 (studies)
    python benchmarks/bench_train.py --against df766f0 --presets f2f_r2f       # this tree vs an earlier commit
    python benchmarks/bench_train.py --levers --img-size 256 --ngf 64 --ndf 64 --batch-size 4 --threads 2 \
        --presets none --steps 1 --warmup 1 --rounds 2      # the official configuration, one speed lever at a time

`--levers` times one preset with each speed lever on its own (the allocator `keep_freed_memory`, MA-GP folded
into the hinge D step `fold_magp`, channels-last conv weights, bf16 autocast `precision="bf16"`), none of them,
the first three together, and the training loop's own choice (allocator and channels-last on, MA-GP separate,
fp32) with and without bf16, in interleaved rounds, beside the FLOPs of one iteration
(`t2i_nb.cost.flops_per_iteration`, counted on fake tensors). `--only` picks a subset (the first one named in
LEVERS' order is the reference of the speed column).

`--parallel W` answers how to lay out a study on a CPU (`t2i_nb.reproduce.run_study(workers=...)`): the same preset
as one process using every core, then as W processes with one thread each that time their steps simultaneously
(they wait for a common start time after warm-up); images/s in all is compared.
"""
from __future__ import annotations
import argparse, json, os, statistics, subprocess, sys, tempfile

CHILD = r"""
import json, resource, sys, time, torch
a = json.loads(sys.argv[1])
if a["threads"]: torch.set_num_threads(a["threads"])
from t2i_nb.core import get_device, keep_freed_memory, seed_everything
if a["keep_freed"]: keep_freed_memory()
from t2i_nb.data import epoch_loader
from t2i_nb.losses import loss_config
# the old names, from t2i_nb.train: this child also runs in the worktree of an earlier commit (--against)
from t2i_nb.train import build_models, make_config, prepare_assets, train_step
seed_everything(0)
lever = {"fold_magp": True} if a.get("fold_magp") else {}     # only when asked: older trees (--against) lack it
cfg = make_config(data_dir=a["data_dir"], n_train=a["n_train"], n_test=a["n_test"], pretrain_epochs=1, img_size=a["img_size"],
                  ngf=a["ngf"], ndf=a["ndf"], batch_size=a["batch_size"], device=a["device"], loss=a["preset"], **lever)
dev = get_device(a["device"])
assets = prepare_assets(cfg, dev)                     # pretrained weights do not change the speed
m, lc = build_models(cfg, dev), loss_config(a["preset"])
if a.get("channels_last") is False:                   # --levers: contiguous conv weights (the default is channels-last)
    for net in (m.G, m.D): net.to(memory_format=torch.contiguous_format)
enc = assets.encoders(lc)
batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in next(iter(epoch_loader(assets.train, a["batch_size"]))).items()}
prec = {}
if a.get("precision", "fp32") != "fp32":                # --levers: bf16 autocast
    from t2i_nb.accel import Precision; prec = {"prec": Precision(a["precision"], dev)}
def step():
    train_step(m, batch, enc, lc, torch.randn(a["batch_size"], 100, device=dev), **prec)
    if dev.type == "cuda": torch.cuda.synchronize()
for _ in range(a.get("warmup", 2)): step()              # warm-up
while time.time() < a.get("start_at", 0): time.sleep(0.05)   # --parallel: time the processes together
times = []
for _ in range(a["steps"]):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(dict(times=times, peak_gb=peak, threads=torch.get_num_threads())))
"""


N_TRAIN, N_TEST = 96, 24   # SynthBirds images the children build (bench_official.py uses the same)


def all_times(rs) -> list:
    "Every timed step of a list of child results."
    return [t for r in rs for t in r["times"]]


def pick(only: str, valid) -> list:
    "The names of `valid` that the comma-separated `only` names (all when empty), in `valid`'s order; unknown: exit."
    chosen = [n.strip() for n in only.split(",")] if only else list(valid)
    unknown = [n for n in chosen if n not in valid]
    if unknown: raise SystemExit(f"unknown --only {unknown}; valid: {', '.join(valid)}")
    return [n for n in valid if n in chosen]


def run(args, preset, keep_freed, tree=None):
    "One child process timing `preset`; `tree`: a checkout whose t2i_nb is imported instead of this one."
    a = dict(vars(args), preset=preset, keep_freed=keep_freed)
    env = dict(os.environ, PYTHONPATH=tree) if tree else None
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(a)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         env=env, cwd=tree)
    if out.returncode: raise SystemExit(f"{preset}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parallel(args, workers):
    "images/s of one process with every core, then of `workers` one-thread processes timed together."
    import time
    preset = args.presets.split(",")[0]
    one = run(argparse.Namespace(**{**vars(args), "threads": os.cpu_count()}), preset, True)
    procs, start = [], time.time() + 45
    for _ in range(workers):
        a = dict(vars(args), preset=preset, keep_freed=True, threads=1, start_at=start)
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(a)], stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL))
    many = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    rows = [(f"1 x {one['threads']} threads", [one]), (f"{workers} x 1 thread", many)]
    print(f"{preset}, {args.img_size} px, ngf {args.ngf}, batch {args.batch_size}, median of {args.steps} steps per process, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| processes x threads | s/step per process | images/s in all | x one process |\n|---|---|---|---|")
    base = args.batch_size / statistics.median(one["times"])
    for name, rs in rows:
        ips = sum(args.batch_size / statistics.median(r["times"]) for r in rs)
        print(f"| {name} | {statistics.median(all_times(rs)):.2f} | {ips:.1f} | {ips / base:.2f} |")


def against(args, rev):
    "This tree vs commit `rev` (a temporary git worktree), preset by preset in interleaved rounds."
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = tempfile.mkdtemp(prefix="t2i_bench_rev_")
    subprocess.run(["git", "-C", root, "worktree", "add", "--detach", tree, rev], check=True, capture_output=True)
    try:
        presets, res = args.presets.split(","), {}
        for _ in range(args.rounds):
            for n in presets:
                for name, t in (("this tree", None), (rev, tree)):
                    res.setdefault((n, name), []).append(run(args, n, True, t))
    finally: subprocess.run(["git", "-C", root, "worktree", "remove", "--force", tree], capture_output=True)
    med = {k: statistics.median(all_times(rs)) for k, rs in res.items()}
    print(f"SSA-GAN iteration, {args.img_size} px, ngf {args.ngf} ndf {args.ndf}, batch {args.batch_size}, median of "
          f"{args.rounds}x{args.steps} steps per version, load average {os.getloadavg()[0]:.1f}")
    print(f"| preset | s/step this tree | s/step {rev} | speed-up (this / {rev}) |\n|---|---|---|---|")
    for n in presets:
        print(f"| {n} | {med[n, 'this tree']:.3f} | {med[n, rev]:.3f} | {med[n, rev] / med[n, 'this tree']:.2f}x |")


LEVERS = {  # name -> (keep_freed_memory, fold_magp, channels_last, precision)
    "no lever": (False, False, False, "fp32"),
    "allocator only": (True, False, False, "fp32"),
    "folded MA-GP only": (False, True, False, "fp32"),
    "channels_last only": (False, False, True, "fp32"),
    "bf16 autocast only": (False, False, False, "bf16"),
    "allocator + folded MA-GP + channels_last": (True, True, True, "fp32"),
    "training loop (allocator + channels_last)": (True, False, True, "fp32"),
    "training loop + bf16 autocast": (True, False, True, "bf16"),
}


def levers(args):
    "Each speed lever on its own, none, all, and the training loop's choice, in interleaved rounds, with FLOPs."
    from t2i_nb.config import make_config
    from t2i_nb.cost import flops_per_iteration
    preset, names = args.presets.split(",")[0], pick(args.only, LEVERS)
    res = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            keep, fold, cl, prec = LEVERS[n]
            res[n].append(run(argparse.Namespace(**{**vars(args), "fold_magp": fold, "channels_last": cl,
                                                    "precision": prec}), preset, keep))
    flops = {fold: flops_per_iteration(make_config(img_size=args.img_size, ngf=args.ngf, ndf=args.ndf, loss=preset,
                                                   batch_size=args.batch_size, fold_magp=fold))["total"]
             for fold in (False, True)}
    med = {n: statistics.median(all_times(rs)) for n, rs in res.items()}
    print(f"{preset}, {args.img_size} px, ngf {args.ngf} ndf {args.ndf}, batch {args.batch_size}, device {args.device}, "
          f"{res[names[0]][0]['threads']} thread(s), median of {args.rounds} rounds x {args.steps} steps after "
          f"{args.warmup} warm-up, load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    print("| levers | allocator | folded MA-GP | channels_last | precision | s/iteration (median) | min–max | images/s "
          "| x first row (speed) | GFLOP/iteration | peak RSS GiB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    yn = lambda b: "yes" if b else "no"
    for n in names:
        keep, fold, cl, prec = LEVERS[n]
        ts = all_times(res[n])
        print(f"| {n} | {yn(keep)} | {yn(fold)} | {yn(cl)} | {prec} | {med[n]:.2f} | {min(ts):.2f}–{max(ts):.2f} | "
              f"{args.batch_size / med[n]:.3g} | {med[names[0]] / med[n]:.2f} | {flops[fold] / 1e9:.1f} | "
              f"{max(r['peak_gb'] for r in res[n]):.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "t2i_bench_sb"))
    ap.add_argument("--n-train", type=int, default=N_TRAIN)
    ap.add_argument("--n-test", type=int, default=N_TEST)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--ngf", type=int, default=None, help="default: the synth_birds training preset")
    ap.add_argument("--ndf", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the synth_birds training preset")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per subprocess")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the presets")
    ap.add_argument("--presets", default="none,f2f,r2f,f2f_r2f,f2f_r2f_cap")
    ap.add_argument("--malloc", choices=("default", "keep", "both"), default="keep")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parallel", type=int, default=0, help="compare 1 process x all cores with N processes x 1 thread")
    ap.add_argument("--against", default="", help="a git revision to time side by side with this tree")
    ap.add_argument("--levers", action="store_true", help="each speed lever on its own (first preset only)")
    ap.add_argument("--only", default="", help="--levers: a comma-separated subset of " + ", ".join(LEVERS))
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per subprocess")
    args = ap.parse_args()
    from t2i_nb.config import TRAIN_PRESETS
    p = TRAIN_PRESETS["synth_birds"]
    args.ngf, args.ndf, args.batch_size = args.ngf or p.ngf, args.ndf or p.ndf, args.batch_size or p.batch_size
    if args.parallel: return parallel(args, args.parallel)
    if args.against: return against(args, args.against)
    if args.levers: return levers(args)
    presets = args.presets.split(",")
    modes = {"default": [False], "keep": [True], "both": [False, True]}[args.malloc]
    res = {(n, k): [] for n in presets for k in modes}
    for _ in range(args.rounds):
        for k in modes:
            for n in presets: res[n, k].append(run(args, n, k))
    load = os.getloadavg()[0]
    med = {key: statistics.median(all_times(rs)) for key, rs in res.items()}
    print(f"SSA-GAN iteration, {args.img_size} px, ngf {args.ngf} ndf {args.ndf}, batch {args.batch_size}, device {args.device}, "
          f"{res[presets[0], modes[0]][0]['threads']} thread(s), median of {args.rounds}x{args.steps} steps, load average {load:.1f}")
    print("| preset | keep_freed_memory | s/step | images/s | x none (speed) | peak memory GiB |")
    print("|---|---|---|---|---|---|")
    for k in modes:
        for n in presets:
            s = med[n, k]
            peak = max(r["peak_gb"] for r in res[n, k])
            print(f"| {n} | {'yes' if k else 'no'} | {s:.2f} | {args.batch_size / s:.1f} | {med[presets[0], k] / s:.2f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
