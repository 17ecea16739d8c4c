"Pretrained assets on CUB-format data: the re-captioning model is pretrained once into the dataset's cache, then read."
import os

import pytest
import torch

import t2i_nb.captioner as captioner_mod
from t2i_nb.assets import _captioner
from t2i_nb.config import make_config
from t2i_nb.data import TextImageDataset, dataset_fingerprint, write_fixture


def test_cub_captioner_is_pretrained_once_then_read_from_the_cache(tmp_path, monkeypatch):
    root = write_fixture(tmp_path / "birds", "cub", n_train=8, n_test=4)
    cfg = make_config("cub", data_dir=str(root), loss="f2f_r2f_cap", pretrain_epochs=1, img_size=64, device="cpu")
    train = TextImageDataset(root, "train", img_size=64)       # (writes captions.pickle, as AttnGAN's loader does)
    before = {p.relative_to(root) for p in root.rglob("*")}
    cap, path = _captioner(cfg, train, "cpu", dataset_fingerprint(root))
    assert path.startswith(str(root / "t2i_cache" / "captioner")) and path.endswith("captioner.pth")
    assert not any(p.requires_grad for p in cap.parameters())                 # frozen, ready for the G step
    new = {p.relative_to(root) for p in root.rglob("*")} - before
    assert all(p.parts[0] == "t2i_cache" for p in new)                          # nothing of the dataset's touched
    monkeypatch.setattr(captioner_mod, "pretrain_captioner",
                        lambda *a, **k: pytest.fail("the cached captioner was pretrained again"))
    again, path2 = _captioner(cfg, train, "cpu", dataset_fingerprint(root))
    assert path2 == path and torch.equal(next(again.parameters()), next(cap.parameters()))


def _cpus_or_skip():
    from t2i_nb.core import allowed_cpus
    cpus = allowed_cpus()
    if len(cpus) < 2: pytest.skip("a helper pinned to its own core needs two CPUs")
    return cpus


def test_synthbirds_networks_are_pretrained_two_at_a_time_then_only_read(tmp_path, monkeypatch):
    "Two pinned one-thread builders share the networks by cost; every core is given back; later builds only read."
    from t2i_nb.assets import _build_pair, _plan_builds, _synth_recipes, prepare_assets
    from t2i_nb.cache import is_cached
    from t2i_nb.synthbirds import make_synth_birds
    import t2i_nb.damsm as damsm_mod, t2i_nb.evaluator as evaluator_mod, t2i_nb.retrieval as retrieval_mod
    cpus = _cpus_or_skip()
    cfg = make_config(data_dir=str(tmp_path / "sb"), n_train=24, n_test=8, batch_size=8, pretrain_epochs=1,
                      device="cpu", check_data=False)
    make_synth_birds(cfg.data_dir, cfg.n_train, cfg.n_test, img_size=cfg.img_size, progress=False)
    fp, cpu = dataset_fingerprint(cfg.data_dir), torch.device("cpu")
    recipes = _synth_recipes(cfg, cfg.n_train, "cpu")
    cached = lambda: {n: is_cached(tmp_path / "sb" / "t2i_cache", k, c, fp) for n, (k, c, _) in recipes.items()}
    assert not any(cached().values())
    every = list(recipes)                                                # the recipes' order, as _missing lists them
    assert _plan_builds(cfg, cfg.n_train, cpu, fp, workers=1) == ("sequence", every)      # forced sequential
    assert _plan_builds(cfg, cfg.n_train, cpu, fp) == ("sequence", every)                 # a small build
    plan, names = _plan_builds(cfg, cfg.n_train, cpu, fp, workers=2)
    assert plan == "pair" and sorted(names) == sorted(every)
    import t2i_nb.assets as assets_mod
    real, here = assets_mod._synth_asset, []
    def watched(*a, **k): here.append((a[1], os.sched_getaffinity(0))); return real(*a, **k)
    monkeypatch.setattr(assets_mod, "_synth_asset", watched)            # this process's share (the helper is spawned)
    helper = _build_pair(cfg, names, cfg.n_train, fp, cpus)
    monkeypatch.setattr(assets_mod, "_synth_asset", real)
    assert sorted(n for n, _ in here) == ["damsm", "evaluator"] and all(a == set(cpus[:-1]) for _, a in here)
    assert sorted(helper) == ["eval_damsm", "retrieval"]                 # the helper process's share
    assert all(cached().values())                                        # every network built, by one process or the other
    assert os.sched_getaffinity(0) == set(cpus)                          # this process has every core back
    for mod, fn in ((damsm_mod, "pretrain_damsm"), (evaluator_mod, "train_evaluator"), (retrieval_mod, "train_retrieval")):
        monkeypatch.setattr(mod, fn, lambda *a, **k: pytest.fail("a cached network was pretrained again"))
    assert _plan_builds(cfg, cfg.n_train, cpu, fp, workers=2) == ("sequence", [])        # nothing missing
    a = prepare_assets(cfg, "cpu", workers=2)                            # reads what the two processes wrote
    assert a.eval_text_enc is not None and a.indep_text_enc is not None and a.evaluator is not None


