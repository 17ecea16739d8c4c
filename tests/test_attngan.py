"Tests of t2i_nb.attngan: official sizes and keys, checkpoint loading, word attention, losses, shapes, KL, init."
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from t2i_nb.attngan import (PRESETS, AttnGANConfig, AttnGANDiscriminator, AttnGANGenerator, GlobalAttentionGeneral,
                            d_loss_stage, discriminator_loss, discriminator_probs, ema_update, g_adv_loss,
                            generator_adv_loss, kl_loss, load_official_attngan_discriminator,
                            load_official_attngan_generator, make_attngan, make_attngan_optimizers)
from t2i_nb.ssagan import n_params

BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def padding(lens, T):
    "B×T bool, True at the padding words (official `captions == 0`)."
    return torch.arange(T)[None] >= torch.tensor(lens)[:, None]


def official_g_keys(r_num=2, branch_num=3, n_up=4):
    "State-dict keys of the official G_NET, written out from the reference description (not from our model)."
    keys = ["ca_net.fc.weight", "ca_net.fc.bias", "h_net1.fc.0.weight", *(f"h_net1.fc.1.{n}" for n in BN)]
    for k in range(1, n_up + 1): keys += [f"h_net1.upsample{k}.1.weight", *(f"h_net1.upsample{k}.2.{n}" for n in BN)]
    for s in range(1, branch_num + 1): keys.append(f"img_net{s}.img.0.weight")
    for s in range(2, branch_num + 1):
        keys += [f"h_net{s}.att.conv_context.weight", f"h_net{s}.upsample.1.weight"]
        keys += [f"h_net{s}.upsample.2.{n}" for n in BN]
        for r in range(r_num):
            keys += [f"h_net{s}.residual.{r}.block.{i}.weight" for i in (0, 3)]
            keys += [f"h_net{s}.residual.{r}.block.{i}.{n}" for i in (1, 4) for n in BN]
    return set(keys)


def official_d_keys(img_size):
    "State-dict keys of the official D_NET64/128/256."
    keys = ["img_code_s16.0.weight", *(f"img_code_s16.{i}.weight" for i in (2, 5, 8)),
            *(f"img_code_s16.{i}.{n}" for i in (3, 6, 9) for n in BN),
            "UNCOND_DNET.outlogits.0.weight", "UNCOND_DNET.outlogits.0.bias", "COND_DNET.outlogits.0.weight",
            "COND_DNET.outlogits.0.bias", "COND_DNET.jointConv.0.weight", *(f"COND_DNET.jointConv.1.{n}" for n in BN)]
    extra = {64: [], 128: ["img_code_s32", "img_code_s32_1"],
             256: ["img_code_s32", "img_code_s64", "img_code_s64_1", "img_code_s64_2"]}[img_size]
    for m in extra: keys += [f"{m}.0.weight", *(f"{m}.1.{n}" for n in BN)]
    return set(keys)


def test_official_parameter_counts_and_keys():
    with torch.device("meta"):
        G_cub, G_coco = AttnGANGenerator(ngf=32, r_num=2), AttnGANGenerator(ngf=48, r_num=3)
        Ds = {R: AttnGANDiscriminator(ndf=64, img_size=R) for R in (64, 128, 256)}
        Ds_coco = [AttnGANDiscriminator(ndf=96, img_size=R) for R in (64, 128, 256)]
    assert n_params(G_cub) == 7_084_592
    assert n_params(G_coco) == 13_811_456
    assert [n_params(Ds[R]) for R in (64, 128, 256)] == [6_313_730, 19_424_002, 71_858_946]
    assert round(sum(n_params(D) for D in Ds_coco) / 1e6, 1) == 216.9
    assert set(G_cub.state_dict()) == official_g_keys(2)
    assert set(G_coco.state_dict()) == official_g_keys(3)
    for R, D in Ds.items(): assert set(D.state_dict()) == official_d_keys(R), R
    assert tuple(G_cub.state_dict()["h_net1.fc.0.weight"].shape) == (16384, 200)
    assert tuple(Ds[256].state_dict()["img_code_s64.0.weight"].shape) == (2048, 1024, 4, 4)


