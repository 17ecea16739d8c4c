"""Real-GPU checks (skipped without CUDA; `benchmarks/gpu_check.py` runs them on the first GPU): a tiny run per
precision end to end on the device (forward, backward, MA-GP, EMA, sampling, evaluation), and resume onto the GPU."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from t2i_nb.assets import prepare_assets
from t2i_nb.config import make_config
from t2i_nb.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    kw = dict(data_dir=str(root / "sb"), n_train=48, n_test=16, pretrain_epochs=1, epochs=2, ngf=8, ndf=8, batch_size=8,
              n_eval=100, device="cuda", out_dir=str(root / "runs"), loss="f2f_r2f", ema_decay=0.9)
    return kw, prepare_assets(make_config(**kw))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_tiny_run_on_the_gpu(tiny, precision):
    kw, assets = tiny
    d = train(make_config(**dict(kw, run_name=precision, precision=precision)), assets=assets, progress=False)
    losses = pd.read_csv(d / "losses.csv")
    assert len(losses) == 12 and np.isfinite(losses.drop(columns=["step", "epoch"]).to_numpy()).all()
    assert {m["metric"] for m in json.loads((d / "metrics.json").read_text())} >= {"fid_sb_100_test", "semantic_acc_sb"}


def test_resume_onto_the_gpu_continues_exactly(tiny):
    kw, assets = tiny
    whole = train(make_config(**dict(kw, run_name="whole", n_eval=0)), assets=assets, progress=False)
    train(make_config(**dict(kw, run_name="split", n_eval=0, epochs=1)), assets=assets, progress=False)
    split = train(make_config(**dict(kw, run_name="split", n_eval=0)), assets=assets, progress=False)
    a, b = (torch.load(Path(x) / "checkpoints" / "ckpt_0002.pt", weights_only=True) for x in (whole, split))
    for k in a["G"]: assert torch.allclose(a["G"][k].float(), b["G"][k].float(), atol=1e-5), k   # cuDNN may vary
