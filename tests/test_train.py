"Training loop: exact resume after SIGKILL, truncated checkpoints, NaN stop, bad parameters, the papermill entry point."
import json, os, signal, subprocess, sys, warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from t2i_nb.core import NonFiniteLossError
from t2i_nb.data import DataLayoutError
from t2i_nb.assets import prepare_assets
from t2i_nb.config import make_config
from t2i_nb.train import Callback, CheckpointWarning, train

from conftest import run_train_script, tiny_run_settings

ROOT = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "Tiny SynthBirds run settings (6 steps per epoch, 3 epochs) with its pretrained assets already cached."
    root = tmp_path_factory.mktemp("train")
    kw = tiny_run_settings(root, epochs=3)
    prepare_assets(make_config(**kw))
    return kw


run_script = run_train_script


def final_state(kw):
    return torch.load(Path(kw["out_dir"]) / kw["run_name"] / "checkpoints" / "ckpt_0003.pt", weights_only=True)


def assert_same_weights(a, b):
    for part in ("G", "D"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]: assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


def test_sigkill_then_resume_gives_the_same_weights(tiny):
    ref = dict(tiny, run_name="uninterrupted")
    assert run_script(ref).returncode == 0
    killed = dict(tiny, run_name="killed")
    r = run_script(killed, kill_at=10)                    # mid epoch 2: the epoch-1 checkpoint is the latest
    assert r.returncode == -signal.SIGKILL
    run = Path(tiny["out_dir"]) / "killed"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt_0001.pt"]
    assert run_script(killed).returncode == 0            # resume=True by default
    assert_same_weights(final_state(ref), final_state(killed))
    a, b = (pd.read_csv(Path(tiny["out_dir"]) / n / "losses.csv") for n in ("uninterrupted", "killed"))
    pd.testing.assert_frame_equal(a, b)                   # the log matches too (no duplicated steps)
    assert final_state(killed)["step"] == 18 and (run / "samples.png").exists() and (run / "loss_curves.png").exists()


