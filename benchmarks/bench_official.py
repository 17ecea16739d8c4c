"""One SSA-GAN iteration of the authors' code against ours, side by side on this machine, in interleaved rounds.

The authors' code is not part of this project: clone it yourself (https://github.com/wtliao/text2image, measured
at commit 3063e27) and pass its folder. Nothing is copied from it; its own `train()` from `main.py` runs, unchanged,
on a stand-in loader that yields the same random batch (256 px images, 18-token captions, distinct classes) every
step, with random-init networks (the weights do not change the speed; its image encoder's ImageNet Inception
weights would be a download) and the configuration of `cfg/bird.yml`
(NF 64, the batch size given here). To run "as shipped" on a CPU, its hard-coded `.cuda()` calls become no-ops and
the modules it imports only for logging, tokenising and its config (`tensorboardX`, `nltk`, `skimage`, `easydict`)
get inert stand-ins when they are missing. An iteration is the time between two `optimizerG.step()` calls of its loop:
text encoder, hinge D step, MA-GP step, G step with DAMSM (exactly its loop body). Its `train()` writes a
`tmp/` log folder under its working directory, so the child runs in a fresh temporary folder.

    python benchmarks/bench_official.py --official ~/src/text2image                       # 256 px, NF 64, batch 4, 2 threads
    python benchmarks/bench_official.py --official ~/src/text2image --rounds 3 --only "official as shipped,ours: training loop"

Variants (`--only` picks some, by name): the official iteration as shipped and with the allocator fix
(`t2i_nb.core.keep_freed_memory`), and ours (`t2i_nb.archs.train_step`, loss preset `none`: the same terms) with no
speed lever, as the training loop runs it (allocator and channels-last on) and with bf16 autocast on top.
The speed column is (official as shipped) / (this row) in s/iteration, medians over every timed step.
"""
from __future__ import annotations
import argparse, json, os, statistics, subprocess, sys, tempfile

OFFICIAL_CHILD = r"""
import json, os, resource, sys, time, types, torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
if a["keep_freed"]:
    from t2i_nb.core import keep_freed_memory; keep_freed_memory()

class EasyDict(dict):                         # stand-ins for modules it imports but this measurement never uses
    def __init__(self, d=None):
        super().__init__(); [self.__setitem__(k, EasyDict(v) if isinstance(v, dict) else v) for k, v in (d or {}).items()]
    def __getattr__(self, k):
        try: return self[k]
        except KeyError: raise AttributeError(k) from None
    def __setattr__(self, k, v): self[k] = v
class Writer:
    def __init__(self, *args, **kw): pass
    def add_scalar(self, *args, **kw): pass
    def add_image(self, *args, **kw): pass
def stand_in(name, **attrs):
    try: __import__(name)
    except ImportError: m = types.ModuleType(name); m.__dict__.update(attrs); sys.modules[name] = m
stand_in("easydict", EasyDict=EasyDict); stand_in("tensorboardX", SummaryWriter=Writer)
stand_in("nltk"); stand_in("nltk.tokenize", RegexpTokenizer=object); stand_in("skimage"); stand_in("skimage.transform")
torch.Tensor.cuda = lambda self, *args, **kw: self          # "as shipped" on a CPU: its .cuda() calls do nothing
torch.nn.Module.cuda = lambda self, *args, **kw: self
import torchvision.models as tvm                             # its image encoder asks for ImageNet weights (a download):
inception = tvm.inception_v3                                 # random init instead, the same network
tvm.inception_v3 = lambda *args, pretrained=False, **kw: inception(*args, weights=None, **kw)

sys.dont_write_bytecode = True                               # nothing is written into the user's checkout
sys.path.insert(0, a["official"]); os.chdir(a["workdir"])
import main as official                                      # its main.py; argument parsing is under __main__
from miscc.config import cfg
B, nf, size, n_words = a["batch_size"], a["nf"], a["img_size"], a["n_words"]
cfg.CUDA, cfg.RESTORE, cfg.CONFIG_NAME = False, False, "bench"
cfg.TRAIN.NF, cfg.TRAIN.BATCH_SIZE, cfg.TRAIN.MAX_EPOCH, cfg.TREE.BRANCH_NUM, cfg.TREE.BASE_SIZE = nf, B, 1, 1, size
torch.manual_seed(0)
netG = official.DataParallelWithCallback(official.NetG(nf, 100))   # as its __main__ builds them
netD = torch.nn.DataParallel(official.NetD(nf))
text_encoder = official.RNN_ENCODER(n_words, nhidden=cfg.TEXT.EMBEDDING_DIM)
image_encoder = official.CNN_ENCODER(cfg.TEXT.EMBEDDING_DIM)
for enc in (text_encoder, image_encoder):
    enc.eval(); [p.requires_grad_(False) for p in enc.parameters()]
optG = torch.optim.Adam(netG.parameters(), lr=0.0001, betas=(0.0, 0.9))
optD = torch.optim.Adam(netD.parameters(), lr=0.0004, betas=(0.0, 0.9))

n_iter = a["warmup"] + a["steps"]
imgs = torch.rand(B, 3, size, size) * 2 - 1
lens = torch.full((B,), cfg.TEXT.WORDS_NUM, dtype=torch.long)
caps = torch.randint(1, n_words, (B, cfg.TEXT.WORDS_NUM, 1))
class Batches:                                               # what its DataLoader yields, the same batch every step
    def __len__(self): return n_iter
    def __iter__(self): return self
    def __next__(self): return [[imgs.clone()], caps.clone(), lens.clone(), torch.arange(B), [str(i) for i in range(B)]]
    next = __next__                                          # its loop calls data_iter.next()
marks, step = [], optG.step
def timed_step(*args, **kw):
    out = step(*args, **kw); marks.append(time.perf_counter()); return out
optG.step = timed_step
marks.append(time.perf_counter())
official.train(Batches(), {}, netG, netD, text_encoder, image_encoder, optG, optD, 0, B, torch.device("cpu"))
times = [t1 - t0 for t0, t1 in zip(marks, marks[1:])][a["warmup"]:]
print(json.dumps(dict(times=times, peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      threads=torch.get_num_threads())))
"""