def test_generator_checkpoint_with_module_prefix_loads_strictly(tmp_path):
    torch.manual_seed(0)
    G = AttnGANGenerator(ngf=4, base_size=16)
    with torch.no_grad():
        for p in G.parameters(): p.add_(torch.randn_like(p) * 0.1)
        for m in G.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm): m.running_mean.normal_(); m.running_var.uniform_(0.5, 2)
    path = tmp_path / "netG_epoch_600.pth"
    torch.save({f"module.{k}": v for k, v in G.state_dict().items()}, path)
    G2 = load_official_attngan_generator(path, ngf=4, r_num=2, base_size=16)
    assert not G2.training
    for k, v in G.state_dict().items(): assert torch.equal(G2.state_dict()[k], v), k
    G.eval()
    args = (torch.randn(3, 100), torch.randn(3, 256), torch.randn(3, 256, 6), padding([6, 4, 2], 6))
    with torch.no_grad():
        torch.manual_seed(1); a = G(*args)
        torch.manual_seed(1); b = G2(*args)
    for x, y in zip(a[0] + a[1], b[0] + b[1]): assert torch.equal(x, y)
    # PyTorch < 0.4.1 checkpoints have no BN counters
    old = {k: v for k, v in torch.load(path, weights_only=True).items() if not k.endswith("num_batches_tracked")}
    assert load_official_attngan_generator(old, ngf=4, base_size=16).h_net2.upsample[2].num_batches_tracked == 0


@pytest.mark.parametrize("kwargs, msg", [
    (dict(ngf=8, base_size=16), "ngf: the checkpoint has 4, the model was built with 8"),
    (dict(ngf=4, r_num=3, base_size=16), "r_num: the checkpoint has 2, the model was built with 3"),
    (dict(ngf=4, base_size=16, branch_num=2), "branch_num: the checkpoint has 3, the model was built with 2"),
    (dict(ngf=4, base_size=16, text_dim=300), "text_dim: the checkpoint has 256, the model was built with 300"),
    (dict(ngf=4), "base_size: the checkpoint has 16, the model was built with 64"),
])
def test_generator_wrong_size_names_both_numbers(kwargs, msg):
    sd = {f"module.{k}": v for k, v in AttnGANGenerator(ngf=4, base_size=16).state_dict().items()}
    with pytest.raises(ValueError, match=msg): load_official_attngan_generator(sd, **kwargs)


def test_generator_wrong_width_message_names_key_and_shape():
    sd = {f"module.{k}": v for k, v in AttnGANGenerator(ngf=4, base_size=16).state_dict().items()}
    with pytest.raises(ValueError) as e: load_official_attngan_generator(sd, ngf=8, base_size=16)
    assert "img_net1.img.0.weight has shape (3, 4, 3, 3)" in str(e.value)
    sd["module.h_net3.att.conv_context.weight"] = torch.zeros(4, 300, 1, 1)
    with pytest.raises(ValueError, match=r"\(4, 300, 1, 1\) in the checkpoint, \(4, 256, 1, 1\) in the model"):
        load_official_attngan_generator(sd, ngf=4, base_size=16)


