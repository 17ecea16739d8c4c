"Tests of t2i_nb.losses (NT-Xent, F2F, R2F, presets, generator objective) and the re-captioning loss."
import math

import pytest
import torch

from t2i_nb.captioner import Captioner, CaptionerConfig, caption_loss, freeze, recaption_loss
from t2i_nb.damsm import damsm_loss
from t2i_nb.encoders import SmallImageEncoder, TextEncoder
from t2i_nb.losses import (LOSS_PRESETS, WEIGHTS, LossConfig, ProjectionHead, f2f_loss, generate, generator_inputs,
                           generator_objective, loss_config, nt_xent, r2f_loss)
from t2i_nb.ssagan import SSADiscriminator, SSAGenerator


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny models: one torch thread is faster, and far faster on a shared, busy CPU."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def nt_xent_loop(z1, z2, tau):
    "Eq. 1-2 written out: a Python loop over the 2N rows and the k != i denominators."
    u, n = torch.cat([z1, z2]), len(z1)
    sim = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        den = sum(math.exp(sim(u[i], u[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim(u[i], u[j]) / tau) / den)
    return total / (2 * n)


# ---------------------------------------------------------------- NT-Xent
@pytest.mark.parametrize("n,d,tau", [(1, 3, 0.5), (2, 5, 0.5), (4, 8, 0.1), (7, 16, 1.0), (16, 4, 2.0)])
def test_nt_xent_equals_loop(n, d, tau):
    g = torch.Generator().manual_seed(n * 31 + d)
    a, b = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2))
    assert nt_xent(a, b, tau).item() == pytest.approx(nt_xent_loop(a, b, tau), rel=1e-10, abs=1e-12)


def test_nt_xent_symmetric_and_scale_invariant():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    assert torch.allclose(nt_xent(a, b), nt_xent(b, a), atol=1e-6)
    assert torch.allclose(nt_xent(a, b), nt_xent(3 * a, 0.5 * b), atol=1e-5)   # cosine similarity


@pytest.mark.parametrize("n,tau", [(2, 0.5), (5, 0.5), (5, 0.2)])
def test_nt_xent_minimal_when_pairs_coincide_and_others_orthogonal(n, tau):
    e = torch.eye(n, 3 * n, dtype=torch.float64)
    best = nt_xent(e, e, tau).item()
    assert best == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / tau)), rel=1e-10)
    # turning each z1_i away from its pair (staying orthogonal to every other row) only increases the loss
    far = torch.eye(n, 3 * n, dtype=torch.float64).roll(2 * n, 1)            # e_{2n+i}: orthogonal to all rows of e
    losses = [nt_xent(math.cos(a) * e + math.sin(a) * far, e, tau).item() for a in (0.0, 0.2, 0.5, 1.0, 1.5)]
    assert losses[0] == pytest.approx(best) and all(x < y for x, y in zip(losses, losses[1:]))
    g = torch.Generator().manual_seed(n)
    for _ in range(10):   # random pairs in a high dimension are worse too
        assert nt_xent(torch.randn(n, 64, generator=g, dtype=torch.float64), torch.randn(n, 64, generator=g, dtype=torch.float64), tau) > best
    assert nt_xent(e, e.roll(1, 0), tau) > best                               # mismatched pairs


def test_nt_xent_errors_and_projection():
    with pytest.raises(ValueError, match="same shape"): nt_xent(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="tau must be"): nt_xent(torch.randn(3, 4), torch.randn(3, 4), tau=float("nan"))
    head = ProjectionHead(4, 8, 2)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(nt_xent(a, b, projection=head), nt_xent(head(a), head(b)))


# ---------------------------------------------------------------- F2F / R2F
@pytest.fixture(scope="module")
def image_encoder():
    torch.manual_seed(0)
    return freeze(SmallImageEncoder(nef=32, ndf=8, img_size=32))


