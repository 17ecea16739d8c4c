"""Reliability: hostile files never run, nothing a run did not write is destroyed, a run folder tells the truth,
and bad input is named before work starts (issue 17). Each test is one class of the adversarial pass."""
import json, os, pickle, signal, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_nb.core import NonFiniteLossError
from t2i_nb.data import DataCheckError, TextImageDataset, load_image, preflight, write_fixture
from t2i_nb.files import RunLockedError, UntrustedFileError
from t2i_nb.assets import prepare_assets
from t2i_nb.config import make_config
from t2i_nb.train import Callback, CheckpointError, CheckpointWarning, load_run, train

from conftest import tiny_run_settings

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    "Unpickling this makes the folder `marker`: a stand-in for any code a hostile file would run."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.mkdir, (self.marker,))


def files_of(folder: Path) -> dict:
    "Every file under `folder` with its bytes (the lock file, which only names its holder, aside)."
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "Tiny SynthBirds settings (6 steps per epoch, 2 epochs), pretrained assets cached once for the module."
    root = tmp_path_factory.mktemp("rel")
    kw = tiny_run_settings(root, loss="f2f")
    return kw, prepare_assets(make_config(**kw))


def run(tiny, **kw):
    base, assets = tiny
    return train(make_config(**{**base, **kw}), assets=assets, progress=False)


# ---------------------------------------------------------------- code execution
def test_hostile_checkpoint_never_runs_and_is_named(tiny, tmp_path):
    d = run(tiny, run_name="hostile", epochs=1)
    ck = d / "checkpoints" / "ckpt_0001.pt"
    state = torch.load(ck, weights_only=True)
    marker = tmp_path / "pwned"
    torch.save(dict(state, extra=Payload(marker)), ck)
    with pytest.warns(CheckpointWarning, match="holds objects other than tensors"):
        with pytest.raises(CheckpointError, match="none of the 1 checkpoint"):
            run(tiny, run_name="hostile", epochs=2)
    with pytest.warns(CheckpointWarning), pytest.raises(FileNotFoundError, match="no readable checkpoint"):
        load_run(d, assets=tiny[1])
    assert not marker.exists()


def test_hostile_files_in_every_other_loader_never_run(tmp_path):
    from t2i_nb.captioner import load_captioner
    from t2i_nb.encoders import load_text_encoder
    from t2i_nb.evaluator import load_evaluator
    from t2i_nb.ssagan import load_official_generator
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"encoder.weight": torch.zeros(3, 2), "x": Payload(marker)}, evil)
    for load in (load_text_encoder, load_captioner, load_evaluator, load_official_generator):
        with pytest.raises(UntrustedFileError, match="evil.pth holds objects other than tensors"): load(evil)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["captions.pickle", "train/filenames.pickle", "train/class_info.pickle"])
def test_hostile_dataset_pickles_never_run(tmp_path, name):
    root = write_fixture(tmp_path / "cub")
    TextImageDataset(root, "train")                          # builds captions.pickle from text/
    marker = tmp_path / "pwned"
    with open(root / name, "wb") as f: pickle.dump([Payload(marker)], f, protocol=2)
    with pytest.raises(UntrustedFileError, match=f"{name}.* refers to .*mkdir"): TextImageDataset(root, "train")
    assert not marker.exists()


# ---------------------------------------------------------------- data loss
def test_synth_birds_is_never_built_into_a_real_dataset(tmp_path):
    cub = write_fixture(tmp_path / "birds")
    before = files_of(cub)
    with pytest.raises(FileExistsError, match="refusing to build SynthBirds"):
        prepare_assets(make_config(data_dir=str(cub), n_train=8, n_test=4, batch_size=4, pretrain_epochs=1, device="cpu"))
    assert files_of(cub) == before


def test_run_name_cannot_leave_out_dir(tiny):
    other = run(tiny, run_name="victim", epochs=1)
    before = files_of(other)
    for bad in ("../victim", "runs/../victim", "/tmp/victim", ".."):
        with pytest.raises(ValueError, match="must be one folder name"): run(tiny, run_name=bad, resume=False)
    assert files_of(other) == before


def test_fresh_start_refuses_a_folder_with_foreign_files(tiny):
    base, _ = tiny
    d = Path(base["out_dir"]) / "mine"
    d.mkdir(parents=True)
    (d / "thesis.tex").write_text("only copy")
    for resume in (False, True):
        with pytest.raises(FileExistsError, match="holds files that train\\(\\) does not write \\(thesis.tex\\)"):
            run(tiny, run_name="mine", resume=resume)
    assert sorted(p.name for p in d.iterdir()) == ["thesis.tex"] and (d / "thesis.tex").read_text() == "only copy"


