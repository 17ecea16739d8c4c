import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from t2i_nb.synthbirds import make_synth_birds

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_birds(tmp_path_factory):
    "A small SynthBirds build shared by the tests of a session."
    return make_synth_birds(tmp_path_factory.mktemp("sb"), n_train=120, n_test=40, progress=False)


def _papermill(notebook: str, out, *args, **params) -> subprocess.CompletedProcess:
    "Run `nbs/<notebook>.ipynb` with papermill from the repository root; `params` become `-p name value` (dicts as JSON)."
    pm = ROOT / ".venv/bin/papermill"
    cmd = [str(pm) if pm.exists() else "papermill", str(ROOT / "nbs" / f"{notebook}.ipynb"), str(out), "--cwd", str(ROOT), *args]
    for k, v in params.items(): cmd += ["-p", k, json.dumps(v) if isinstance(v, dict) else str(v)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)


@pytest.fixture
def papermill():
    "`papermill(notebook, out, *args, **params)`: run an experiment notebook, return the finished process."
    return _papermill


def tiny_run_settings(root, **overrides) -> dict:
    "make_config keywords of a tiny SynthBirds run under `root` (48 training images, batch 8: 6 steps per epoch)."
    kw = dict(data_dir=str(root / "sb"), n_train=48, n_test=16, pretrain_epochs=1, epochs=2, ngf=8, ndf=8,
              batch_size=8, n_eval=0, device="cpu", out_dir=str(root / "runs"), loss="f2f_r2f", sample_every=2,
              threads=2)   # a fixed count: runs compared bit for bit must use the same
    return kw | overrides


TRAIN_SCRIPT = """
import json, os, signal, sys
from t2i_nb.config import make_config
from t2i_nb.train import Callback, train
kw, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])
class KillAt(Callback):
    def after_step(self, run):
        if run.step == kill_at: os.kill(os.getpid(), signal.SIGKILL)
train(make_config(**kw), callbacks=[KillAt()] if kill_at else [], progress=False)
"""


def run_train_script(kw, kill_at=0) -> subprocess.CompletedProcess:
    "Train `make_config(**kw)` in a fresh process, killing it with SIGKILL after step `kill_at` (0: never)."
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, json.dumps(kw), str(kill_at)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