def test_discriminator_checkpoint_loads_and_wrong_width_fails(tmp_path):
    torch.manual_seed(0)
    D = AttnGANDiscriminator(ndf=2, img_size=128)
    torch.save({f"module.{k}": v for k, v in D.state_dict().items()}, tmp_path / "netD1.pth")
    D2 = load_official_attngan_discriminator(tmp_path / "netD1.pth", ndf=2, img_size=128)
    assert not D2.training
    D.eval()
    x, s = torch.randn(2, 3, 128, 128), torch.randn(2, 256)
    with torch.no_grad(): assert torch.equal(D2.COND_DNET(D2(x), s), D.COND_DNET(D(x), s))
    with pytest.raises(ValueError, match="ndf: the checkpoint has 2, the model was built with 4"):
        load_official_attngan_discriminator(tmp_path / "netD1.pth", ndf=4, img_size=128)
    with pytest.raises(ValueError, match="img_size: the checkpoint has 128, the model was built with 256"):
        load_official_attngan_discriminator(tmp_path / "netD1.pth", ndf=2, img_size=256)


def attention_loop(h, words, W, mask):
    "Per-pixel reference: dot products with the projected real words, softmax, weighted sum."
    B, C, H, Wd = h.shape
    T = words.shape[2]
    proj = torch.einsum("oc,bct->bot", W, words)
    ctx, att = torch.zeros(B, C, H, Wd), torch.zeros(B, T, H, Wd)
    for b in range(B):
        real = [t for t in range(T) if not mask[b, t]]
        for y in range(H):
            for x in range(Wd):
                s = torch.tensor([float(h[b, :, y, x] @ proj[b, :, t]) for t in real], dtype=torch.float64)
                w = torch.softmax(s, 0).float()
                for t, a in zip(real, w):
                    att[b, t, y, x] = a
                    ctx[b, :, y, x] += a * proj[b, :, t]
    return ctx, att


def test_masked_word_attention_matches_loop_reference():
    torch.manual_seed(0)
    att = GlobalAttentionGeneral(6, 9).requires_grad_(False)
    h, words, mask = torch.randn(3, 6, 3, 5), torch.randn(3, 9, 7), padding([7, 3, 5], 7)
    ctx, a = att(h, words, mask)
    ctx_ref, a_ref = attention_loop(h, words, att.conv_context.weight[:, :, 0, 0], mask)
    torch.testing.assert_close(ctx, ctx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)
    assert a[1, 3:].abs().sum() == 0 and a[2, 5:].abs().sum() == 0
    torch.testing.assert_close(a.sum(1), torch.ones(3, 3, 5))


def test_official_mask_layout_reproduces_the_official_rows():
    "The official algorithm written out: scores as (B·HW)×T rows, mask tiled with repeat(HW, 1)."
    torch.manual_seed(0)
    att = GlobalAttentionGeneral(4, 5, official_mask_layout=True).requires_grad_(False)
    h, words, mask = torch.randn(3, 4, 2, 3), torch.randn(3, 5, 6), padding([6, 2, 4], 6)
    B, HW, T = 3, 6, 6
    src = torch.einsum("oc,bct->bot", att.conv_context.weight[:, :, 0, 0], words)
    scores = torch.bmm(h.view(B, 4, HW).transpose(1, 2), src).reshape(B * HW, T)
    scores = scores.masked_fill(mask.repeat(HW, 1), float("-inf")).softmax(1).view(B, HW, T).transpose(1, 2)
    ctx_ref = torch.bmm(src, scores).view(B, 4, 2, 3)
    ctx, a = att(h, words, mask)
    torch.testing.assert_close(ctx, ctx_ref)
    torch.testing.assert_close(a, scores.reshape(B, T, 2, 3))
    att.official_mask_layout = False
    assert not torch.allclose(att(h, words, mask)[1], a)


def bce(p, y):
    "Binary cross-entropy written out, with the log clamp at -100 of nn.BCELoss."
    return -(y * torch.log(p).clamp(min=-100) + (1 - y) * torch.log(1 - p).clamp(min=-100)).mean()