def test_truncated_checkpoint_is_reported_and_the_previous_one_used(tiny):
    ref = dict(tiny, run_name="uninterrupted")
    if not (Path(tiny["out_dir"]) / "uninterrupted" / "checkpoints" / "ckpt_0003.pt").exists(): run_script(ref)
    kw = dict(tiny, run_name="truncated")
    assert run_script(kw, kill_at=16).returncode == -signal.SIGKILL      # after the epoch-2 checkpoint
    newest = Path(tiny["out_dir"]) / "truncated" / "checkpoints" / "ckpt_0002.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(CheckpointWarning, match="ckpt_0002.pt is unreadable"):
        train(make_config(**kw), progress=False)
    assert_same_weights(final_state(ref), final_state(kw))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny):
    class PoisonG(Callback):
        def after_step(self, run):
            if run.step == 8:
                with torch.no_grad():
                    for p in run.models.G.parameters(): p.fill_(float("nan"))
    kw = dict(tiny, run_name="nan", resume=False)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at .*epoch 1 step 8.*last good checkpoint: .*ckpt_0001.pt"):
        train(make_config(**kw), callbacks=[PoisonG()], progress=False)
    ckpts = sorted((Path(tiny["out_dir"]) / "nan" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["ckpt_0001.pt"]
    state = torch.load(ckpts[0], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["G"].values() if v.is_floating_point())


@pytest.mark.parametrize("kw,msg", [
    (dict(loss="f2f_typo"), "unknown loss preset 'f2f_typo' for arch 'ssagan'; valid loss presets: f2f, f2f_r2f, f2f_r2f_cap, none, r2f"),
    (dict(arch="attngan9"), "unknown architecture 'attngan9'; valid architectures: attngan, ssagan, style1_attngan, style2_attngan"),
    (dict(dataset="imagenet"), "unknown dataset 'imagenet'; valid datasets: coco, cub, synth_birds"),
    (dict(preset="cub_papr"), "unknown training preset 'cub_papr'"),
    (dict(lambdas={"lambda_f2f": float("nan")}), "lambda_f2f must be a finite number"),
    (dict(img_size=48), "img_size must be 64, 128 or 256"),
])
def test_bad_parameters_fail_fast(kw, msg):
    with pytest.raises((KeyError, ValueError, TypeError), match=msg.replace("(", r"\(").replace(")", r"\)")):
        make_config(**kw)


def test_cub_without_its_data_dir_fails_fast(tmp_path):
    with pytest.raises(DataLayoutError, match="data_dir .*nowhere.* does not exist: a cub run needs the dataset"):
        make_config("cub", data_dir=str(tmp_path / "nowhere"))


def test_train_notebook_runs_under_papermill_with_tiny_parameters(tiny, tmp_path, papermill):
    extra = dict(n_train=tiny["n_train"], n_test=tiny["n_test"], pretrain_epochs=1, sample_every=1)
    r = papermill("train", tmp_path / "out.ipynb", data_dir=tiny["data_dir"], out_dir=str(tmp_path / "runs"), run_name="pm",
                  epochs=1, batch_size=8, ngf=8, ndf=8, n_eval=500, device="cpu", loss="f2f", precision="bf16", extra=extra)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "pm"
    for f in ("config.json", "losses.csv", "samples.png", "loss_curves.png", "metrics.json", "checkpoints/ckpt_0001.pt"):
        assert (run / f).exists(), f
    metrics = {m["metric"]: m for m in json.loads((run / "metrics.json").read_text())}
    assert {"rprec_100_heldout", "fid_sb_500_test", "is_sb_500", "semantic_acc_sb", "consistency_sb", "diversity_sb"} <= set(metrics)
    assert all(m["n_fake"] == 500 for k, m in metrics.items() if k not in ("consistency_sb", "diversity_sb"))
    assert metrics["diversity_sb"]["n_fake"] == 10 * tiny["n_test"]    # its own protocol: 10 noises per test caption
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["loss"] == "f2f" and cfg["config"]["precision"] == "bf16" and cfg["loss"]["lambda_f2f"] == 0.2 and cfg["assets"]["damsm"]["text"].endswith(".pth")
    assert set(pd.read_csv(run / "losses.csv").columns) >= {"step", "d_loss", "magp", "g_adv", "g_damsm", "g_f2f", "g_loss"}


def test_train_notebook_reports_bad_parameters(tmp_path, papermill):
    r = papermill("train", tmp_path / "bad.ipynb", loss="nope")
    assert r.returncode != 0 and "unknown loss preset 'nope'" in (r.stdout + r.stderr)


def test_tensorboard_callback_logs_losses_samples_and_metrics(tiny, tmp_path):
    from t2i_nb.train import TensorBoard

    class Writer:                                     # SummaryWriter's interface, recording the calls
        def __init__(self): self.calls = []
        def add_scalar(self, tag, v, step): self.calls.append(("scalar", tag, step))
        def add_image(self, tag, img, step, dataformats): self.calls.append(("image", tag, step, img.shape[-1]))
        def flush(self): self.calls.append(("flush",))
    w = Writer()
    kw = dict(tiny, run_name="tb", out_dir=str(tmp_path), epochs=1, n_eval=40, sample_every=1)
    train(make_config(**kw), callbacks=[TensorBoard(w)], progress=False)
    scalars = [c for c in w.calls if c[0] == "scalar"]
    assert ("scalar", "loss/d_loss", 1) in scalars and ("scalar", "loss/g_loss", 6) in scalars
    assert ("image", "samples", 6, 3) in w.calls and ("scalar", "metrics/semantic_acc_sb", 6) in scalars
    assert w.calls[-1] == ("flush",)
    import importlib.util
    if importlib.util.find_spec("tensorboard") is None:      # an optional extra: asking for it without it fails first
        with pytest.raises(ImportError, match="tensorboard=True needs the tensorboard package"): make_config(tensorboard=True)