def test_a_folder_with_only_checkpoints_of_another_tool_is_refused(tiny):
    d = Path(tiny[0]["out_dir"]) / "other-tool"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "netG_600.pth").write_bytes(b"someone's weights")
    for resume in (False, True):
        with pytest.raises(FileExistsError, match="checkpoints but no config.json of a run"):
            run(tiny, run_name="other-tool", resume=resume)
    assert (d / "checkpoints" / "netG_600.pth").read_bytes() == b"someone's weights"


def test_all_corrupt_checkpoints_stop_the_run_and_stay(tiny):
    d = run(tiny, run_name="corrupt")
    for p in (d / "checkpoints").iterdir(): p.write_bytes(p.read_bytes()[:300])
    before = files_of(d)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="none of the 2 checkpoint"):
        run(tiny, run_name="corrupt", epochs=3)
    assert files_of(d) == before                              # nothing pruned, config.json untouched


def test_a_second_process_on_the_same_run_gets_a_clear_error(tiny):
    base, _ = tiny
    d = Path(base["out_dir"]) / "busy"
    code = (f"from t2i_nb.files import RunLock; import time; l = RunLock({str(d)!r}).__enter__(); "
            f"print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"in use by another run .*\"pid\": {p.pid}"): run(tiny, run_name="busy")
    finally: p.kill(); p.wait()
    assert (run(tiny, run_name="busy", epochs=1) / "checkpoints" / "ckpt_0001.pt").exists()   # free after the kill


# ---------------------------------------------------------------- a run folder tells the truth
def test_resume_with_other_settings_is_refused_before_anything_is_written(tiny):
    d = run(tiny, run_name="changed", epochs=1)
    before = files_of(d)
    with pytest.raises(CheckpointError, match=r"lambdas: \{\} in the checkpoint, \{'lambda_f2f': 0.5\} now.*lr_g"):
        run(tiny, run_name="changed", epochs=2, lambdas={"lambda_f2f": 0.5}, lr_g=1e-4)
    assert files_of(d) == before


def test_allowed_config_change_uses_the_new_lr_and_is_recorded(tiny):
    seen = {}
    class Lr(Callback):
        def after_step(self, r): seen.setdefault("lr", [g["lr"] for g in r.models.optG.param_groups])
    run(tiny, run_name="allowed", epochs=1)
    d = train(make_config(**{**tiny[0], "run_name": "allowed", "epochs": 2, "lr_g": 1e-4, "allow_config_change": True}),
              assets=tiny[1], callbacks=[Lr()], progress=False)
    assert seen["lr"] == [1e-4]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["config"]["lr_g"] == 1e-4 and cfg["resumed_from"]["step"] == 6
    assert cfg["changes"] == [dict(step=6, changes={"lr_g": [2e-4, 1e-4]})]
    assert torch.load(d / "checkpoints" / "ckpt_0002.pt", weights_only=True)["changes"] == cfg["changes"]


def test_continuing_a_finished_run_invalidates_its_metrics(tiny):
    d = run(tiny, run_name="continued", epochs=1, n_eval=40)
    assert (d / "metrics.json").exists()
    class Kill(Callback):
        def after_step(self, r):
            if r.step == 8: raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(make_config(**{**tiny[0], "run_name": "continued", "epochs": 2, "n_eval": 40}), assets=tiny[1],
              callbacks=[Kill()], progress=False)
    assert not (d / "metrics.json").exists()                   # the old metrics describe weights no longer final


def test_periodic_evaluations_are_neither_skipped_nor_repeated_on_resume(tiny):
    kw = dict(run_name="history", epochs=3, n_eval=40, eval_every=1)
    class KillAfterEval(Callback):                             # dies after epoch 2 evaluated, before its checkpoint
        def after_epoch(self, r):
            if r.epoch == 2: raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(make_config(**{**tiny[0], **kw}), assets=tiny[1], callbacks=[KillAfterEval()], progress=False)
    d = run(tiny, **kw)
    epochs = [json.loads(l)["epoch"] for l in (d / "metrics_history.jsonl").read_text().splitlines()]
    n_metrics = len(epochs) // 2
    assert n_metrics >= 1 and epochs == [1] * n_metrics + [2] * n_metrics


