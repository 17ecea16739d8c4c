"""Cost of one SSA-GAN training step per loss preset, relative to `none` (adversarial + DAMSM), on SynthBirds.

A step is what the training loop does with `t2i_nb.losses`:

    inp   = generator_inputs(text_encoder, batch, cfg, noise)   # 2N rows when F2F is on
    fakes = generate(G, inp)                                    # one generator call
    d_step(... fake=fakes[:N]) ; magp_step(...)                 # D sees the first-caption fakes in every preset
    g_step(... fake=fakes, extra_loss_fn=auxiliary_terms(...))  # Eq. 4 on all fakes

Models: the `synth_birds_64` SSA-GAN preset, the DAMSM text encoder and small image encoder of the
`synth_birds` DAMSM preset, and the default captioner, all freshly initialised (speed does not depend
on the weights). Presets are timed in interleaved rounds (none, f2f, r2f, ... , none, f2f, ...) and the
median is reported, so that load from other processes on a shared machine hits every preset alike.

    python benchmarks/bench_losses.py                        # SynthBirds at /tmp/sb (built if missing)
    python benchmarks/bench_losses.py --rounds 3 --threads 2
"""
from __future__ import annotations
import argparse, os, statistics, time
from dataclasses import replace
from functools import partial
from pathlib import Path


def build(data_root, batch_size, device):
    "Models, optimisers and one real SynthBirds batch (two captions per image)."
    import torch
    from t2i_nb.captioner import Captioner, CaptionerConfig, freeze
    from t2i_nb.data import TextImageDataset, epoch_loader, make_synth_birds, mismatch_index
    from t2i_nb.encoders import SmallImageEncoder, TextEncoder
    from t2i_nb.ssagan import PRESETS, make_models, make_optimizers
    if not Path(data_root, "captions.pickle").exists() and not Path(data_root, "CUB_200_2011").exists():
        make_synth_birds(data_root, progress=False)
    ds = TextImageDataset(data_root, "train", img_size=64, two_captions=True)
    batch = next(iter(epoch_loader(ds, batch_size)))
    batch["mis_index"] = mismatch_index(batch["class_id"])
    scfg = replace(PRESETS["synth_birds_64"], batch_size=batch_size)
    G, D = make_models(scfg, device)
    optG, optD = make_optimizers(G, D, scfg)
    txt = TextEncoder(ds.n_words).to(device).eval()
    img = freeze(SmallImageEncoder(nef=256, ndf=32, img_size=64).to(device))
    cap = freeze(Captioner(ds.n_words, CaptionerConfig()).to(device))
    return dict(G=G, D=D, optG=optG, optD=optD, scfg=scfg, txt=txt, img=img, cap=cap, batch=batch)


def step(m, cfg, device) -> tuple[float, float]:
    "One full training step; returns (seconds for the whole step, seconds for the generator part)."
    import torch
    from t2i_nb.losses import auxiliary_terms, generate, generator_inputs
    from t2i_nb.ssagan import d_step, g_step, magp_step
    b, N = m["batch"], len(m["batch"]["caption"])
    real = b["img"].to(device)
    t0 = time.perf_counter()
    noise = torch.randn(N, m["scfg"].nz, device=device)
    inp = generator_inputs(m["txt"], b, cfg, noise, device)
    fakes = generate(m["G"], inp)
    t1 = time.perf_counter()
    sent = inp["sent"][:N]
    d_step(m["G"], m["D"], m["optD"], real, sent, sent[b["mis_index"].to(device)], noise, m["scfg"], fake=fakes[:N])
    magp_step(m["D"], m["optD"], real, sent, m["scfg"])
    t2 = time.perf_counter()
    extra = partial(auxiliary_terms, inp=inp, cfg=cfg, img_encoder=m["img"], real_imgs=real, captioner=m["cap"])
    g_step(m["G"], m["D"], m["optG"], inp["sent"], inp["noise"], m["scfg"], fake=fakes, extra_loss_fn=extra)
    t3 = time.perf_counter()
    return t3 - t0, (t1 - t0) + (t3 - t2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="/tmp/sb")
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every preset once)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is the most stable on a shared CPU)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    import torch
    from t2i_nb.core import get_device, seed_everything
    from t2i_nb.losses import LOSS_PRESETS, WEIGHTS, loss_config
    if a.threads: torch.set_num_threads(a.threads)
    dev = get_device(a.device)
    seed_everything(0)
    m = build(a.data_root, a.batch_size, dev)
    names = list(LOSS_PRESETS)
    for n in names: step(m, loss_config(n), dev)                                      # warm-up
    times = {n: [] for n in names}
    for _ in range(a.rounds):
        for n in names: times[n].append(step(m, loss_config(n), dev))
    med = {n: (statistics.median(t for t, _ in v), statistics.median(g for _, g in v)) for n, v in times.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"SSA-GAN step on SynthBirds 64 px, batch {a.batch_size}, device {dev}, {torch.get_num_threads()} thread(s), "
          f"median of {a.rounds} interleaved rounds, load average {load:.1f} at the end")
    print("| preset | terms | G rows | s/step | x none | G part s (gen + Eq. 4 + backward) | x none |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        cfg = loss_config(n)
        terms = "adv + " + " + ".join(f"{getattr(cfg, w):g}·{k}" for k, w in WEIGHTS.items() if getattr(cfg, w) > 0)
        s, g = med[n]
        print(f"| {n} | {terms} | {2 * a.batch_size if cfg.two_captions else a.batch_size} | {s:.2f} | {s / med['none'][0]:.2f} "
              f"| {g:.2f} | {g / med['none'][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
