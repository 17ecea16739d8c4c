"""The first-GPU check: one short prepared script for the day a GPU is available (not part of the test command).

1. the device tests on real CUDA: `tests/test_cuda.py` (tiny runs per precision, resume onto the GPU) and
   `tests/test_device.py` (the FakeTensor checks, which run anywhere);
2. the paper's SSA-GAN iteration at 256 px (ngf = ndf = 64, batch 24, Inception DAMSM image encoder, f2f_r2f) for
   `--steps` timed steps per precision (fp32 / bf16 / fp16) with torch.compile off and on, printing images/s,
   peak GPU memory and the speed-up over fp32.

    python benchmarks/gpu_check.py                 # everything, about 5 minutes on one H100/H200
    python benchmarks/gpu_check.py --skip-tests --steps 20 --no-compile

Results are printed as a markdown table and written to `--out` (JSON).
"""
from __future__ import annotations
import argparse, json, os, statistics, subprocess, sys, time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def synthetic_batch(B: int, size: int, n_words: int, words: int = 18, device="cuda") -> dict:
    "A batch with the loader's keys: random images and captions (the speed does not depend on their values)."
    g = torch.Generator().manual_seed(0)
    caps = torch.randint(1, n_words, (B, words), generator=g)
    lens = torch.full((B,), words)
    return {k: v.to(device) for k, v in dict(img=torch.rand(B, 3, size, size, generator=g) * 2 - 1, caption=caps, cap_len=lens,
                                             caption2=caps.roll(1, 1), cap_len2=lens,
                                             class_id=torch.arange(B) % 5).items()}


def _sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize()

def time_iterations(precision: str, compile: bool, steps: int, loss: str = "f2f_r2f", device: str = "cuda",
                    **overrides) -> dict:
    "Median time of the paper's SSA-GAN iteration (cub_paper preset, `overrides` applied) on a synthetic batch."
    from t2i_nb.accel import Precision
    from t2i_nb.encoders import InceptionImageEncoder, TextEncoder
    from t2i_nb.losses import loss_config
    from t2i_nb.archs import Encoders, build_models, train_step
    from t2i_nb.config import make_config
    dev = torch.device(device)
    cfg = make_config("synth_birds", "cub_paper", data_dir=".", device=device, precision=precision, compile=compile,
                      loss=loss, num_workers=0, **overrides)
    torch.manual_seed(0)
    m = build_models(cfg, dev)
    enc = Encoders(TextEncoder(5450).to(dev).eval().requires_grad_(False),
                   InceptionImageEncoder(weights=None).to(dev).eval().requires_grad_(False))
    batch = synthetic_batch(cfg.batch_size, cfg.img_size, 5450, device=dev)
    prec, lc = Precision(precision, dev), loss_config(loss)
    step = lambda: train_step(m, batch, enc, lc, torch.randn(cfg.batch_size, 100, device=dev), prec)
    t0 = time.perf_counter()
    for _ in range(3): step()                                  # warm-up (and compilation)
    _sync(dev); warm = time.perf_counter() - t0
    if dev.type == "cuda": torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter(); step(); _sync(dev); times.append(time.perf_counter() - t)
    s = statistics.median(times)
    return dict(precision=precision, compile=compile, s_per_step=s, images_per_s=cfg.batch_size / s,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan"), warmup_s=warm)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", ".") + "/gpu_check.json")
    args = ap.parse_args()
    if not torch.cuda.is_available(): raise SystemExit("gpu_check: no CUDA device here")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    if not args.skip_tests:
        try: r = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py", "tests/test_device.py"], cwd=ROOT,
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=240)
        except subprocess.TimeoutExpired as e:
            r = subprocess.CompletedProcess(e.cmd, -1, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else e.stdout or "",
                                            "timed out after 240 s")
        print(r.stdout[-3000:], r.stderr[-2000:], flush=True)
        report["tests"] = dict(returncode=r.returncode, tail=r.stdout[-500:])
    rows = []
    for compile in ((False,) if args.no_compile else (False, True)):
        for precision in ("fp32", "bf16", "fp16"):
            try: rows.append(time_iterations(precision, compile, args.steps))
            except Exception as e: rows.append(dict(precision=precision, compile=compile, error=f"{type(e).__name__}: {e}"[:300]))
            print(rows[-1], flush=True)
    report["throughput"] = rows
    Path(args.out).write_text(json.dumps(report, indent=2))
    base = next((r["s_per_step"] for r in rows if r["precision"] == "fp32" and not r["compile"] and "error" not in r), None)
    print(f"\nSSA-GAN iteration, 256 px, ngf/ndf 64, batch 24, f2f_r2f, median of {args.steps} steps")
    print("| precision | compile | s/step | images/s | x fp32 eager | peak GiB | warm-up s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r: print(f"| {r['precision']} | {r['compile']} | failed: {r['error'][:60]} | | | | |"); continue
        print(f"| {r['precision']} | {r['compile']} | {r['s_per_step']:.3f} | {r['images_per_s']:.1f} | "
              f"{base / r['s_per_step'] if base else float('nan'):.2f} | {r['peak_gib']:.1f} | {r['warmup_s']:.0f} |")


if __name__ == "__main__":
    main()