def test_loss_functions_equal_official_formulas():
    torch.manual_seed(0)
    ur, cr, uf, cf = torch.rand(4, 8).unbind(0)
    cw = torch.rand(7)
    ref = (bce(ur, 1) + bce(cr, 1)) / 2 + (bce(uf, 0) + bce(cf, 0) + bce(cw, 0)) / 3
    torch.testing.assert_close(d_loss_stage(ur, cr, uf, cf, cw), ref)
    us, cs = list(torch.rand(3, 8).unbind(0)), list(torch.rand(3, 8).unbind(0))
    torch.testing.assert_close(g_adv_loss(us, cs), sum(bce(u, 1) + bce(c, 1) for u, c in zip(us, cs)))


def test_discriminator_and_generator_losses_follow_the_official_sequence():
    torch.manual_seed(0)
    D = AttnGANDiscriminator(ndf=2, img_size=32)
    real, fake, sent = torch.randn(5, 3, 32, 32), torch.randn(5, 3, 32, 32, requires_grad=True), torch.randn(5, 256)
    fr, ff = D(real), D(fake)                      # separate passes (D has BatchNorm)
    ref = ((bce(D.UNCOND_DNET(fr), 1) + bce(D.COND_DNET(fr, sent), 1)) / 2
           + (bce(D.UNCOND_DNET(ff), 0) + bce(D.COND_DNET(ff, sent), 0) + bce(D.COND_DNET(fr[:4], sent[1:]), 0)) / 3)
    torch.testing.assert_close(discriminator_loss(D, real, fake, sent), ref)
    assert discriminator_probs(D, real, fake, sent)["cond_wrong"].shape == (4,)
    discriminator_loss(D, real, fake, sent).backward()
    assert fake.grad is None
    D2 = AttnGANDiscriminator(ndf=2, img_size=64)
    fake2 = torch.randn(5, 3, 64, 64)
    f1, f2 = D(fake), D2(fake2)
    ref = (bce(D.UNCOND_DNET(f1), 1) + bce(D.COND_DNET(f1, sent), 1)
           + bce(D2.UNCOND_DNET(f2), 1) + bce(D2.COND_DNET(f2, sent), 1))
    torch.testing.assert_close(generator_adv_loss([D, D2], [fake, fake2], sent), ref)


def test_output_shapes_base_16_and_64():
    torch.manual_seed(0)
    z, s, w, m = torch.randn(2, 100), torch.randn(2, 256), torch.randn(2, 256, 4), padding([4, 2], 4)
    imgs, atts, mu, logvar = AttnGANGenerator(ngf=4, base_size=16)(z, s, w, m)
    assert [tuple(i.shape) for i in imgs] == [(2, 3, 16, 16), (2, 3, 32, 32), (2, 3, 64, 64)]
    assert [tuple(a.shape) for a in atts] == [(2, 4, 16, 16), (2, 4, 32, 32)]
    assert mu.shape == logvar.shape == (2, 100)
    with torch.no_grad(): imgs, atts, _, _ = AttnGANGenerator(ngf=2, r_num=1, base_size=64).eval()(z, s, w, m)
    assert [i.shape[-1] for i in imgs] == [64, 128, 256] and [a.shape[-1] for a in atts] == [64, 128]
    for R in (16, 32, 64, 128, 256):
        assert AttnGANDiscriminator(ndf=2, img_size=R)(torch.randn(2, 3, R, R)).shape == (2, 16, 4, 4)
    with pytest.raises(ValueError, match="mask: expected shape 2×4"):
        AttnGANGenerator(ngf=4, base_size=16)(z, s, w, m[:, :3])


def test_forward_creates_nothing_off_the_input_device():
    G = AttnGANGenerator(ngf=2, base_size=16).to("meta")
    imgs, atts, mu, _ = G(torch.randn(2, 100, device="meta"), torch.randn(2, 256, device="meta"),
                          torch.randn(2, 256, 3, device="meta"), torch.zeros(2, 3, dtype=torch.bool, device="meta"))
    assert {t.device.type for t in imgs + atts + [mu]} == {"meta"}
    p = torch.rand(4, device="meta")
    assert d_loss_stage(p, p, p, p, p[:3]).device.type == "meta"


