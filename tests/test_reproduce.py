"A tiny study: parallel workers, skipping finished runs, failures reported by name, the cross-preset grid."
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from t2i_nb.reproduce import StudyError, is_done, loss_grid, run_study, study_configs
from t2i_nb.assets import prepare_assets
from t2i_nb.config import make_config
from t2i_nb.train import read_metrics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    kw = dict(data_dir=str(root / "sb"), n_train=48, n_test=16, pretrain_epochs=1, epochs=1, ngf=8, ndf=8,
              batch_size=8, n_eval=32, device="cpu")
    prepare_assets(make_config(**kw))
    return root, kw


def test_study_runs_in_parallel_then_skips_finished_runs(tiny, capsys):
    root, kw = tiny
    cfgs = study_configs(losses=["none", "f2f"], seeds=[7], out_dir=str(root / "out"), **kw)
    dirs = run_study(cfgs, workers=2, threads=1)
    assert dirs == [root / "out" / "synth_birds" / n for n in ("ssagan-none-s7", "ssagan-f2f-s7")]
    for c in cfgs:
        assert is_done(c)
        saved = json.loads((c.run_dir / "config.json").read_text())["config"]
        assert (saved["loss"], saved["seed"], saved["epochs"]) == (c.loss, 7, 1)
        assert {m["metric"] for m in read_metrics(c.run_dir)} >= {"fid_sb_32_test", "semantic_acc_sb", "rprec_100_heldout"}
    stamp = [c.run_dir.joinpath("metrics.json").stat().st_mtime_ns for c in cfgs]
    capsys.readouterr()
    run_study(cfgs, workers=2)
    assert "2 of 2 runs already finished; 0 to go" in capsys.readouterr().out
    assert stamp == [c.run_dir.joinpath("metrics.json").stat().st_mtime_ns for c in cfgs]

    grid = loss_grid(cfgs, root / "grid.png", n=4)
    w, h = Image.open(grid).size
    assert h > w / 4 * 2  # three rows (real + two presets) of four captions


def test_a_failing_run_is_named_and_the_others_still_finish(tiny):
    root, kw = tiny
    good = study_configs(losses=["r2f"], seeds=[8], out_dir=str(root / "fail"), **kw)
    bad = study_configs(losses=["none"], seeds=[8], out_dir=str(root / "fail"), **kw)
    foreign = {k: 0 for k in ("G", "D", "optG", "optD", "epoch", "step", "rng", "noise_rng")}
    torch.save(dict(foreign, config=dict(arch="ssagan", loss="f2f")), _ckpt(bad[0]))  # another run's checkpoint
    (bad[0].run_dir / "config.json").write_text(json.dumps(dict(config=dict(arch="ssagan", loss="f2f"))))
    with pytest.raises(StudyError, match="1 of 2 runs failed.*ssagan-none-s8.*was trained with other settings \\(loss: 'f2f' in the checkpoint, 'none' now\\)"):
        run_study(good + bad, workers=1)
    assert is_done(good[0]) and not is_done(bad[0])


def _ckpt(cfg):
    (cfg.run_dir / "checkpoints").mkdir(parents=True)
    return cfg.run_dir / "checkpoints" / "ckpt_0001.pt"


def test_reproduce_notebook_runs_a_tiny_study(tiny, tmp_path, papermill):
    root, kw = tiny
    r = papermill("reproduce", tmp_path / "out.ipynb", "-y", "losses: [none]\nseeds: [9]", out_dir=tmp_path / "out", extra=kw)
    assert r.returncode == 0, r.stderr[-3000:]
    study = tmp_path / "out" / "synth_birds"
    assert (study / "ssagan-none-s9" / "metrics.json").exists() and (study / "samples_ssagan.png").exists()


def test_reproduce_notebook_with_cub_asks_for_the_dataset(tmp_path, papermill):
    r = papermill("reproduce", tmp_path / "out.ipynb", dataset="cub", device="cpu", extra=dict(data_dir=str(tmp_path / "birds")))
    assert r.returncode != 0
    assert f"data_dir '{tmp_path / 'birds'}' does not exist: a cub run needs the dataset" in r.stdout + r.stderr


def test_loss_grid_prepares_assets_with_gradients_on(monkeypatch, tmp_path):
    ("A grid over a study whose captioner is not cached yet pretrains it inside `loss_grid`: that training needs "
     "autograd, so only the generation may run under no_grad.")
    import t2i_nb.reproduce as rp
    seen = []
    def fake_prepare(cfg, device):
        seen.append(torch.is_grad_enabled()); raise RuntimeError("stop here")
    monkeypatch.setattr(rp, "prepare_assets", fake_prepare)
    cfgs = study_configs("synth_birds", losses=["none", "f2f_r2f_cap"], seeds=[100], out_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="stop here"): loss_grid(cfgs, tmp_path / "g.png")
    assert seen == [True]
