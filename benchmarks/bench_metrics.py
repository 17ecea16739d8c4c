"""Speed of the metric pass: images/s of one pass (FID features + IS probabilities from one forward) vs
two passes (a FID-feature pass, then an IS pass through the module's own softmax forward, as separate
FID and IS tools do), plus the SynthBirds evaluator pass.

The Inception network here is torchvision's Inception-v3 with RANDOM weights, rearranged into the
structure of clean-fid's TorchScript file (`layers` -> N×2048, `output` = Linear(2048, 1008), the same
forward signature) and scripted: same architecture and cost as the real file, numbers meaningless —
timing only. `--net fake` uses the tiny stand-in from the tests instead.

    python benchmarks/bench_metrics.py [--n 64] [--size 256] [--batch 32] [--device cpu] [--net tv]
"""
import argparse, os, tempfile, time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from t2i_nb.evaluator import SBEvaluator, SBFeatures
from t2i_nb.metrics import INCEPTION_FILE, InceptionFeatures, _FakeInception, make_fake_inception, run_pass


class TimingInception(_FakeInception):
    "torchvision Inception-v3 (random weights) in the NVlabs TorchScript layout: layers -> pool3, output -> 1008 logits."
    def __init__(self):
        super().__init__()                      # the stand-in's forward and `output`; only `layers` is replaced
        tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
                 "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                 "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]
        self.layers = nn.Sequential(*[getattr(tv, n) for n in names])


def batches(n, bs, size):
    g = torch.Generator().manual_seed(0)
    return lambda: (dict(img=torch.rand(min(bs, n - s), 3, size, size, generator=g) * 2 - 1) for s in range(0, n, bs))


def timed(fn):
    if torch.cuda.is_available(): torch.cuda.synchronize()
    t = time.perf_counter(); out = fn()
    if torch.cuda.is_available(): torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64); ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32); ap.add_argument("--device", default="cpu")
    ap.add_argument("--net", choices=["tv", "fake"], default="tv")
    a = ap.parse_args()
    dev = torch.device(a.device)
    path = Path(tempfile.mkdtemp()) / INCEPTION_FILE
    if a.net == "tv": torch.jit.script(TimingInception().eval()).save(str(path))
    else: make_fake_inception(path)
    inc = InceptionFeatures(path, mode="clean", device=dev)
    data = batches(a.n, a.batch, a.size)
    run_pass(batches(a.batch, a.batch, a.size), {"inception": inc}, device=dev, desc="warm-up")

    t_one, _ = timed(lambda: run_pass(data, {"inception": inc}, device=dev, desc="one pass"))

    def two_passes():
        with torch.no_grad():
            feats = [inc.features(b["img"]) for b in data()]                                    # FID pass
            probs = [inc.net((inc.prepare(b["img"]) * 128 + 128).to(dev), no_output_bias=True)  # IS pass (module softmax)
                     for b in data()]
        return feats, probs
    t_two, _ = timed(two_passes)
    t_resize, _ = timed(lambda: [inc.prepare(b["img"]) for b in data()])

    ev = SBFeatures(SBEvaluator())
    t_sb, _ = timed(lambda: run_pass(batches(a.n * 4, a.batch, 64), {"sb": ev}, device=dev, desc="sb pass"))

    net = "torchvision Inception-v3, RANDOM weights, scripted in clean-fid's layout (timing only)" if a.net == "tv" else "tiny random stand-in (timing only)"
    print(f"\nmetric pass speed — device {dev}, torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}")
    print(f"network: {net}; fakes {a.n} × {a.size}² in batches of {a.batch}; resize mode 'clean' (clean-fid PIL bicubic, CPU)\n")
    rows = [("one pass: FID feats + IS probs, 1 forward/img", a.n, t_one),
            ("two passes: FID pass + IS pass, 2 forwards/img", a.n, t_two),
            ("  of which clean resize alone (1 pass)", a.n, t_resize),
            ("SynthBirds evaluator pass (64², feats+probs+attrs)", a.n * 4, t_sb)]
    print(f"{'pass':52} {'images':>7} {'seconds':>8} {'images/s':>9}")
    for name, n, t in rows: print(f"{name:52} {n:7d} {t:8.2f} {n / t:9.1f}")
    print(f"\none pass is {t_two / t_one:.2f}x faster than two passes")


if __name__ == "__main__":
    main()
