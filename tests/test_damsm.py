"DAMSM loss vs a straightforward loop, same-class masking, NT-Xent, lr schedule, a tiny pretraining run."
import json
import math
from dataclasses import replace

import pytest
import torch

from t2i_nb.damsm import (DAMSM_PRESETS, _nt_xent, damsm_loss, damsm_lr, damsm_paths, load_damsm, pretrain_damsm,
                          retrieval_top1, sent_loss, words_loss)
from t2i_nb.data import VocabMismatchError, write_fixture
from t2i_nb.encoders import SmallImageEncoder, TextEncoder


def ref_damsm(feat, code, words, sent, lens, class_ids, g1, g2, g3):
    "AttnGAN's losses written out one caption and one image at a time, with plain Python sums."
    B, D = code.shape
    regions = feat.reshape(B, D, -1)
    R = regions.shape[2]
    wsim = torch.zeros(B, B, dtype=torch.float64)       # [image j, caption i]
    ssim = torch.zeros(B, B, dtype=torch.float64)
    for i in range(B):
        n = int(lens[i])
        for j in range(B):
            total = 0.0
            for t in range(n):
                e = words[i, :, t].double()
                # softmax over the words of caption i, for every region r
                a = torch.zeros(R, dtype=torch.float64)
                for r in range(R):
                    v = regions[j, :, r].double()
                    scores = torch.stack([words[i, :, u].double() @ v for u in range(n)])
                    a[r] = math.exp(scores[t]) / float(torch.exp(scores).sum())
                alpha = torch.exp(g1 * a) / torch.exp(g1 * a).sum()          # softmax over regions
                c = sum(alpha[r] * regions[j, :, r].double() for r in range(R))
                cos = float(e @ c) / max(float(e.norm() * c.norm()), 1e-8)
                total += math.exp(g2 * cos)
            wsim[j, i] = g3 * math.log(total)
            ssim[j, i] = g3 * float(code[j].double() @ sent[i].double()) / max(float(code[j].norm() * sent[i].norm()), 1e-8)

    def ce(m):   # mean over rows of -log softmax at the diagonal, same-class off-diagonal columns dropped
        out = []
        for a in range(B):
            cols = [b for b in range(B) if b == a or class_ids is None or class_ids[b] != class_ids[a]]
            out.append(-(m[a, a] - torch.logsumexp(m[a, cols], 0)))
        return float(sum(out) / B)
    return dict(w0=ce(wsim), w1=ce(wsim.t()), s0=ce(ssim), s1=ce(ssim.t()))


@pytest.mark.parametrize("hw,gammas,class_ids", [((2, 2), (4.0, 5.0, 10.0), None),          # R < D: Gram path
                                                  ((3, 3), (5.0, 5.0, 10.0), [0, 1, 0, 2]),  # R > D: context path
                                                  ((2, 3), (4.0, 5.0, 10.0), [3, 3, 1, 1])])
def test_damsm_loss_matches_loop(hw, gammas, class_ids):
    torch.manual_seed(1)
    B, D, T = 4, 8, 5
    lens = torch.tensor([5, 2, 1, 4])
    words = torch.randn(B, D, T) * (torch.arange(T)[None, None] < lens[:, None, None])
    sent, code, feat = torch.randn(B, D), torch.randn(B, D), torch.randn(B, D, *hw)
    cls = None if class_ids is None else torch.tensor(class_ids)
    got = damsm_loss(feat, code, words, sent, lens, cls, *gammas)
    ref = ref_damsm(feat, code, words, sent, lens, class_ids, *gammas)
    for k in ("w0", "w1", "s0", "s1"):
        assert got[k].item() == pytest.approx(ref[k], rel=1e-4, abs=1e-5), k
    assert got["total"].item() == pytest.approx(sum(ref.values()), rel=1e-4)


def test_padding_content_is_ignored():
    "Whatever sits at padded word positions does not change the loss."
    torch.manual_seed(2)
    B, D, T = 3, 8, 6
    lens = torch.tensor([6, 2, 3])
    words, feat = torch.randn(B, D, T), torch.randn(B, D, 4, 4)
    w2 = words.clone(); w2[1, :, 2:] = 100.0; w2[2, :, 3:] = -7.0
    a, b = words_loss(feat, words, lens), words_loss(feat, w2, lens)
    torch.testing.assert_close(torch.stack(a), torch.stack(b))