def test_a_nonfinite_weight_with_a_finite_loss_is_never_checkpointed(tiny):
    class PoisonLastStep(Callback):                            # the loss of step 6 was finite; the weights are not
        def after_step(self, r):
            if r.step == 6:
                p = next(r.models.D.parameters())
                with torch.no_grad(): p[(0,) * p.dim()] = float("inf")
    with pytest.raises(NonFiniteLossError, match="non-finite values in D.* checkpoint not written.*last good checkpoint: none"):
        train(make_config(**{**tiny[0], "run_name": "nanweights", "resume": False}), assets=tiny[1],
              callbacks=[PoisonLastStep()], progress=False)
    assert not list((Path(tiny[0]["out_dir"]) / "nanweights" / "checkpoints").glob("*.pt"))


def test_a_rebuilt_dataset_gets_new_cached_encoders(tmp_path):
    kw = dict(data_dir=str(tmp_path / "sb"), n_test=8, pretrain_epochs=1, device="cpu", loss="none", batch_size=4)
    a = prepare_assets(make_config(n_train=24, **kw)).info
    b = prepare_assets(make_config(n_train=28, **kw)).info
    assert a["data_fingerprint"] != b["data_fingerprint"]
    assert a["damsm"]["text"] != b["damsm"]["text"] and a["evaluator"]["weights"] != b["evaluator"]["weights"]


def test_batch_larger_than_the_dataset_fails_before_writing(tiny, tmp_path):
    base, assets = tiny
    with pytest.raises(ValueError, match="batch_size 64 is larger than the 48 training images"):
        train(make_config(**{**base, "batch_size": 64, "n_train": 100, "run_name": "big"}), assets=assets, progress=False)
    assert not (Path(base["out_dir"]) / "big" / "metrics.json").exists()


# ---------------------------------------------------------------- unclear errors become clear
@pytest.mark.parametrize("kw,msg", [
    (dict(resume="false"), None),                              # papermill string: accepted as False
    (dict(resume="perhaps"), "parameter resume must be true or false"),
    (dict(seed=1.5), "parameter seed must be an integer, got 1.5"),
    (dict(seed=-1), "seed must be >= 0, got -1"),
    (dict(ngf=0), "ngf must be >= 1, got 0"),
    (dict(n_eval=-5), "n_eval must be >= 0, got -5"),
    (dict(lr_d=0.0), "lr_d must be > 0"),
    (dict(lambdas="{'lambda_f2f': 1}"), "parameter lambdas is not valid JSON"),
    (dict(lambdas="[1, 2]"), "parameter lambdas must be a dict"),
])
def test_parameters_are_typed_and_ranged_up_front(kw, msg):
    if msg is None: assert make_config(**kw).resume is False
    else:
        with pytest.raises((TypeError, ValueError), match=msg.replace("(", r"\(")): make_config(**kw)


def test_truncated_and_empty_pickles_are_named(tmp_path):
    root = write_fixture(tmp_path / "cub")
    TextImageDataset(root, "train")
    p = root / "captions.pickle"
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(UntrustedFileError, match="captions.pickle is truncated or corrupt"): TextImageDataset(root, "train")
    (root / "test" / "filenames.pickle").write_bytes(b"")
    with pytest.raises(UntrustedFileError, match="test/filenames.pickle is empty"): TextImageDataset(root, "test")


def test_caption_ids_beyond_the_vocabulary_are_named(tmp_path):
    root = write_fixture(tmp_path / "cub")
    ds = TextImageDataset(root, "train")
    with open(root / "captions.pickle", "rb") as f: train_c, test_c, i2w, w2i = pickle.load(f)
    train_c[13] = [1, len(i2w) + 4]
    with open(root / "captions.pickle", "wb") as f: pickle.dump([train_c, test_c, i2w, w2i], f, protocol=2)
    with pytest.raises(DataCheckError, match=f"caption 3 of {ds.keys[1]} has id {len(i2w) + 4}"): TextImageDataset(root, "train")


def test_preflight_names_every_bad_image_before_training(tmp_path):
    root = write_fixture(tmp_path / "cub", n_train=6)
    ds = TextImageDataset(root, "train")
    bad = [ds.image_path(ds.keys[i]) for i in (1, 4)]
    bad[0].write_bytes(bad[0].read_bytes()[:100]); bad[1].unlink()
    with pytest.raises(DataCheckError, match="2 of 6 train images") as e: preflight(ds, progress=False)
    assert all(str(p) in str(e.value) for p in bad)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 4112, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert np.asarray(load_image(tmp_path / "g16.png"))[0, :, 1].tolist() == [0, 16, 255]
