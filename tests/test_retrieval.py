"The independent retrieval pair: its loss is the formula, it never sees the dataset's images, it learns, and rprec_100_indep reaches finished runs."
import json, shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from t2i_nb.assets import prepare_assets
from t2i_nb.config import make_config
from t2i_nb.retrieval import (ConvTextEncoder, RetrievalConfig, info_nce, load_retrieval, train_retrieval,
                              vocab_map)
from t2i_nb.synthbirds import make_synth_birds
from t2i_nb.train import evaluate_run, read_metrics, train

from conftest import tiny_run_settings


def test_info_nce_is_the_symmetric_formula_without_same_class_negatives():
    g = torch.Generator().manual_seed(3)
    v, e = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    cls, tau = [2, 0, 2, 1, 0, 3, 2], 0.1
    vn, en = F.normalize(v, dim=1).double(), F.normalize(e, dim=1).double()
    total = 0.0
    for a, b in ((vn, en), (en, vn)):
        for i in range(7):
            den = sum(np.exp(float(a[i] @ b[j]) / tau) for j in range(7) if j == i or cls[j] != cls[i])
            total += -np.log(np.exp(float(a[i] @ b[i]) / tau) / den)
    got = info_nce(v, e, cls, torch.tensor(np.log(1 / tau)))
    assert float(got) == pytest.approx(total / 14, rel=1e-5)
    # with every row of its own class it is CLIP's loss
    clip = (F.cross_entropy(vn @ en.T / tau, torch.arange(7)) + F.cross_entropy(en @ vn.T / tau, torch.arange(7))) / 2
    assert float(info_nce(v, e, list(range(7)), torch.tensor(np.log(1 / tau)))) == pytest.approx(float(clip), rel=1e-5)


def test_a_captions_vector_does_not_depend_on_its_batchs_padding():
    t = ConvTextEncoder(30).eval()
    caps = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    alone = torch.cat([t(caps[:1], [4])[1], t(caps[1:, :2], [2])[1]])
    padded = t(torch.cat([caps, torch.zeros(2, 9, dtype=torch.long)], 1), [4, 2])[1]
    assert torch.allclose(t(caps, [4, 2])[1], alone, atol=1e-6) and torch.allclose(padded, alone, atol=1e-6)


def test_vocab_map_translates_ids_by_word_and_names_missing_words():
    lut, missing = vocab_map({0: "<end>", 1: "red", 2: "crown", 3: "puce"}, {"<end>": 0, "crown": 7, "red": 4})
    assert lut.tolist() == [0, 4, 7, 0] and missing == ["puce"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = make_synth_birds(tmp_path_factory.mktemp("sbr"), n_train=200, n_test=100, progress=False)
    out = tmp_path_factory.mktemp("pair")
    cfg = RetrievalConfig(n_images=600, epochs=15, width=16, batch_size=32)
    return root, out, cfg, train_retrieval(root, cfg, out_dir=out, progress=False)


def test_the_pair_sees_no_image_of_the_dataset_and_refuses_its_seed(pair):
    root, out, _, _ = pair
    own = {p.read_bytes() for p in (root / "CUB_200_2011/images").rglob("*.jpg")}
    new = {p.read_bytes() for p in (out / "birds/CUB_200_2011/images").rglob("*.jpg")}
    assert len(new) == 600 and not own & new
    with pytest.raises(ValueError, match="draw_seed=0"): train_retrieval(root, RetrievalConfig(draw_seed=0))
    with pytest.raises(ValueError, match="synthbirds.json"):
        train_retrieval(out / "nowhere", RetrievalConfig())


def test_the_pair_retrieves_the_datasets_real_captions_far_above_chance(pair):
    root, out, _, (T, I, rep) = pair
    assert rep["words_not_in_dataset_vocab"] == []
    r = rep["real_rprec"]
    assert r["n"] == 100 and r["value"] > 0.15, r                 # chance: 1 in 100
    T2, I2, rep2 = load_retrieval(out, n_words=T.n_words)
    assert rep2 == rep and all(torch.equal(a, b) for a, b in zip(T.state_dict().values(), T2.state_dict().values()))
    with pytest.raises(ValueError, match="vocabulary"): load_retrieval(out, n_words=T.n_words + 1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ri")
    kw = tiny_run_settings(root, epochs=1, n_eval=40, loss="none", run_name="r")
    run_dir = train(make_config(**kw), progress=False)
    return kw, run_dir, prepare_assets(make_config(**kw))


def test_runs_report_the_independent_pair_beside_the_held_out_damsm(run):
    _, run_dir, assets = run
    res = {r["metric"]: r for r in read_metrics(run_dir)}
    ind, held = res["rprec_100_indep"], res["rprec_100_heldout"]
    assert ind["extractor"] == "independent pair (held-out)" and held["extractor"] == "DAMSM encoders (held-out)"
    assert Path(ind["pair_encoder"]) == Path(assets.info["indep_pair"]["pair"]) and len(ind["pair_encoder_hash"]) == 16
    assert ind["protocol_shuffled_folds"] and ind["n_fake"] == held["n_fake"] == 40


def test_evaluate_run_adds_one_metric_to_a_finished_run_and_keeps_the_others(run, tmp_path):
    _, run_dir, assets = run
    d = tmp_path / "copy"; shutil.copytree(run_dir, d)
    before = read_metrics(d)
    old = [r for r in before if r["metric"] != "rprec_100_indep"]          # a run finished before the metric existed
    (d / "metrics.json").write_text(json.dumps(old))
    evaluate_run(d, metrics=["rprec_100_indep"], assets=assets)
    after = read_metrics(d)
    assert after[:len(old)] == old and [r["metric"] for r in after[len(old):]] == ["rprec_100_indep"]
    added, orig = after[-1], next(r for r in before if r["metric"] == "rprec_100_indep")
    assert added.keys() == orig.keys() and added["value"] == pytest.approx(orig["value"], abs=1e-9)
    assert {k: v for k, v in added.items() if k not in ("value", "std")} == \
           {k: v for k, v in orig.items() if k not in ("value", "std")}   # fields, epoch and step as training wrote
    with pytest.raises(ValueError, match="not in this dataset's protocol"):
        evaluate_run(d, metrics=["fid_clean_30k_test"], assets=assets)
    (d / "metrics.json").write_text(json.dumps([dict(r, step=999) for r in old]))
    with pytest.raises(ValueError, match="metrics.json holds results of step"):
        evaluate_run(d, metrics=["rprec_100_indep"], assets=assets)
