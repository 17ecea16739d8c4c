"Tests of t2i_nb.ssagan: official sizes and keys, checkpoint loading, shapes, SSCBN, MA-GP, hinge terms, steps."
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from t2i_nb.core import NonFiniteLossError
from t2i_nb.data import mismatch_index
from t2i_nb.ssagan import (PRESETS, SSABlock, SSADiscriminator, SSAGANConfig, SSAGenerator, SSCBN, d_step,
                           g_step, hinge_d_loss, load_official_discriminator, load_official_generator, ma_gp,
                           magp_step, make_models, make_optimizers, n_params, train_step)

OFFICIAL_G_PARAMS, OFFICIAL_D_PARAMS, DEAD_CONV_S = 29_494_273, 80_379_526, 2_099_200


def official_g_keys():
    "Key list of the official NetG(64) written out from the reference description (not from our model)."
    bn = ["running_mean", "running_var", "num_batches_tracked"]
    mask = lambda p: [f"{p}.0.weight", f"{p}.0.bias", *(f"{p}.1.{n}" for n in ["weight", "bias"] + bn),
                      f"{p}.3.weight", f"{p}.3.bias"]
    keys = ["fc.weight", "fc.bias", *mask("conv_mask"), *(f"conv_img.0.{n}" for n in ["weight", "bias"] + bn),
            "conv_img.2.weight", "conv_img.2.bias"]
    chans = [(512, 512)] * 4 + [(512, 256), (256, 128), (128, 64)]
    for k, (i, o) in enumerate(chans):
        b = f"block{k}"
        keys += [f"{b}.gamma", *(f"{b}.{c}.{w}" for c in ("c1", "c2") for w in ("weight", "bias"))]
        if i != o: keys += [f"{b}.c_sc.weight", f"{b}.c_sc.bias"]
        for a in ("affine0", "affine2"):
            keys += [f"{b}.{a}.batch_norm2d.{n}" for n in bn]
            keys += [f"{b}.{a}.{f}.{l}.{w}" for f in ("fc_gamma", "fc_beta") for l in ("linear1", "linear2") for w in ("weight", "bias")]
        if k < 6: keys += mask(f"{b}.conv_mask")
    return set(keys)


def official_d_state_dict(D):
    "What an official netD checkpoint of the same size looks like: `module.` keys plus the unused conv_s."
    sd = {f"module.{k}": v.clone() for k, v in D.state_dict().items()}
    for k in range(D.n_blocks):
        blk = getattr(D, f"block{k}")
        if blk.conv_s is None:
            c = blk.conv_r[0].out_channels
            sd[f"module.block{k}.conv_s.weight"], sd[f"module.block{k}.conv_s.bias"] = torch.randn(c, c, 1, 1), torch.randn(c)
    return sd


def test_generator_official_size_keys_and_strict_load():
    torch.manual_seed(0)
    G = SSAGenerator()
    assert n_params(G) == OFFICIAL_G_PARAMS
    assert set(G.state_dict()) == official_g_keys()
    with torch.no_grad():
        for p in G.parameters(): p.add_(torch.randn_like(p) * 0.01)
    sd = {f"module.{k}": v for k, v in G.state_dict().items()}
    G2, rep = load_official_generator(sd)
    assert rep["config"] == dict(ngf=64, nz=100, img_size=256, cond_dim=256) and rep["set_aside"] == []
    for k, v in G.state_dict().items(): assert torch.equal(G2.state_dict()[k], v), k


def test_discriminator_official_size_and_load_with_dead_convs():
    torch.manual_seed(0)
    D = SSADiscriminator()
    assert n_params(D) == OFFICIAL_D_PARAMS - DEAD_CONV_S
    sd = official_d_state_dict(D)
    assert sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked")) == OFFICIAL_D_PARAMS
    D2, rep = load_official_discriminator(sd)
    assert rep["set_aside"] == sorted(f"block{b}.conv_s.{w}" for b in (4, 5) for w in ("weight", "bias"))
    assert rep["set_aside_params"] == DEAD_CONV_S
    assert rep["config"] == dict(ndf=64, img_size=256, cond_dim=256)
    for k, v in D.state_dict().items(): assert torch.equal(D2.state_dict()[k], v), k
    assert [k for k in D.state_dict() if k.startswith("COND_DNET")] == ["COND_DNET.joint_conv.0.weight", "COND_DNET.joint_conv.2.weight"]


