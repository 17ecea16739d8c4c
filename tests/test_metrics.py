"Metrics: Fréchet distance, IS and R-precision against independent references; one pass vs two passes; protocol records."
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import linalg

from t2i_nb.metrics import (INCEPTION_FILE, INCEPTION_URL, METRICS, InceptionFeatures, RPrecisionExtractor,
                            compute_metrics, get_metric, compute_reference_stats, feature_stats,
                            find_inception_weights, fold_stats, frechet_distance, inception_score, make_fake_inception,
                            r_precision, run_pass, to_uint8, write_metrics_json, is_inception_name)
from t2i_nb.core import UnknownNameError
from t2i_nb.data import sample_words


def sqrtm_fid(mu1, s1, mu2, s2):
    "The textbook formula with scipy's sqrtm (what pytorch-fid / clean-fid compute)."
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))


@pytest.mark.parametrize("D", [2, 16, 64])
def test_frechet_matches_sqrtm_reference(D):
    rng = np.random.default_rng(D)
    A, B = rng.normal(size=(D, D)), rng.normal(size=(D, D))
    s1, s2 = A @ A.T / D + 0.05 * np.eye(D), B @ B.T / D + 0.05 * np.eye(D)
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    ref = sqrtm_fid(mu1, s1, mu2, s2)
    assert abs(frechet_distance(mu1, s1, mu2, s2) - ref) <= 1e-6 * abs(ref)
    assert abs(frechet_distance(mu2, s2, mu1, s1) - ref) <= 1e-6 * abs(ref)   # symmetric
    assert frechet_distance(mu1, s1, mu1, s1) <= 1e-9 * np.trace(s1)          # identical statistics -> 0