def test_prepare_assets_sets_the_threads_training_would_beside_a_busy_machine(tmp_path, monkeypatch):
    "The training notebook prepares assets before `train`: their pretraining must not spin two threads on a busy machine."
    import t2i_nb.core as core
    from t2i_nb.assets import prepare_assets
    cfg = make_config(data_dir=str(tmp_path / "sb"), n_train=24, n_test=8, batch_size=8, pretrain_epochs=1,
                      device="cpu", check_data=False)
    seen, orig = [], torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    every_core = lambda interval=0.25: float(os.cpu_count() or 1) + 1.0                             # every core taken
    monkeypatch.setattr(core, "busy_cores", every_core)
    import t2i_nb.assets as assets_mod, t2i_nb.damsm as damsm_mod
    monkeypatch.setattr(assets_mod, "busy_cores", every_core)
    real = damsm_mod.pretrain_damsm
    monkeypatch.setattr(damsm_mod, "pretrain_damsm", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    try:
        torch.set_num_threads(2)
        prepare_assets(cfg, "cpu")
        assert seen and set(seen) == {1}                   # both DAMSM pairs pretrained with one thread
        torch.set_num_threads(2)
        prepare_assets(make_config(**{**cfg.__dict__, "threads": 2}), "cpu")   # an explicit count wins (all cached now)
        assert torch.get_num_threads() == 2
    finally: torch.set_num_threads(orig)


def test_busy_machine_pretrains_the_evaluation_networks_in_a_pinned_helper(tmp_path, monkeypatch):
    "background=True returns with the training pair; the helper holds one core, this process the others, until ready()."
    import t2i_nb.damsm as damsm_mod, t2i_nb.evaluator as evaluator_mod, t2i_nb.retrieval as retrieval_mod
    from t2i_nb.assets import _synth_asset, prepare_assets
    from t2i_nb.synthbirds import make_synth_birds
    cpus = _cpus_or_skip()
    cfg = make_config(data_dir=str(tmp_path / "sb"), n_train=24, n_test=8, batch_size=8, pretrain_epochs=1,
                      device="cpu", check_data=False, threads=1)
    make_synth_birds(cfg.data_dir, cfg.n_train, cfg.n_test, img_size=cfg.img_size, progress=False)
    _synth_asset(cfg, "damsm", cfg.n_train, torch.device("cpu"), dataset_fingerprint(cfg.data_dir))   # training pair first
    a = prepare_assets(cfg, "cpu", workers=2, background=True)
    helper = a.pending[0]
    alive = helper.proc.is_alive()                    # spawning and importing torch alone take seconds
    mine = os.sched_getaffinity(0)
    assert a.info["pending"] == ["eval_damsm", "evaluator", "retrieval"] and "in the background" in repr(a)
    assert a.evaluator is None and a.eval_text_enc is None and a.indep_text_enc is None and a.info["evaluator"] is None
    assert a.text_enc is not None and a.info["damsm"]
    assert mine == set(cpus[:-1]) or not alive        # pinned away from the helper's core while it runs
    assert a.ready() is a and a.pending is None and helper.proc.exitcode == 0
    assert os.sched_getaffinity(0) == set(cpus)       # every core back
    assert a.evaluator is not None and a.eval_text_enc is not None and a.indep_text_enc is not None
    assert "pending" not in a.info and a.info["evaluator"]["weights"] and a.info["indep_pair"]["pair"]
    for mod, fn in ((damsm_mod, "pretrain_damsm"), (evaluator_mod, "train_evaluator"), (retrieval_mod, "train_retrieval")):
        monkeypatch.setattr(mod, fn, lambda *a, **k: pytest.fail("a network the helper built was pretrained again"))
    b = prepare_assets(cfg, "cpu")                    # the foreground build reads what the helper wrote
    assert b.info == a.info and b.pending is None
    for x, y in ((a.evaluator, b.evaluator), (a.eval_img_enc, b.eval_img_enc), (a.indep_text_enc, b.indep_text_enc)):
        assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))