def test_load_from_file_prefix_errors_and_old_bn(tmp_path):
    torch.manual_seed(0)
    G, D = SSAGenerator(ngf=8, img_size=64), SSADiscriminator(ndf=8, img_size=128)
    torch.save({f"module.{k}": v for k, v in G.state_dict().items()}, tmp_path / "netG_600.pth")
    torch.save(official_d_state_dict(D), tmp_path / "netD_600.pth")
    G2, rg = load_official_generator(tmp_path / "netG_600.pth")
    D2, rd = load_official_discriminator(str(tmp_path / "netD_600.pth"))
    assert (G2.ngf, G2.img_size, D2.ndf, D2.img_size) == (8, 64, 8, 128)
    assert rg["source"].endswith("netG_600.pth") and rd["set_aside"] == ["block4.conv_s.bias", "block4.conv_s.weight"]
    G.eval(); G2.eval(); z, s = torch.randn(2, 100), torch.randn(2, 256)
    assert torch.equal(G(z, s)[0], G2(z, s)[0])
    # our own (unprefixed) state dicts load too; missing BN counters (old PyTorch) are filled and reported
    sd = {k: v for k, v in G.state_dict().items() if not k.endswith("num_batches_tracked")}
    _, rep = load_official_generator(sd)
    assert len(rep["filled"]) == sum(k.endswith("num_batches_tracked") for k in G.state_dict()) > 0
    bad = dict(G.state_dict()); del bad["block1.c1.weight"]
    with pytest.raises(KeyError, match=r"missing \['block1.c1.weight'\]"): load_official_generator(bad)
    with pytest.raises(ValueError, match="size mismatch"): load_official_generator(G.state_dict(), cond_dim=128)


@pytest.mark.parametrize("R", [64, 128, 256])
def test_shapes_and_masks(R):
    torch.manual_seed(0)
    G, D = SSAGenerator(ngf=4, img_size=R), SSADiscriminator(ndf=4, img_size=R)
    img, masks = G(torch.randn(2, 100), torch.randn(2, 256))
    assert img.shape == (2, 3, R, R) and img.abs().max() <= 1
    assert [tuple(m.shape) for m in masks] == [(2, 1, 4 * 2 ** k, 4 * 2 ** k) for k in range(len(masks))]
    assert masks[-1].shape[-1] == R and all(m.min() >= 0 and m.max() <= 1 for m in masks)
    f = D(img)
    assert f.shape == (2, 64, 4, 4) and D.cond_logits(f, torch.randn(2, 256)).shape == (2,)


def test_gates_closed_at_init_so_sentence_has_no_effect():
    torch.manual_seed(0)
    G, D = SSAGenerator(ngf=4, img_size=32), SSADiscriminator(ndf=4, img_size=32)
    assert all(b.gamma.item() == 0 for b in G.blocks) and all(getattr(D, f"block{k}").gamma.item() == 0 for k in range(D.n_blocks))
    G.eval(); z = torch.randn(3, 100)
    assert torch.equal(G(z, torch.randn(3, 256))[0], G(z, torch.randn(3, 256))[0])


def test_sscbn_is_plain_bn_at_init_for_any_mask():
    torch.manual_seed(0)
    x, s = torch.randn(5, 7, 6, 6) * 2 + 3, torch.randn(5, 256)
    m = SSCBN(7); ref = torch.nn.BatchNorm2d(7, affine=False)
    for mask in (torch.rand(5, 1, 6, 6), torch.zeros(5, 1, 6, 6), torch.ones(5, 1, 6, 6)):
        torch.testing.assert_close(m(x, s, mask), ref(x))
    m.eval(); ref.eval()
    torch.testing.assert_close(m(x, s, torch.rand(5, 1, 6, 6)), ref(x))
    # with non-zero MLP outputs: (1 + m·γ)·BN(x) + m·β, written out directly
    with torch.no_grad():
        for p in list(m.fc_gamma.linear2.parameters()) + list(m.fc_beta.linear2.parameters()): p.normal_()
    mask = torch.rand(5, 1, 6, 6)
    g, b = m.fc_gamma(s)[:, :, None, None], m.fc_beta(s)[:, :, None, None]
    torch.testing.assert_close(m(x, s, mask), (1 + mask * g) * ref(x) + mask * b)


def _tiny_D(seed=0):
    torch.manual_seed(seed)
    D = SSADiscriminator(ndf=2, img_size=16)
    with torch.no_grad():
        for k in range(D.n_blocks): getattr(D, f"block{k}").gamma.fill_(0.7)
    return D


def test_ma_gp_equals_per_sample_autograd_loop():
    D = _tiny_D()
    x, s = torch.randn(3, 3, 16, 16), torch.randn(3, 256)
    gp = ma_gp(D, x, s)
    norms = []
    for i in range(3):   # independent reference: one sample at a time, sqrt of the summed squares, then ^6
        xi, si = x[i:i + 1].clone().requires_grad_(), s[i:i + 1].clone().requires_grad_()
        out = D.COND_DNET(D(xi), si).reshape(())
        gx, gs = torch.autograd.grad(out, (xi, si), create_graph=True)
        norms.append(torch.sqrt((gx ** 2).sum() + (gs ** 2).sum()))
    ref = 2.0 * torch.stack(norms).pow(6).mean()
    torch.testing.assert_close(gp, ref, rtol=1e-4, atol=1e-6)
    g1 = torch.autograd.grad(gp, D.conv_img.weight)[0]
    g2 = torch.autograd.grad(ref, D.conv_img.weight)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(ma_gp(D, x, s, k=1., p=2.), torch.stack(norms).pow(2).mean().detach(), rtol=1e-4, atol=1e-7)