def test_frechet_sample_statistics_and_singular_covariances():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 40)), rng.normal(size=(500, 40)) * 1.5 + 0.2
    (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
    assert abs(frechet_distance(m1, s1, m2, s2) - sqrtm_fid(m1, s1, m2, s2)) <= 1e-6 * sqrtm_fid(m1, s1, m2, s2)
    z = rng.normal(size=(20, 40))                                                 # N < D: singular covariance
    mz, sz = feature_stats(z)
    ref = sqrtm_fid(m2, s2, mz, sz)
    assert abs(frechet_distance(mz, sz, m2, s2) - ref) <= 1e-6 * ref
    assert frechet_distance(mz, sz, mz, sz) <= 1e-9 * np.trace(sz)
    np.testing.assert_allclose(feature_stats(x)[1], np.cov(x.T), rtol=1e-12)


def test_inception_score_textbook():
    assert inception_score(np.full((50, 9), 1 / 9), splits=5)[0] == pytest.approx(1.0, abs=1e-12)
    mean, std = inception_score(np.tile(np.eye(7), (3, 1)), splits=3)
    assert mean == pytest.approx(7.0, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.full(5, 0.5), size=40)
    scores = []
    for part in np.split(p, 4):                                                   # plain-loop reference
        py = part.mean(0)
        scores.append(np.exp(np.mean([sum(q[k] * np.log(q[k] / py[k]) for k in range(5)) for q in part])))
    assert inception_score(p, splits=4) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
    with pytest.raises(ValueError, match="N >= splits"): inception_score(p[:3], splits=10)


def test_r_precision_equals_plain_loop_and_is_one_when_matching():
    rng = np.random.default_rng(2)
    img, cand = rng.normal(size=(60, 12)), rng.normal(size=(60, 100, 12))
    cand[::3, 0] = img[::3] + 0.1 * rng.normal(size=(20, 12))                     # some true captions close
    hits = []
    for i in range(60):
        cos = [cand[i, k] @ img[i] / np.linalg.norm(cand[i, k]) / np.linalg.norm(img[i]) for k in range(100)]
        hits.append(float(np.argmax(cos) == 0 and sum(c == max(cos) for c in cos) == 1))
    folds = [np.mean(hits[i:i + 6]) for i in range(0, 60, 6)]
    assert r_precision(img, cand, folds=10, seed=None) == pytest.approx((np.mean(folds), np.std(folds)), abs=1e-12)
    sh = np.asarray(hits)[np.random.default_rng(5).permutation(60)]                # DM-GAN: shuffled, then folds
    folds = [sh[i:i + 6].mean() for i in range(0, 60, 6)]
    assert r_precision(img, cand, folds=10, seed=5) == pytest.approx((np.mean(folds), np.std(folds)), abs=1e-12)
    cand[:, 0] = 2 * img
    assert r_precision(img, cand) == (1.0, 0.0)
    with pytest.raises(ValueError, match="N×K×D"): r_precision(img, cand[:, :, :5])


class _BagText(nn.Module):
    def __init__(self):
        super().__init__(); self.emb = nn.Embedding(40, 16)
    def forward(self, caps, lens): return None, self.emb(caps).sum(1)


class _CodeInPixels(nn.Module):
    def forward(self, img): return None, img[:, 0, 0, :16]


def test_shuffled_folds_give_the_sampling_std_on_class_grouped_hits():
    "Hits in class order (as CUB's test split): consecutive folds measure how classes differ, shuffled ones the noise."
    rng = np.random.default_rng(1)
    p_class = rng.uniform(0.05, 0.95, 50)
    hits = (rng.random((50, 60)) < p_class[:, None]).astype(float).ravel()       # 3,000 hits, 50 classes of 60: CUB-like
    p = hits.mean(); sampling = np.sqrt(p * (1 - p) / 300)                      # std of a mean of 300 hits
    consecutive = fold_stats(hits, 10)[1]
    shuffled = np.mean([fold_stats(hits, 10, seed=s)[1] for s in range(100)])
    assert consecutive > 3 * sampling, (consecutive, sampling)
    assert shuffled == pytest.approx(sampling, rel=0.15), (shuffled, sampling)
    assert fold_stats(hits, 10, seed=3) == fold_stats(hits, 10, seed=3)         # a fixed seed: reproducible


class _LongerIsCloser(nn.Module):
    "Text encoder whose sentence vector is the sum of word vectors u + noise: more words, closer to u."
    def __init__(self, d=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.u, self.noise = torch.randn(d, generator=g), torch.randn(60, d, generator=g)
    def forward(self, caps, lens):
        on = (caps != 0).float()[..., None]
        return None, ((self.u + self.noise[caps]) * on).sum(1)


def test_true_caption_is_cut_like_the_distractors():
    "Long captions, words_num 4: whole, the true caption (more words) wins by length alone; cut alike, it does not."
    g = np.random.default_rng(0)
    txt = _LongerIsCloser()
    caps = torch.from_numpy(g.integers(1, 60, (300, 20)))
    lens, cls = torch.full((300,), 20), np.arange(300) // 3
    pool = [sample_words(c.numpy(), 4, g) for c in caps]
    pool_caps, pool_lens = torch.from_numpy(np.stack([c for c, _ in pool])), torch.tensor([n for _, n in pool])

    def batches():                                   # every "fake" has the code u: it matches no caption in particular
        for s in range(0, 300, 50):
            img = torch.zeros(50, 3, 16, 16); img[:, 0, 0] = txt.u
            yield dict(img=img, caption=caps[s:s + 50], cap_len=lens[s:s + 50], class_id=torch.as_tensor(cls[s:s + 50]))
    rate = lambda **kw: compute_metrics(["rprec_100_heldout"], batches, {"rprec": RPrecisionExtractor(
        txt, _CodeInPixels(), pool_caps, pool_lens, cls, **kw)})[0]
    whole, cut = rate(), rate(words_num=4)
    assert whole["value"] > 0.5 and cut["value"] < 0.1, (whole["value"], cut["value"])   # 0.70 vs 0.017
    assert cut["words_num"] == 4 and cut["protocol_shuffled_folds"] is True
    ex = RPrecisionExtractor(txt, _CodeInPixels(), pool_caps, pool_lens, cls, words_num=4)
    c, n = ex.true_captions(caps[:4], lens[:4], np.random.default_rng(0))
    assert n.tolist() == [4] * 4 and all(set(r[:4].tolist()) <= set(o.tolist()) for r, o in zip(c, caps[:4]))


def test_rprec_extractor_uses_other_class_candidates_and_records_heldout():
    torch.manual_seed(0)
    txt = _BagText()
    caps, lens, cls = torch.randint(1, 40, (150, 5)), torch.full((150,), 5), np.arange(150) // 10
    ex = RPrecisionExtractor(txt, _CodeInPixels(), caps, lens, cls, heldout=False)

    def batches():
        for s in range(0, 100, 25):
            img = torch.zeros(25, 3, 16, 16); img[:, 0, 0] = txt(caps[s:s + 25], None)[1]
            yield dict(img=img, caption=caps[s:s + 25], cap_len=lens[s:s + 25], class_id=torch.as_tensor(cls[s:s + 25]))
    res = compute_metrics(["rprec_100_train"], batches, {"rprec": ex})[0]
    assert res["value"] == 1.0 and res["n_fake"] == 100 and res["heldout"] is False and res["pool_size"] == 150
    with pytest.raises(ValueError, match="heldout=True"): compute_metrics(["rprec_100_heldout"], batches, {"rprec": ex})


def _images(n, bs, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    for s in range(0, n, bs): yield dict(img=(torch.rand(min(bs, n - s), 3, 24, 24, generator=g) * 2 - 1 + shift).clamp(-1, 1))


@pytest.fixture(scope="module")
def fake_inception(tmp_path_factory):
    return make_fake_inception(tmp_path_factory.mktemp("inc") / INCEPTION_FILE)


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_one_pass_fid_is_equals_two_separate_passes(fake_inception, tmp_path, mode):
    "Our single forward vs clean-fid's own feature wrapper (FID pass) + the module's softmax forward (IS pass)."
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer
    inc = InceptionFeatures(fake_inception, mode=mode)
    ref = compute_reference_stats(lambda: _images(80, 40, seed=1), inc, "noise", "test", tmp_path)
    one = compute_metrics([f"fid_{mode}_50_test", is_inception_name(mode, 50)], lambda: _images(50, 25, seed=2, shift=0.2),
                          {"inception": inc}, refs={"inception": ref})
    cf = InceptionV3W(str(fake_inception.parent), download=False, resize_inside=(mode == "legacy_tensorflow")).eval()
    net, resize = torch.jit.load(str(fake_inception)).eval(), build_resizer(mode)

    def cleanfid_input(img):
        u8 = to_uint8(img).permute(0, 2, 3, 1).numpy()
        if mode == "legacy_tensorflow": return torch.from_numpy(u8).permute(0, 3, 1, 2).float()
        return torch.from_numpy(np.stack([resize(a) for a in u8])).permute(0, 3, 1, 2)
    with torch.no_grad():
        real = np.concatenate([cf(cleanfid_input(b["img"])).numpy() for b in _images(80, 40, seed=1)])
        fake = np.concatenate([cf(cleanfid_input(b["img"])).numpy() for b in _images(50, 25, seed=2, shift=0.2)])   # pass 1: FID
        probs = np.concatenate([net(cleanfid_input(b["img"]), no_output_bias=True).numpy()                              # pass 2: IS
                                for b in _images(50, 25, seed=2, shift=0.2)])
    fid2 = frechet_distance(*feature_stats(fake), *feature_stats(real))
    is2 = inception_score(probs, 10)
    assert one[0]["value"] == pytest.approx(fid2, rel=1e-4) and one[0]["value"] > 0
    assert (one[1]["value"], one[1]["std"]) == pytest.approx(is2, rel=1e-4) and one[1]["value"] > 1.0
    for r in one:
        assert r["n_fake"] == 50 and r["resize"] == mode and len(r["weights_hash"]) == 16 and r["seed"] == 0
    assert one[0]["n_real"] == 80 and one[0]["reference"] == "noise/test"


def test_missing_weights_error_names_file_url_and_place(tmp_path):
    with pytest.raises(FileNotFoundError) as e: InceptionFeatures(tmp_path)
    msg = str(e.value)
    assert INCEPTION_FILE in msg and INCEPTION_URL in msg and str(tmp_path / INCEPTION_FILE) in msg and "never downloads" in msg
    with pytest.raises(FileNotFoundError, match="clean-fid's cache"): find_inception_weights(tmp_path / "nowhere.pt")


def test_protocol_mismatch_and_unknown_names_are_errors(fake_inception, tmp_path):
    inc = InceptionFeatures(fake_inception, mode="clean")
    ref = compute_reference_stats(lambda: _images(30, 30, seed=1), inc, "noise", "train", tmp_path)
    with pytest.raises(ValueError, match="split 'test'"):
        compute_metrics(["fid_clean_120_test"], lambda: _images(120, 60, seed=2), {"inception": inc}, refs={"inception": ref})
    with pytest.raises(KeyError, match="valid metrics"): METRICS["fid50k"]
    with pytest.raises(KeyError, match="or a name matching"): get_metric("fid_bicubic_30k_test")
    assert get_metric("fid_legacy_tensorflow_2500_test").n == 2500 and get_metric("is_inception_7k").n == 7000
    assert get_metric("is_inception_legacy_tensorflow_7k").protocol == dict(resize="legacy_tensorflow", splits=10)
    with pytest.raises(UnknownNameError): get_metric("fid_legacy_pytorch_2500_test")          # removed: not clean-fid's
    with pytest.raises(ValueError, match="need extractors"): compute_metrics(["is_inception_120"], None, {})


def test_reference_stats_are_cached_assets(fake_inception, tmp_path):
    "One cached_asset folder per (dataset, split, protocol, data key); the second call reads it without a pass."
    inc = InceptionFeatures(fake_inception, mode="clean")
    ref = compute_reference_stats(lambda: _images(30, 30, seed=1), inc, "noise", "test", tmp_path, data_key="data-a")
    folder = Path(ref["path"]).parent
    assert Path(ref["path"]).name == "stats.npz" and folder.name.startswith("stats_noise_test_inception-")
    meta = json.loads((folder / "asset.json").read_text())
    assert meta["data"] == "data-a" and meta["config"]["resize"] == "clean" and ref["data"] == "data-a"
    assert compute_reference_stats(None, inc, "noise", "test", tmp_path, data_key="data-a")["path"] == ref["path"]
    other = compute_reference_stats(lambda: _images(30, 30, seed=1), inc, "noise", "test", tmp_path, data_key="data-b")
    assert Path(other["path"]).parent != folder and np.allclose(other["mu"], ref["mu"])


def test_unknown_metric_error_says_where_synthbirds_metrics_come_from():
    with pytest.raises(KeyError, match="registered by importing t2i_nb.evaluator"): METRICS["semantic_acc_sbx"]


def test_results_are_flat_json(tmp_path):
    class Const:                         # a minimal extractor: the interface is name/setup/__call__/info
        name = "c"
        def setup(self, device): pass
        def __call__(self, b): return dict(probs=torch.eye(4)[torch.arange(len(b["img"])) % 4])
        def info(self): return dict(extractor="const", weights_hash=np.str_("abc"), resize="clean")
    res = compute_metrics(["is_inception_120"], lambda: _images(120, 40, seed=0), {"inception": Const()}, seed=7)
    assert res[0]["value"] == pytest.approx(4.0) and res[0]["seed"] == 7
    p = write_metrics_json(res, tmp_path / "m.json")
    assert json.loads(p.read_text()) == res
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in res[0].values())
    out = run_pass(lambda: _images(10, 4, seed=0), {"c": Const()}, n=6)
    assert out["c"]["probs"].shape == (6, 4)
    assert fold_stats(np.ones(10), 5) == (1.0, 0.0)
