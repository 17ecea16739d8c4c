"""How fast does a short SynthBirds run learn? Quality per epoch of one training run, for the raw generator and EMAs.

Trains one SSA-GAN run (the main job's settings, any `TrainConfig` field overridden as `name=value`) and, every
`--every` epochs, evaluates `semantic_acc_sb` and `fid_sb_1k_test` on `--n` fakes of the raw generator and of an
EMA of it for each decay in `--decays` (tracked beside the run, so one run answers "which decay" at every epoch).
One JSON line per (epoch, generator) goes to `--out`; `nbs/04_ssagan.ipynb` ("Short runs") plots the committed
files of `results/short_runs/curves/`. The run itself goes to a temporary folder (its checkpoints are not kept).

    python benchmarks/short_run_curves.py --out results/short_runs/curves/lazy4.jsonl epochs=8 magp_every=4 ema_decay=0
    python benchmarks/short_run_curves.py --out /tmp/b8.jsonl epochs=6 batch_size=8 threads=1 --every 1

Quality depends on the thread count only in the last bits; wall time does, so run one at a time for timings.
"""
from __future__ import annotations
import argparse, json, tempfile, time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="TrainConfig fields as name=value (JSON values or plain strings)")
    p.add_argument("--out", required=True, help="JSON-lines file to write (refused if it exists)")
    p.add_argument("--every", type=int, default=2, help="evaluate every N epochs (and after the last)")
    p.add_argument("--decays", default="0.98,0.99", help="EMA decays tracked beside the run, comma-separated")
    p.add_argument("--n", type=int, default=1000, help="fakes per evaluation")
    a = p.parse_args()
    out = Path(a.out)
    if out.exists(): raise SystemExit(f"{out} exists: pick another --out (this script never overwrites)")

    from t2i_nb.accel import EMA
    from t2i_nb.archs import unwrap
    from t2i_nb.assets import prepare_assets
    from t2i_nb.config import make_config
    from t2i_nb.evaluation import evaluate
    from t2i_nb.train import Callback, train

    def value(v: str):
        try: return json.loads(v)
        except json.JSONDecodeError: return v
    over = dict(kv.split("=", 1) for kv in a.overrides)
    decays = [float(d) for d in a.decays.split(",") if d]
    tmp = tempfile.mkdtemp(prefix="short_run_")
    cfg = make_config("synth_birds", **{k: value(v) for k, v in over.items()}, out_dir=tmp, run_name="run", n_eval=0)
    assets = prepare_assets(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)

    class Curves(Callback):
        def __init__(self): self.emas, self.train_s, self.t = None, 0.0, time.time()
        def after_step(self, run):
            if self.emas is None: self.emas = {d: EMA(unwrap(run.models.G), d) for d in decays}
            for e in self.emas.values(): e.update(unwrap(run.models.G))
        def after_epoch(self, run):
            self.train_s += time.time() - self.t
            if run.epoch % a.every == 0 or run.epoch == run.cfg.epochs:
                for tag, G in [("G", unwrap(run.models.G)), *[(f"ema{d}", e.module) for d, e in self.emas.items()]]:
                    rows = evaluate(G, run.assets, a.n, run.device, seed=0, nz=run.models.arch_cfg.nz,
                                    metrics=["semantic_acc_sb", "fid_sb_1k_test"])
                    rec = dict(epoch=run.epoch, step=run.step, train_s=round(self.train_s), generator=tag,
                               **{r["metric"]: round(r["value"], 4) for r in rows}, **over)
                    print(json.dumps(rec), flush=True)
                    with open(out, "a") as f: f.write(json.dumps(rec) + "\n")
            self.t = time.time()

    train(cfg, assets=assets, callbacks=[Curves()], progress=True)


if __name__ == "__main__":
    main()