def test_same_class_masking_changes_exactly_the_affected_rows():
    torch.manual_seed(3)
    B, D = 6, 8
    code, sent = torch.randn(B, D), torch.randn(B, D)
    cls = torch.tensor([0, 1, 2, 0, 3, 4])     # only images 0 and 3 share a class
    sim = 10 * torch.nn.functional.cosine_similarity(code[:, None], sent[None], dim=2)
    plain = torch.nn.functional.cross_entropy(sim, torch.arange(B), reduction="none")
    masked = plain.clone()
    for a, other in ((0, 3), (3, 0)):          # the row with the shared-class column removed
        keep = [b for b in range(B) if b != other]
        masked[a] = -(sim[a, a] - torch.logsumexp(sim[a, keep], 0))
    assert (masked[[0, 3]] < plain[[0, 3]]).all()
    s0, s1 = sent_loss(code, sent, cls)
    assert s0.item() == pytest.approx(masked.mean().item(), rel=1e-5)
    # all classes distinct == no class ids
    torch.testing.assert_close(torch.stack(sent_loss(code, sent, torch.arange(B))), torch.stack(sent_loss(code, sent, None)))
    # every image of one class: only the diagonal remains, the loss is zero
    assert sent_loss(code, sent, torch.zeros(B, dtype=torch.long))[0].item() == pytest.approx(0.0, abs=1e-6)


def test_nt_xent_matches_simclr_loop():
    torch.manual_seed(4)
    z1, z2, tau = torch.randn(5, 6), torch.randn(5, 6), 0.5
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n, total = 10, 0.0
    for a in range(n):
        pos = (a + 5) % n
        denom = sum(math.exp(float(z[a] @ z[b]) / tau) for b in range(n) if b != a)
        total += -(float(z[a] @ z[pos]) / tau - math.log(denom))
    assert _nt_xent(z1, z2, tau).item() == pytest.approx(total / n, rel=1e-5)


def test_lr_schedule_matches_official_rule():
    cfg = DAMSM_PRESETS["cub"]
    lr, official = cfg.lr, []
    for epoch in range(200):                   # pretrain_DAMSM.py: decay after each epoch while lr > lr0/10
        official.append(lr)
        if lr > cfg.lr / 10: lr *= 0.98
    assert [damsm_lr(cfg, e) for e in range(200)] == pytest.approx(official)


def test_retrieval_top1_uses_other_class_candidates():
    codes = torch.eye(4).repeat(3, 1)[:10]          # images of the same class (= same code) share a direction
    cls = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    sents = codes[:, None].repeat(1, 2, 1)
    # same-class captions would tie with the true one; drawn only from other classes, the true caption always wins
    assert retrieval_top1(codes, sents, cls, n_candidates=5) == 1.0


def test_pretrain_tiny_run_writes_loadable_official_checkpoints(tmp_path):
    root = write_fixture(tmp_path / "birds", "cub", n_train=8, n_test=4)
    cfg = replace(DAMSM_PRESETS["synth_birds_cl"], epochs=1, batch_size=4, image_encoder_kwargs=dict(ndf=8),
                  retrieval_candidates=3)
    res = pretrain_damsm(cfg, root, tmp_path / "run", progress=False)
    h = res["history"][0]
    assert {"w0", "w1", "s0", "s1", "cl", "total", "test_total", "test_top1_batch"} <= set(h)
    assert all(math.isfinite(v) for v in h.values())
    assert 0.0 <= res["test_top1_100"] <= 1.0
    sd = torch.load(tmp_path / "run" / "text_encoder.pth", weights_only=True)
    assert type(sd) is dict and "encoder.weight" in sd and not any(k.startswith("module.") for k in sd)
    t = TextEncoder(res["n_words"]); t.load_state_dict(sd, strict=True)
    s = SmallImageEncoder(ndf=8); s.load_state_dict(torch.load(tmp_path / "run" / "image_encoder.pth", weights_only=True), strict=True)
    te, ie = load_damsm(tmp_path / "run" / "text_encoder.pth", n_words=res["n_words"])
    torch.testing.assert_close(te.encoder.weight, t.encoder.weight)
    with pytest.raises(VocabMismatchError):
        load_damsm(tmp_path / "run", n_words=res["n_words"] + 1)
    info = json.loads((tmp_path / "run" / "damsm.json").read_text())
    assert info["config"]["contrastive"] is True and len(info["history"]) == 1
    assert pretrain_damsm(cfg, root, tmp_path / "run", progress=False)["reused"]


def test_damsm_paths_follow_official_naming(tmp_path):
    t, i = damsm_paths(tmp_path / "DAMSMencoders/bird/text_encoder200.pth")
    assert i.name == "image_encoder200.pth" and i.parent == t.parent
    with pytest.raises(ValueError, match="text_encoder"):
        damsm_paths(tmp_path / "image_encoder200.pth")


def test_zero_length_caption_is_finite():
    torch.manual_seed(5)
    B, D, T = 3, 8, 4
    feat, code, words, sent = torch.randn(B, D, 2, 2), torch.randn(B, D), torch.randn(B, D, T), torch.randn(B, D)
    out = damsm_loss(feat, code, words, sent, torch.tensor([0, 4, 2]))
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["w0"], damsm_loss(feat, code, words, sent, torch.tensor([1, 4, 2]))["w0"])