def test_f2f_identical_fakes_lower_than_unrelated(image_encoder):
    g = torch.Generator().manual_seed(2)
    x, y = (torch.rand(8, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    same, other = f2f_loss(image_encoder, x, x), f2f_loss(image_encoder, x, y)
    assert same < other
    codes = image_encoder(x)[1]
    assert torch.allclose(same, nt_xent(codes, codes), atol=1e-5)


def test_r2f_gradients_reach_fakes_only(image_encoder):
    g = torch.Generator().manual_seed(3)
    fake = (torch.rand(6, 3, 32, 32, generator=g) * 2 - 1).requires_grad_()
    real = (torch.rand(6, 3, 32, 32, generator=g) * 2 - 1).requires_grad_()
    loss = r2f_loss(image_encoder, fake, real)
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert real.grad is None
    assert all(p.grad is None for p in image_encoder.parameters())
    assert loss.item() == pytest.approx(nt_xent(image_encoder(fake)[1], image_encoder(real)[1]).item(), rel=1e-5)


# ---------------------------------------------------------------- re-captioning
@pytest.fixture(scope="module")
def trained_captioner(tmp_path_factory):
    "A tiny captioner trained for a few seconds on a small SynthBirds, frozen; and a batch of real test items."
    from t2i_nb.data import TextImageDataset, epoch_loader
    from t2i_nb.synthbirds import make_synth_birds
    root = make_synth_birds(tmp_path_factory.mktemp("sb") / "sb", n_train=192, n_test=32, img_size=64, seed=0, progress=False)
    torch.manual_seed(0)
    ds = TextImageDataset(root, "train", img_size=32, augment=False, cache_images=True)
    model = Captioner(ds.n_words, CaptionerConfig(img_size=32, channels=8, feat_dim=32, embed_dim=16, hidden_dim=32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for ep in range(10):
        for b in epoch_loader(ds, 32, epoch=ep):
            loss = caption_loss(model(b["img"], b["caption"]), b["caption"], b["cap_len"])
            opt.zero_grad(); loss.backward(); opt.step()
    test = TextImageDataset(root, "test", img_size=32, augment=False)
    return freeze(model), next(iter(epoch_loader(test, 32, shuffle=False)))


def test_recaption_loss_lower_on_real_image_than_noise(trained_captioner):
    model, b = trained_captioner
    real = recaption_loss(model, b["img"], b["caption"], b["cap_len"])
    noise = recaption_loss(model, torch.rand_like(b["img"]) * 2 - 1, b["caption"], b["cap_len"])
    assert real < noise


def test_recaption_loss_differentiable_wrt_fake_only(trained_captioner):
    model, b = trained_captioner
    fake = b["img"].clone().requires_grad_()
    recaption_loss(model, fake, b["caption"], b["cap_len"]).backward()
    assert fake.grad.abs().sum() > 0 and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="frozen captioner"):
        recaption_loss(Captioner(model.n_words, model.cfg), fake, b["caption"], b["cap_len"])


# ---------------------------------------------------------------- presets and the objective
def test_loss_presets_and_errors():
    assert set(LOSS_PRESETS) == {"none", "f2f", "two_cap", "r2f", "f2f_r2f", "f2f_r2f_cap"}
    p = {k: loss_config(k) for k in LOSS_PRESETS}
    assert all(c.lambda_damsm == 0.05 and c.tau == 0.5 for c in p.values())
    assert (p["f2f_r2f_cap"].lambda_r2f, p["f2f_r2f_cap"].lambda_f2f, p["f2f_r2f_cap"].lambda_cap) == (0.2, 0.2, 1.0)
    assert loss_config("r2f", lambda_r2f=0.5, tau=0.1) == LossConfig(lambda_r2f=0.5, tau=0.1)
    with pytest.raises(KeyError, match="unknown loss preset 'f2f_r2f_recap'; valid loss presets: f2f, f2f_r2f"):
        loss_config("f2f_r2f_recap")
    with pytest.raises(ValueError, match=r"LossConfig.lambda_r2f must be a finite number >= 0, got -1"): loss_config("r2f", lambda_r2f=-1)
    with pytest.raises(ValueError, match=r"LossConfig.lambda_damsm .* got nan"): loss_config("none", lambda_damsm=float("nan"))
    with pytest.raises(ValueError, match=r"unknown LossConfig field\(s\) lambda_f2r"): loss_config("none", lambda_f2r=0.2)


N, NZ, S, NW = 4, 8, 16, 20


def toy():
    torch.manual_seed(0)
    G, D = SSAGenerator(ngf=4, nz=NZ, img_size=S, cond_dim=32), SSADiscriminator(ndf=4, img_size=S, cond_dim=32)
    txt = TextEncoder(NW, ninput=16, nhidden=32).eval()
    img = freeze(SmallImageEncoder(nef=32, ndf=4, img_size=S))
    cap = freeze(Captioner(NW, CaptionerConfig(img_size=16, channels=4, feat_dim=16, embed_dim=8, hidden_dim=16)))
    L = 6
    lens, lens2 = torch.tensor([6, 3, 2, 5]), torch.tensor([4, 6, 2, 3])
    ids = lambda l: torch.randint(1, NW, (N, L)) * (torch.arange(L)[None] < l[:, None])
    batch = dict(img=torch.rand(N, 3, S, S) * 2 - 1, caption=ids(lens), cap_len=lens, caption2=ids(lens2)[:, :5],
                 cap_len2=lens2.clamp(max=5), class_id=torch.tensor([1, 2, 1, 3]))
    return G, D, txt, img, cap, batch


def hook_calls(*mods):
    calls = [[] for _ in mods]
    for m, c in zip(mods, calls): m.register_forward_hook(lambda mod, a, out, c=c: c.append(len(a[0])))
    return calls


@pytest.mark.parametrize("preset", ["none", "f2f", "r2f", "f2f_r2f", "f2f_r2f_cap"])
def test_presets_turn_on_exactly_their_terms(preset):
    cfg = loss_config(preset)
    G, D, txt, img, cap, batch = toy()
    cG, cTxt, cImg, cCap = hook_calls(G, txt, img, cap)
    inp = generator_inputs(txt, batch, cfg, torch.randn(N, NZ))
    fakes = generate(G, inp)
    t = generator_objective(D, fakes, inp, cfg, img_encoder=img, real_imgs=batch["img"], captioner=cap)
    on = {k for k, w in WEIGHTS.items() if getattr(cfg, w) > 0}
    assert set(t) == {"adv", "total"} | on
    rows = 2 * N if "f2f" in on else N
    assert cG == [rows] and cTxt == [rows]                 # ONE generator call (2N rows with F2F), one text call
    assert cImg == [rows] + ([N] if "r2f" in on else [])   # fakes once, reals only for R2F
    assert cCap == ([rows] if "cap" in on else [])
    if "f2f" in on: assert torch.equal(inp["noise"][:N], inp["noise"][N:])   # same noise for both captions
    ref = t["adv"] + sum(getattr(cfg, WEIGHTS[k]) * t[k] for k in on)
    assert torch.allclose(t["total"], ref)
    t["total"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())
    assert all(p.grad is None for p in list(img.parameters()) + list(cap.parameters()) + list(txt.parameters()))


def test_objective_terms_match_the_standalone_losses():
    cfg = loss_config("f2f_r2f_cap", lambda_damsm=5.0)
    G, D, txt, img, cap, batch = toy()
    inp = generator_inputs(txt, batch, cfg, torch.randn(N, NZ))
    fakes = generate(G, inp).detach()
    t = generator_objective(D, fakes, inp, cfg, img_encoder=img, real_imgs=batch["img"], captioner=cap)
    f1, f2 = fakes[:N], fakes[N:]
    assert torch.allclose(t["f2f"], f2f_loss(img, f1, f2, cfg.tau), atol=1e-6)
    assert torch.allclose(t["r2f"], (r2f_loss(img, f1, batch["img"]) + r2f_loss(img, f2, batch["img"])) / 2, atol=1e-6)
    feats, code = img(fakes)
    with torch.no_grad(): words, sent = txt(inp["captions"], inp["cap_lens"])
    d = damsm_loss(feats, code, words, sent, inp["cap_lens"], batch["class_id"].repeat(2), 5.0, 5.0, 10.0)["total"]
    assert torch.allclose(t["damsm"], d, atol=1e-5)
    assert torch.allclose(t["adv"], -D.cond_logits(D(fakes), sent).mean(), atol=1e-6)
    assert torch.allclose(t["cap"], recaption_loss(cap, fakes, inp["captions"], inp["cap_lens"]), atol=1e-6)


def test_zero_lambdas_do_no_work_and_missing_parts_are_named():
    G, D, txt, img, cap, batch = toy()
    cImg, cCap = hook_calls(img, cap)
    cfg = loss_config("none", lambda_damsm=0.0)
    batch_one = {k: v for k, v in batch.items() if k not in ("caption2", "cap_len2")}   # F2F off: caption2 never read
    inp = generator_inputs(txt, batch_one, cfg, torch.randn(N, NZ))
    t = generator_objective(D, generate(G, inp), inp, cfg, img_encoder=None, real_imgs=None, captioner=None)
    assert set(t) == {"adv", "total"} and cImg == [] and cCap == []
    cfg = loss_config("f2f_r2f_cap")
    inp = generator_inputs(txt, batch, cfg, torch.randn(N, NZ))
    fakes = generate(G, inp)
    with pytest.raises(ValueError, match="lambda_cap=1.0 needs `captioner`"):
        generator_objective(D, fakes, inp, cfg, img_encoder=img, real_imgs=batch["img"])
    with pytest.raises(ValueError, match="lambda_r2f=0.2 needs `real_imgs`"):
        generator_objective(D, fakes, inp, cfg, img_encoder=img, captioner=cap)
    with pytest.raises(ValueError, match="4 fakes for 8 sentence rows"):
        generator_objective(D, fakes[:N], inp, cfg, img_encoder=img, real_imgs=batch["img"], captioner=cap)