def test_train_waits_for_the_background_networks_and_describes_them(tmp_path, monkeypatch):
    "A run whose evaluation networks were pretrained beside training evaluates with them and names them in config.json."
    import json
    import t2i_nb.assets as assets_mod
    from t2i_nb.train import train
    from conftest import tiny_run_settings
    cpus = _cpus_or_skip()
    real_plan, real_helper, started = assets_mod._plan_builds, assets_mod._Background, []
    def forced(cfg, n, device, fp, workers=None, busy=None, background=False, cpus=None):   # as on a busy machine
        return real_plan(cfg, n, device, fp, 2, busy, background, cpus)                    # (tiny builds stay here)
    class Helper(real_helper):
        def __init__(self, *a): super().__init__(*a); started.append(self)
    monkeypatch.setattr(assets_mod, "_plan_builds", forced)
    monkeypatch.setattr(assets_mod, "_Background", Helper)
    run_dir = train(make_config(**tiny_run_settings(tmp_path, n_eval=16, threads=1)), progress=False)
    assert len(started) == 1 and started[0].proc.exitcode == 0
    described = json.loads((run_dir / "config.json").read_text())["assets"]
    assert "pending" not in described and described["evaluator"]["weights"] and described["indep_pair"]["pair"]
    assert described["eval_damsm"]["text"] != described["damsm"]["text"]
    names = {r["metric"] for r in json.loads((run_dir / "metrics.json").read_text())}
    assert {"semantic_acc_sb", "rprec_100_heldout", "rprec_100_indep"} <= names
    assert os.sched_getaffinity(0) == set(cpus)


def test_the_helper_pins_itself_to_its_core(tmp_path):
    "The background helper runs on the last allowed core only: Linux cannot stack it on training's core."
    import subprocess, sys
    cpus = _cpus_or_skip()
    code = ("import os; from t2i_nb.assets import _build_synth; "
            f"_build_synth(None, [], 0, 'k', 1, [{cpus[-1]}]); print(sorted(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.split("\n")[0] == f"[{cpus[-1]}]"


def test_ready_builds_what_the_helper_left(tmp_path, monkeypatch):
    "A helper that died before building anything: ready() builds the networks here, warns, and loads them."
    import t2i_nb.assets as assets_mod
    from t2i_nb.assets import prepare_assets
    _cpus_or_skip()
    class Died:                                        # stands in for the helper process: exit code 1, nothing built
        def __init__(self, cfg, names, n_train, data_key, cpus): self.names = list(names)
        def wait(self): return 1
    monkeypatch.setattr(assets_mod, "_Background", Died)
    cfg = make_config(data_dir=str(tmp_path / "sb"), n_train=24, n_test=8, batch_size=8, pretrain_epochs=1,
                      device="cpu", check_data=False, threads=1)
    a = prepare_assets(cfg, "cpu", workers=2, background=True)
    assert isinstance(a.pending[0], Died) and a.evaluator is None
    with pytest.warns(UserWarning, match="exited with code 1: this process built what it left"): a.ready()
    assert a.evaluator is not None and a.eval_text_enc is not None and a.indep_text_enc is not None