def test_hinge_terms_on_hand_made_logits():
    t = hinge_d_loss(torch.tensor([1.5, 0.2, -1.]), torch.tensor([-3., 0.5, -0.5]), torch.tensor([2., -2., 0.]))
    assert t["real"].item() == pytest.approx((0 + 0.8 + 2.) / 3)
    assert t["fake"].item() == pytest.approx((0 + 1.5 + 0.5) / 3)
    assert t["mis"].item() == pytest.approx((3. + 0 + 1.) / 3)
    assert t["total"].item() == pytest.approx(2.8 / 3 + (2. / 3 + 4. / 3) / 2)


def test_d_step_terms_magp_fold_and_update():
    D, cfg = _tiny_D(), SSAGANConfig(ngf=2, ndf=2, img_size=16, channels_last=False)
    G = SSAGenerator(ngf=2, img_size=16)
    optD = torch.optim.SGD(D.parameters(), lr=0.0)   # lr 0: D unchanged, terms comparable
    real, sent = torch.rand(4, 3, 16, 16) * 2 - 1, torch.randn(4, 256)
    mis = sent[mismatch_index(torch.tensor([3, 3, 5, 5]))]
    noise = torch.randn(4, 100)
    G.eval()
    with torch.no_grad(): fake = G(noise, sent)[0]
    ref = hinge_d_loss(D.cond_logits(D(real), sent), D.cond_logits(D(fake), sent), D.cond_logits(D(real), mis))
    t = d_step(G, D, optD, real, sent, mis, noise, cfg)
    assert t["d_loss"] == pytest.approx(ref["total"].item(), rel=1e-5) and t["d_mis"] == pytest.approx(ref["mis"].item(), rel=1e-5)
    tf = d_step(G, D, optD, real, sent, mis, noise, replace(cfg, fold_magp=True))
    assert tf["magp"] == pytest.approx(ma_gp(D, real, sent).item(), rel=1e-4)
    assert magp_step(D, optD, real, sent, cfg)["magp"] == pytest.approx(tf["magp"], rel=1e-4)
    with pytest.raises(NonFiniteLossError, match="SSA-GAN D step"):
        d_step(G, D, optD, real * float("nan"), sent, mis, noise, cfg)


def test_train_step_updates_both_and_channels_last_is_same_maths():
    cfg = SSAGANConfig(ngf=4, ndf=4, img_size=16, batch_size=4)
    real, sent = torch.rand(4, 3, 16, 16) * 2 - 1, torch.randn(4, 256)
    mis, noise = sent[mismatch_index(torch.arange(4))], torch.randn(4, 100)
    out = []
    for cl in (False, True):
        torch.manual_seed(0)
        c = replace(cfg, channels_last=cl)
        G, D = make_models(c)
        # SGD, not Adam: Adam's first step is sign(grad) * lr, which turns float-rounding differences of near-zero
        # gradients (the two memory formats run different conv kernels) into lr-sized weight differences.
        oG, oD = torch.optim.SGD(G.parameters(), lr=1e-3), torch.optim.SGD(D.parameters(), lr=1e-3)
        g0, d0 = G.fc.weight.clone(), D.conv_img.weight.clone()
        extra = lambda fake: dict(total=0.5 * fake.mean(), mean=fake.mean())
        t = train_step(G, D, oG, oD, real, sent, mis, c, noise=noise, extra_loss_fn=extra)
        assert not torch.equal(G.fc.weight, g0) and not torch.equal(D.conv_img.weight, d0)
        assert t["g_loss"] == pytest.approx(t["g_adv"] + 0.5 * t["g_mean"], rel=1e-5)
        out.append(t)
    for k in out[0]: assert out[0][k] == pytest.approx(out[1][k], rel=1e-3, abs=1e-5), k
    oD.zero_grad(set_to_none=True)
    g_step(G, D, oG, sent, noise, cfg)
    assert all(p.grad is None and p.requires_grad for p in D.parameters())


def test_presets_and_size_errors():
    assert (PRESETS["paper_256"].ngf, PRESETS["paper_256"].ndf, PRESETS["paper_256"].batch_size) == (64, 64, 24)
    assert PRESETS["paper_256"].lr_g == 1e-4 and PRESETS["paper_256"].lr_d == 4e-4 and PRESETS["paper_256"].betas == (0.0, 0.9)
    assert PRESETS["synth_birds_64"].img_size == 64
    with pytest.raises(ValueError, match="power of two >= 16 \\(got 96\\)"): SSAGenerator(ngf=4, img_size=96)
    with pytest.raises(ValueError, match="images: expected shape B×3×32×32"): SSADiscriminator(ndf=4, img_size=32)(torch.randn(1, 3, 64, 64))
