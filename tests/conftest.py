import json
import subprocess
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
              batch_size=8, n_eval=0, device="cpu", out_dir=str(root / "runs"), loss="f2f_r2f", sample_every=2)
    return kw | overrides