VARIANTS = {  # name -> ("official", keep_freed_memory) or ("ours", bench_train.LEVERS name)
    "official as shipped": ("official", False),
    "official + allocator": ("official", True),
    "ours: no lever": ("ours", "no lever"),
    "ours: training loop (allocator + channels_last)": ("ours", "training loop (allocator + channels_last)"),
    "ours: training loop + bf16 autocast": ("ours", "training loop + bf16 autocast"),
}


def run_official(args, keep: bool) -> dict:
    "One child process running the authors' `train()` for warm-up + timed steps."
    a = dict(official=os.path.abspath(os.path.expanduser(args.official)), keep_freed=keep, threads=args.threads,
             batch_size=args.batch_size, nf=args.ngf, img_size=args.img_size, n_words=args.n_words,
             warmup=args.warmup, steps=args.steps)
    with tempfile.TemporaryDirectory() as work:
        out = subprocess.run([sys.executable, "-c", OFFICIAL_CHILD, json.dumps(dict(a, workdir=work))],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if out.returncode: raise SystemExit(f"official code: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="a checkout of https://github.com/wtliao/text2image")
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--ngf", type=int, default=64, help="NF of both G and D (cfg.TRAIN.NF)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-words", type=int, default=5450, help="vocabulary of the text encoder (CUB: 5450)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per subprocess")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per subprocess")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the variants")
    ap.add_argument("--only", default="", help="a comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "t2i_bench_sb256"),
                    help="SynthBirds folder for our side (built on first use)")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(os.path.expanduser(args.official), "main.py")):
        raise SystemExit(f"--official {args.official}: no main.py there; pass a checkout of wtliao/text2image")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_train                                        # our child process, its speed levers, helpers
    chosen = bench_train.pick(args.only, VARIANTS)
    ours = argparse.Namespace(data_dir=args.data_dir, n_train=bench_train.N_TRAIN, n_test=bench_train.N_TEST, img_size=args.img_size, ngf=args.ngf,
                              ndf=args.ngf, batch_size=args.batch_size, device="cpu", threads=args.threads,
                              steps=args.steps, warmup=args.warmup)
    res = {n: [] for n in chosen}
    for _ in range(args.rounds):
        for n in chosen:
            kind, what = VARIANTS[n]
            if kind == "official": res[n].append(run_official(args, what))
            else:
                keep, fold, cl, prec = bench_train.LEVERS[what]
                res[n].append(bench_train.run(argparse.Namespace(**vars(ours), fold_magp=fold, channels_last=cl,
                                                                 precision=prec), "none", keep))
    med = {n: statistics.median(bench_train.all_times(rs)) for n, rs in res.items()}
    ref = med.get("official as shipped")
    print(f"SSA-GAN iteration, {args.img_size} px, NF {args.ngf}, batch {args.batch_size}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up, "
          f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    print("| code | s/iteration (median) | min–max | images/s | official as shipped / this | peak RSS GiB |\n"
          "|---|---|---|---|---|---|")
    for n in chosen:
        ts = bench_train.all_times(res[n])
        speed = f"{ref / med[n]:.2f}" if ref else "—"
        print(f"| {n} | {med[n]:.2f} | {min(ts):.2f}–{max(ts):.2f} | {args.batch_size / med[n]:.3g} | {speed} | "
              f"{max(r['peak_gb'] for r in res[n]):.2f} |")


if __name__ == "__main__":
    main()