def test_kl_against_hand_formula():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5)
    pairs = zip(mu.flatten().tolist(), logvar.flatten().tolist())
    ref = sum(-0.5 * (1 + lv - m ** 2 - math.exp(lv)) for m, lv in pairs) / 15
    assert kl_loss(mu, logvar).item() == pytest.approx(ref, rel=1e-6)
    # conditioning augmentation: c = mu + exp(logvar/2)·eps
    G = AttnGANGenerator(ngf=2, base_size=8, branch_num=1)
    s = torch.randn(4, 256)
    mu, logvar = G.ca_net.encode(s)
    torch.manual_seed(5); c = G.ca_net(s)[0]
    torch.manual_seed(5); torch.testing.assert_close(c, mu + torch.randn(4, 100) * torch.exp(logvar / 2))


def test_presets_init_optimizers_and_ema():
    assert (PRESETS["cub_256"].ngf, PRESETS["cub_256"].ndf, PRESETS["cub_256"].r_num, PRESETS["cub_256"].batch_size,
            PRESETS["cub_256"].lambda_damsm) == (32, 64, 2, 20, 5.0)
    assert (PRESETS["coco_256"].ngf, PRESETS["coco_256"].ndf, PRESETS["coco_256"].r_num, PRESETS["coco_256"].batch_size,
            PRESETS["coco_256"].lambda_damsm) == (48, 96, 3, 14, 50.0)
    assert PRESETS["synth_birds_64"].image_sizes == [16, 32, 64]
    torch.manual_seed(0)
    cfg = replace(PRESETS["synth_birds_64"], ngf=4, ndf=4)
    G, Ds = make_attngan(cfg)
    assert [D.img_size for D in Ds] == [16, 32, 64]
    W = G.h_net1.fc[0].weight.detach()                      # 512×200: orthonormal columns
    torch.testing.assert_close(W.T @ W, torch.eye(200), atol=1e-4, rtol=0)
    for m in [*G.modules(), *(x for D in Ds for x in D.modules())]:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.bias.abs().sum() == 0 and (m.weight - 1).abs().max() < 0.15
    oG, oDs = make_attngan_optimizers(G, Ds, cfg)
    assert len(oDs) == 3
    for o in [oG, *oDs]: assert (o.param_groups[0]["lr"], o.param_groups[0]["betas"]) == (2e-4, (0.5, 0.999))
    avg = [torch.zeros_like(p) for p in G.parameters()]
    ema_update(avg, G, 0.999)
    torch.testing.assert_close(avg[0], 0.001 * next(G.parameters()).detach())


def test_one_training_step_is_finite_and_updates_everything():
    torch.manual_seed(0)
    cfg = AttnGANConfig(ngf=4, ndf=4, base_size=16)
    G, Ds = make_attngan(cfg)
    oG, oDs = make_attngan_optimizers(G, Ds, cfg)
    s, w, m = torch.randn(4, 256), torch.randn(4, 256, 5), padding([5, 4, 3, 1], 5)
    imgs, atts, mu, logvar = G(torch.randn(4, 100), s, w, m)
    before = [D.COND_DNET.jointConv[0].weight.clone() for D in Ds] + [G.h_net3.att.conv_context.weight.clone()]
    for D, o, r, f in zip(Ds, oDs, [torch.rand(4, 3, R, R) * 2 - 1 for R in cfg.image_sizes], imgs):
        o.zero_grad(); loss = discriminator_loss(D, r, f, s); loss.backward(); o.step()
        assert torch.isfinite(loss)
    loss = generator_adv_loss(Ds, imgs, s) + kl_loss(mu, logvar)
    oG.zero_grad(); loss.backward(); oG.step()
    assert torch.isfinite(loss)
    after = [D.COND_DNET.jointConv[0].weight for D in Ds] + [G.h_net3.att.conv_context.weight]
    assert all(not torch.equal(a, b) for a, b in zip(after, before))
