"""Tests of t2i_nb.style (StyleGAN2 components): modulated conv against a per-sample loop and its variance property,
equalised-lr step sizes against nn.Linear, mapping / truncation / mixing, shapes 16–256 px, minibatch stddev and the
projection head against loops, R1 against closed forms and finite differences, lazy R1, device hygiene."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from t2i_nb.accel import fake_device_copy
from t2i_nb.ssagan import n_params
from t2i_nb.style import (PRESETS, EqualConv2d, EqualLinear, MappingNetwork, StyleConv, StyleDiscriminator,
                          StyleGenerator, ToRGB, d_logistic_loss, downsample2x, g_nonsaturating_loss,
                          make_style_models, make_style_optimizers, minibatch_stddev, modulated_conv2d,
                          modulated_conv2d_loop, r1_penalty, style_channels, style_d_loss, style_g_loss, upsample2x)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=0)


# ----------------------------------------------------------------------------------------------- modulated conv
def loop_by_hand(x, weight, styles, demodulate, padding):
    "Written from the definition, independently of the module's loop: w' = w·s_i, w'' = w'/√(Σw'² + 1e-8)."
    out = []
    for b in range(len(x)):
        w = weight.clone()
        for i in range(weight.shape[1]): w[:, i] = w[:, i] * styles[b, i]
        if demodulate:
            for o in range(weight.shape[0]): w[o] = w[o] / math.sqrt(w[o].pow(2).sum().item() + 1e-8)
        out.append(F.conv2d(x[b:b + 1], w, padding=padding))
    return torch.cat(out)


@pytest.mark.parametrize("demod", [True, False])
@pytest.mark.parametrize("k,pad", [(3, 0), (3, 1), (3, 2), (1, 0)])
def test_fused_modulated_conv_equals_per_sample_loop(demod, k, pad):
    x, w, s = torch.randn(3, 5, 7, 6), torch.randn(4, 5, k, k), torch.rand(3, 5) + 0.5
    fused = modulated_conv2d(x, w, s, demodulate=demod, padding=pad)
    assert close(fused, loop_by_hand(x, w, s, demod, pad), 1e-4)
    assert close(fused, modulated_conv2d_loop(x, w, s, demod, pad), 1e-4)


def test_modulated_conv_upsampling_and_shape_errors():
    x, w, s = torch.randn(2, 5, 4, 4), torch.randn(3, 5, 3, 3), torch.rand(2, 5)
    assert close(modulated_conv2d(x, w, s, up=2), modulated_conv2d_loop(upsample2x(x), w, s), 1e-4)
    with pytest.raises(ValueError, match="x must be B×5×H×W"): modulated_conv2d(x[:, :4], w, s)
    with pytest.raises(ValueError, match=r"styles: expected shape 2×5, got \(2, 4\)"): modulated_conv2d(x, w, s[:, :4])
    with pytest.raises(ValueError, match="Cout×Cin×k×k"): modulated_conv2d(x, w[0], s)
    with pytest.raises(ValueError, match="up must be 1 or 2"): modulated_conv2d(x, w, s, up=4)


def test_demodulated_conv_has_unit_output_variance():
    cin = 512
    x, w = torch.randn(2, cin, 8, 8), torch.randn(16, cin, 3, 3)
    s = 1 + torch.randn(2, cin)                                      # styles far from 1
    y = modulated_conv2d(x, w, s, demodulate=True, padding=0)
    assert abs(y.var().item() - 1) < 0.1
    y_mod = modulated_conv2d(x, w, s, demodulate=False, padding=0)  # ≈ Cin·k²·E[s²]: thousands
    assert y_mod.var().item() > 1000


def fir(x, up):
    "upfirdn2d with the [1,3,3,1] filter written out (zero insertion, padding (2,1) / (1,1), stride)."
    f = torch.tensor([1., 3, 3, 1], dtype=x.dtype) / 8 * up
    k = (f[:, None] * f[None])[None, None].expand(x.shape[1], 1, 4, 4)
    if up == 2:
        z = x.new_zeros(*x.shape[:2], 2 * x.shape[2], 2 * x.shape[3]); z[..., ::2, ::2] = x
        return F.conv2d(F.pad(z, (2, 1, 2, 1)), k, groups=x.shape[1])
    return F.conv2d(F.pad(x, (1, 1, 1, 1)), k, stride=2, groups=x.shape[1])


def test_resampling_is_the_stylegan2_fir_filter_away_from_the_border():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert close(upsample2x(x)[..., 2:-2, 2:-2], fir(x, 2)[..., 2:-2, 2:-2], 1e-12)
    assert close(downsample2x(x)[..., 1:-1, 1:-1], fir(x, 1)[..., 1:-1, 1:-1], 1e-12)


# ------------------------------------------------------------------------------------------ equalised lr
def one_step(opt_cls, lr_mul, n_in, **kw):
    "Ratios (Δ effective weight, Δ effective bias) of EqualLinear over a plain nn.Linear with the same function."
    eq = EqualLinear(n_in, 3, lr_mul=lr_mul).double()
    with torch.no_grad(): eq.bias.normal_()
    plain = nn.Linear(n_in, 3).double()
    c = lr_mul / math.sqrt(n_in)
    with torch.no_grad(): plain.weight.copy_(eq.weight * c); plain.bias.copy_(eq.bias * lr_mul)
    x, t = torch.randn(16, n_in, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    assert close(eq(x), plain(x), 1e-12)
    W0, b0 = plain.weight.detach().clone(), plain.bias.detach().clone()
    for m in (eq, plain):
        opt = opt_cls(m.parameters(), lr=1e-3, **kw)
        F.mse_loss(m(x), t).backward(); opt.step()
    return ((eq.weight.detach() * c - W0) / (plain.weight.detach() - W0),
            (eq.bias.detach() * lr_mul - b0) / (plain.bias.detach() - b0))


@pytest.mark.parametrize("lr_mul,n_in", [(0.01, 8), (1.0, 32)])
def test_lr_multiplier_scales_the_sgd_step_by_c_squared(lr_mul, n_in):
    rw, rb = one_step(torch.optim.SGD, lr_mul, n_in)
    assert close(rw, torch.full_like(rw, lr_mul ** 2 / n_in), 1e-6 * lr_mul ** 2 / n_in)   # W = cV, ∂V = c∂W → ΔW = c²·
    assert close(rb, torch.full_like(rb, lr_mul ** 2), 1e-6 * lr_mul ** 2)


def test_lr_multiplier_scales_the_first_adam_step_by_c():
    rw, rb = one_step(torch.optim.Adam, 0.01, 8, eps=1e-20)
    assert close(rw, torch.full_like(rw, 0.01 / math.sqrt(8)), 1e-8)
    assert close(rb, torch.full_like(rb, 0.01), 1e-8)


def test_equal_layers_against_plain_ops():
    lin = EqualLinear(8, 3, bias_init=1.0, lr_mul=0.5, activation="lrelu")
    x = torch.randn(4, 8)
    assert close(lin(x), F.leaky_relu(x @ (lin.weight * 0.5 / math.sqrt(8)).T + 0.5, 0.2) * math.sqrt(2))
    conv = EqualConv2d(4, 6, 3, activation="lrelu", down=2, gain=math.sqrt(0.5))
    with torch.no_grad(): conv.bias.normal_()
    xi = torch.randn(2, 4, 8, 8)
    ref = downsample2x(F.conv2d(xi, conv.weight / 6, padding=1)) + conv.bias.view(1, -1, 1, 1)
    assert close(conv(xi), F.leaky_relu(ref, 0.2))                  # √2·√½ = 1
    with pytest.raises(ValueError, match="EqualLinear input: expected shape B×8"): lin(torch.randn(4, 7))


# ------------------------------------------------------------------------------------ mapping, truncation
def test_mapping_by_hand_w_avg_and_truncation():
    M = MappingNetwork(z_dim=6, c_dim=5, w_dim=4, num_layers=3, w_avg_beta=0.9).requires_grad_(False)
    z, s = torch.randn(10, 6), torch.randn(10, 5)
    w = M(z, s)
    n2 = lambda v: v / torch.sqrt(v.pow(2).mean(1, keepdim=True) + 1e-8)
    e = s @ (M.embed.weight / math.sqrt(5)).T + M.embed.bias
    h = torch.cat([n2(z), n2(e)], 1)
    for layer in M.layers:
        h = F.leaky_relu(h @ (layer.weight * 0.01 / math.sqrt(layer.in_features)).T + 0.01 * layer.bias, 0.2) * math.sqrt(2)
    assert close(w, h)
    assert close(M.w_avg, 0.1 * w.mean(0), 1e-7)                      # first update from zeros
    M.eval(); avg = M.w_avg.clone()
    assert torch.equal(M(z, s, truncation_psi=0.0), avg.expand(10, -1))   # exactly w_avg
    assert torch.equal(M.w_avg, avg)                                      # no update in eval mode
    assert close(M(z, s, truncation_psi=0.3), avg + 0.3 * (M(z, s) - avg))


def test_style_mixing_takes_a_suffix_of_layers_from_the_second_code():
    G = StyleGenerator(img_size=16, ngf=2, w_dim=8, mapping_layers=2).eval().requires_grad_(False)
    z, z2, s = torch.randn(3, 100), torch.randn(3, 100), torch.randn(3, 256)
    wa, wb = G.ws(z, s), G.ws(z2, s)
    cuts = set()
    for _ in range(20):
        wm = G.ws(z, s, mixing_prob=1.0, z2=z2)
        cut = next(i for i in range(G.num_ws) if torch.equal(wm[:, i], wb[:, i]))
        assert torch.equal(wm[:, :cut], wa[:, :cut]) and torch.equal(wm[:, cut:], wb[:, cut:])
        cuts.add(cut)
    assert cuts <= set(range(1, G.num_ws)) and len(cuts) > 1
    assert torch.equal(G.ws(z, s, mixing_prob=0.0, z2=z2), wa)


# ------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("R", [16, 32, 64, 128, 256])
def test_generator_and_discriminator_shapes(R):
    G = StyleGenerator(img_size=R, ngf=2, max_mult=2, w_dim=8, mapping_layers=2)
    D = StyleDiscriminator(img_size=R, ndf=1, max_mult=2)
    z, s = torch.randn(2, 100), torch.randn(2, 256)
    assert G.num_ws == 2 * int(math.log2(R)) - 2
    assert G.ws(z, s).shape == (2, G.num_ws, 8)
    img = G(z, s, mixing_prob=0.9)
    assert img.shape == (2, 3, R, R)
    assert G.final_image(z, s).abs().max() <= 1
    assert D(img, s).shape == (2,) and D.features(img).shape == (2, D.cmap_dim)


def test_channel_rule_and_size_errors():
    assert style_channels(64, 16) == {4: 128, 8: 128, 16: 64, 32: 32, 64: 16}
    assert style_channels(256, 64)[4] == 512 and style_channels(256, 64)[256] == 64
    with pytest.raises(ValueError, match="power of two >= 8"): StyleGenerator(img_size=48)
    with pytest.raises(ValueError, match="power of two >= 8"): StyleDiscriminator(img_size=4)
    D = StyleDiscriminator(img_size=16, ndf=2)
    with pytest.raises(ValueError, match=r"images: expected shape B×3×16×16, got \(4, 3, 32, 32\)"):
        D(torch.randn(4, 3, 32, 32))
    G = StyleGenerator(img_size=16, ngf=2, w_dim=8, mapping_layers=1)
    with pytest.raises(ValueError, match=r"sent_emb: expected shape 2×256, got \(2, 100\)"):
        G(torch.randn(2, 100), torch.randn(2, 100))


def test_style_conv_and_torgb_by_hand():
    sc = StyleConv(4, 6, w_dim=5, up=True).requires_grad_(False)
    with torch.no_grad(): sc.noise_strength.fill_(0.5); sc.bias.normal_()
    x, w = torch.randn(2, 4, 4, 4), torch.randn(2, 5)
    torch.manual_seed(3); y = sc(x, w)
    torch.manual_seed(3); noise = torch.randn(2, 1, 8, 8)
    styles = w @ (sc.affine.weight / math.sqrt(5)).T + 1.0
    ref = loop_by_hand(upsample2x(x), sc.weight, styles, True, 1) + 0.5 * noise + sc.bias.view(1, -1, 1, 1)
    assert close(y, F.leaky_relu(ref, 0.2) * math.sqrt(2), 1e-4)
    rgb = ToRGB(6, 5).requires_grad_(False)
    prev = torch.randn(2, 3, 4, 4)
    ref = loop_by_hand(y, rgb.weight, rgb.affine(w) / math.sqrt(6), False, 0) + upsample2x(prev)
    assert close(rgb(y, w, skip=prev), ref, 1e-4)
    assert StyleConv(4, 6, 5).noise_strength.item() == 0.0


# -------------------------------------------------------------------------------------- D: mbstd, projection
def mbstd_by_hand(x, group_size, F_):
    N, C, H, W = x.shape
    G = min(group_size, N); n = N // G
    extra = torch.zeros(N, F_, H, W)
    for g in range(n):
        members = [g + k * n for k in range(G)]                      # official strided layout
        for f in range(F_):
            part = x[members][:, f * C // F_:(f + 1) * C // F_]      # G×c×H×W
            sd = ((part - part.mean(0)).pow(2).mean(0) + 1e-8).sqrt().mean()
            for i in members: extra[i, f] = sd
    return torch.cat([x, extra], 1)


@pytest.mark.parametrize("N,group,F_", [(8, 4, 1), (8, 2, 3), (3, 4, 1), (12, 4, 2)])
def test_minibatch_stddev_against_direct_computation(N, group, F_):
    x = torch.randn(N, 6, 3, 2)
    assert close(minibatch_stddev(x, group, F_), mbstd_by_hand(x, group, F_))


def test_minibatch_stddev_groups_divide_any_batch():
    "A per-process batch of 6 (12 over two torchrun processes) is grouped by 3: the largest divisor <= 4."
    x = torch.randn(6, 4, 2, 2)
    assert close(minibatch_stddev(x, 4), mbstd_by_hand(x, 3, 1))
    with pytest.raises(ValueError, match="not divisible by num_channels=3"):
        minibatch_stddev(torch.randn(4, 4, 2, 2), 4, 3)


def test_projection_head_against_hand_formula():
    D = StyleDiscriminator(img_size=16, ndf=4, c_dim=7).requires_grad_(False)
    with torch.no_grad(): D.out.bias.fill_(0.3); D.embed.bias.normal_()
    imgs, sent = torch.randn(4, 3, 16, 16), torch.randn(4, 7)
    h = D.features(imgs)
    C = h.shape[1]
    uncond = h @ (D.out.weight[0] / math.sqrt(C)) + 0.3
    e = sent @ (D.embed.weight / math.sqrt(7)).T + D.embed.bias
    e = e / torch.sqrt(e.pow(2).mean(1, keepdim=True) + 1e-8)
    assert close(D(imgs, sent), uncond + (h * e).sum(1) / math.sqrt(C))
    assert close(D(imgs), uncond)
    assert close(D.logits(h, sent), D(imgs, sent))


def test_residual_block_merges_with_sqrt_half():
    D = StyleDiscriminator(img_size=16, ndf=2)
    blk = D.blocks[0]
    with torch.no_grad(): blk.conv1.weight.zero_(); blk.conv1.bias.zero_()   # main branch off: skip only
    x = torch.randn(2, blk.conv0.in_channels, 16, 16)
    ref = F.conv2d(downsample2x(x), blk.skip.weight / math.sqrt(blk.skip.in_channels)) * math.sqrt(0.5)
    assert close(blk(x), ref)
    assert blk.skip.bias is None


# ------------------------------------------------------------------------------------------------- losses
def test_logistic_losses():
    r, f = torch.randn(6), torch.randn(6)
    assert close(d_logistic_loss(r, f), torch.log1p(f.exp()).mean() + torch.log1p((-r).exp()).mean())
    assert close(g_nonsaturating_loss(f), torch.log1p((-f).exp()).mean())


def test_r1_of_a_linear_discriminator_is_half_gamma_norm_squared():
    a = torch.randn(12)
    x = torch.randn(5, 3, 2, 2, requires_grad=True)
    assert close(r1_penalty(x.flatten(1) @ a - 1.0, x, gamma=4.0), 2.0 * a.pow(2).sum(), 1e-4)
    with pytest.raises(ValueError, match="must require grad"): r1_penalty(x.detach().flatten(1) @ a, x.detach())


def test_r1_against_finite_differences_and_autograd():
    A, v = torch.randn(12, 7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    Dn = lambda x: torch.tanh(x.flatten(1) @ A) @ v
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    fd = torch.zeros(3, 12, dtype=torch.float64)
    with torch.no_grad():
        for i in range(3):
            for j in range(12):
                e = torch.zeros(3, 12, dtype=torch.float64); e[i, j] = 1e-6
                fd[i, j] = (Dn(x + e.view_as(x))[i] - Dn(x - e.view_as(x))[i]) / 2e-6
    pen = r1_penalty(Dn(x), x, gamma=10.0)
    assert abs(pen.item() - 5 * fd.pow(2).sum(1).mean().item()) < 1e-6
    # the penalty is differentiable in D's parameters: its gradient equals autograd's of the closed form
    A.requires_grad_(True)
    pen = r1_penalty(Dn(x), x, gamma=10.0)
    gA, = torch.autograd.grad(pen, A)
    xs = x.detach().flatten(1)
    closed = lambda A_: 5 * (((1 - torch.tanh(xs @ A_) ** 2) * v) @ A_.T).pow(2).sum(1).mean()
    gA_ref, = torch.autograd.grad(closed(A), A)
    assert close(gA, gA_ref, 1e-9)


def test_lazy_r1_schedule_and_detached_fakes():
    D = StyleDiscriminator(img_size=16, ndf=2, c_dim=7)
    real, fake, sent = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16, requires_grad=True), torch.randn(4, 7)
    l0, t0 = style_d_loss(D, real, fake, sent, step=16, r1_gamma=2.0, r1_every=16)
    l1, t1 = style_d_loss(D, real, fake, sent, step=17, r1_gamma=2.0, r1_every=16)
    rr = real.clone().requires_grad_()
    assert close(t0["d_r1"], r1_penalty(D(rr, sent), rr, 2.0))
    assert close(l0, t0["d_adv"] + 16 * t0["d_r1"], 1e-4) and "d_r1" not in t1 and close(l1, t1["d_adv"])
    assert "d_r1" not in style_d_loss(D, real, fake, sent, step=0, r1_gamma=0.0)[1]
    l0.backward()
    assert fake.grad is None and D.fromrgb.weight.grad.abs().sum() > 0
    assert close(style_g_loss(D, fake, sent), F.softplus(-D(fake, sent)).mean())


# ------------------------------------------------------------------------------------------ config, device
def test_presets_models_and_optimizers():
    assert abs(PRESETS["synth_birds_64"].r1_gamma - 0.0002 * 64 ** 2 / 24) < 1e-12
    cfg = replace(PRESETS["synth_birds_64"], ngf=4, ndf=4)
    G, D = make_style_models(cfg)
    assert (G.img_size, D.img_size, G.num_ws) == (64, 64, 10)
    oG, oD = make_style_optimizers(G, D, cfg)
    assert oG.param_groups[0]["lr"] == 0.0025 and oG.param_groups[0]["betas"] == (0.0, 0.99)
    assert oD.param_groups[0]["lr"] == 0.0025 and oD.param_groups[0]["betas"] == (0.0, 0.99)   # R1 is in the one D step
    with torch.device("meta"):
        G256, _ = make_style_models(PRESETS["paper256"], "meta")
    assert n_params(G256.mapping) == 256 * 256 + 256 + (356 * 256 + 256) + 7 * (256 * 256 + 256)


def test_forwards_stay_on_the_device():
    "Every tensor made in forward (noise, mixing coin/cutoff, layer index) follows the inputs: fake CUDA, no CPU mixing."
    cfg = replace(PRESETS["synth_birds_64"], img_size=16, ngf=4, ndf=4, mapping_layers=2)
    G, D = make_style_models(cfg)
    cuda = torch.device("cuda")
    with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True)):
        G, D = fake_device_copy(G, cuda), fake_device_copy(D, cuda)
        z, s = torch.randn(4, 100, device=cuda), torch.randn(4, 256, device=cuda)
        img = G(z, s, truncation_psi=0.7, mixing_prob=0.9)
        loss_d, terms = style_d_loss(D, img, img, s, step=1)        # R1 needs autograd on a real GPU
        outs = [img, G.final_image(z, s), loss_d, style_g_loss(D, img, s), *terms.values()]
        assert all(t.device.type == "cuda" for t in outs)


def test_meta_device_forward():
    G = StyleGenerator(img_size=16, ngf=2, w_dim=8, mapping_layers=2).to("meta")
    out = G(torch.randn(2, 100, device="meta"), torch.randn(2, 256, device="meta"), mixing_prob=1.0)
    assert out.device.type == "meta" and out.shape == (2, 3, 16, 16)


# ===================================================================================== Style1/Style2AttnGAN
import copy

from t2i_nb.attngan import real_pyramid
from t2i_nb.style import (Style2Generator, StyleConfig, StyleStageDiscriminators, make_style1, make_style2,
                          style_d_objective, style_d_step, style_g_objective, style_g_step)


def caption_batch(B=3, T=6, lens=(6, 4, 2), dim=256):
    words = torch.randn(B, dim, T)
    mask = torch.arange(T)[None] >= torch.tensor(lens)[:, None]       # True at padding
    return torch.randn(B, 100), torch.randn(B, dim), words, mask


def test_style2_generator_shapes_attention_and_range():
    z, s, words, mask = caption_batch()
    G = Style2Generator(ngf=4, w_dim=8, mapping_layers=2)             # 16 → 32 → 64
    imgs, atts = G(z, s, words, mask, truncation_psi=0.8, mixing_prob=0.9)
    assert [tuple(x.shape) for x in imgs] == [(3, 3, R, R) for R in (16, 32, 64)]
    assert [tuple(a.shape) for a in atts] == [(3, 6, 16, 16), (3, 6, 32, 32)]
    assert G.num_ws == 10 and G.image_sizes == [16, 32, 64]
    for a in atts:
        assert close(a.sum(1), torch.ones(3, *a.shape[2:]))            # distribution over the real words
        assert a[mask[:, :, None, None].expand_as(a)].abs().max() == 0  # exactly 0 on padding
        assert (a[~mask[:, :, None, None].expand_as(a)] > 0).all()
    fin = G.final_image(z, s, words, mask)
    assert fin.shape == (3, 3, 64, 64) and fin.min() >= -1 and fin.max() <= 1
    assert G(z, s, words, mask)[0][-1].abs().max() > 0


def test_style2_skip_path_and_word_dependence():
    z, s, words, mask = caption_batch()
    G = Style2Generator(ngf=4, w_dim=8, mapping_layers=2).eval().requires_grad_(False)
    a, _ = G(z, s, words, mask, noise_mode="none")
    b, _ = G(z, s, torch.randn_like(words), mask, noise_mode="none")
    assert torch.equal(a[0], b[0]) and not close(a[1], b[1]) and not close(a[2], b[2])   # words enter at stage 2
    with torch.no_grad():
        for st in G.stages: st.torgb.weight.zero_(); st.torgb.bias.zero_()
    c, _ = G(z, s, words, mask, noise_mode="none")
    assert close(c[1], upsample2x(c[0]), 1e-6) and close(c[2], upsample2x(c[1]), 1e-6)
    assert isinstance(G.stages[0].att.conv_context, EqualConv2d)      # equalised lr in the attention too


def test_style2_ws_mixing_and_errors():
    z, s, words, mask = caption_batch()
    G = Style2Generator(ngf=4, w_dim=8, mapping_layers=2, branch_num=2, base_size=8).eval().requires_grad_(False)
    assert G.num_ws == 4 + 2
    z2 = torch.randn_like(z)
    wa, wb, wm = G.ws(z, s), G.ws(z2, s), G.ws(z, s, mixing_prob=1.0, z2=z2)
    cut = next(i for i in range(G.num_ws) if torch.equal(wm[:, i], wb[:, i]))
    assert 1 <= cut < G.num_ws and torch.equal(wm[:, :cut], wa[:, :cut])
    with pytest.raises(ValueError, match=r"words_emb: expected shape 3×256×B, got \(3, 100, 6\)"):
        G(z, s, words[:, :100], mask)
    with pytest.raises(ValueError, match=r"mask: expected shape 3×6, got \(3, 5\)"): G(z, s, words, mask[:, :5])
    with pytest.raises(ValueError, match="branch_num must be >= 1"): Style2Generator(branch_num=0)
    with pytest.raises(ValueError, match="power of two >= 8"): Style2Generator(base_size=12)


def test_style2_256px_on_meta_and_small_on_cpu():
    G = Style2Generator(ngf=2, w_dim=8, mapping_layers=2, base_size=64, max_mult=2).to("meta")
    mk = lambda *sh: torch.randn(*sh, device="meta")
    imgs, atts = G(mk(2, 100), mk(2, 256), mk(2, 256, 5), torch.zeros(2, 5, dtype=torch.bool, device="meta"),
                   truncation_psi=0.7, mixing_prob=0.9)
    assert [tuple(x.shape) for x in imgs] == [(2, 3, R, R) for R in (64, 128, 256)]
    assert [tuple(a.shape) for a in atts] == [(2, 5, 64, 64), (2, 5, 128, 128)]
    assert {t.device.type for t in imgs + atts} == {"meta"}
    cfg = StyleConfig(img_size=256, branch_num=3, ngf=2, ndf=2, max_mult=2, mapping_layers=2)
    assert cfg.image_sizes == [64, 128, 256] and cfg.base_size == 64 and cfg.nz == 100
    with torch.device("meta"):
        G, D = make_style2(cfg, "meta")
    assert G.image_sizes == D.image_sizes == [64, 128, 256]


def test_stage_discriminators_score_every_list_stage_and_sentence():
    D = StyleStageDiscriminators([StyleDiscriminator(R, ndf=2) for R in (8, 16)])
    real, fake = [torch.randn(4, 3, R, R) for R in (8, 16)], [torch.randn(4, 3, R, R) for R in (8, 16)]
    s, m = torch.randn(4, 256), torch.randn(4, 256)
    out = D(real, fake, sents=[[s, m, None], [s]])
    for k, Dk in enumerate(D.stages):
        assert close(out[0][k][0], Dk(real[k], s)) and close(out[0][k][1], Dk(real[k], m))
        assert close(out[0][k][2], Dk(real[k])) and close(out[1][k][0], Dk(fake[k], s))
    with pytest.raises(ValueError, match="2 stages but 1 image batches"): D(real[:1], sents=[[s]])
    with pytest.raises(ValueError, match="2 image lists but 1 sentence lists"): D(real, fake, sents=[[s]])


sp = lambda t: torch.log1p(torch.exp(t))                               # softplus, written out


def d_by_hand(D, reals, fake_sets, sents, mis_sents, step, gamma, every):
    loss, terms = 0.0, {}
    for fakes, s, m in zip(fake_sets, sents, mis_sents):
        for k, Dk in enumerate(D.stages):
            lk = (sp(-Dk(reals[k], s)).mean()
                  + (sp(Dk(fakes[k].detach(), s)).mean() + sp(Dk(reals[k], m)).mean()) / 2)
            terms[f"d_loss{k}"] = terms.get(f"d_loss{k}", 0.0) + lk
            loss = loss + lk
    if step % every == 0:
        terms["r1"] = 0.0
        for k, Dk in enumerate(D.stages):
            x = reals[k].clone().requires_grad_()
            g, = torch.autograd.grad(Dk(x, sents[0]).sum(), x, create_graph=True)
            gk = gamma * (x.shape[-1] / reals[-1].shape[-1]) ** 2          # γ ∝ R²: the largest stage has γ
            terms["r1"] = terms["r1"] + gk / 2 * g.pow(2).sum((1, 2, 3)).mean()
        loss = loss + every * terms["r1"]
    terms["d_loss"] = loss
    return loss, terms


def after_sgd(model, loss_fn):
    "p − ∇p of loss_fn(model) (p unchanged where unused), i.e. what SGD at lr 1 makes of the parameters."
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return [p.detach() - (0 if p.grad is None else p.grad) for p in model.parameters()]


def tiny_stage_setup(B=4, sizes=(8, 16), c_dim=5):
    D = StyleStageDiscriminators([StyleDiscriminator(R, ndf=2, c_dim=c_dim) for R in sizes]).double()
    dd = dict(dtype=torch.float64)
    reals = [torch.randn(B, 3, R, R, **dd) for R in sizes]
    fake_sets = [[torch.randn(B, 3, R, R, **dd, requires_grad=True) for R in sizes] for _ in range(2)]
    sents = [torch.randn(B, c_dim, **dd) for _ in range(2)]
    mis = [torch.randn(B, c_dim, **dd) for _ in range(2)]
    return D, reals, fake_sets, sents, mis


@pytest.mark.parametrize("step", [12, 13])                             # r1_every 4: 12 has R1, 13 not
def test_style_d_step_equals_the_loss_written_out(step):
    D, reals, fake_sets, sents, mis = tiny_stage_setup()
    cfg = StyleConfig(r1_gamma=2.5, r1_every=4)
    Dh = copy.deepcopy(D)
    want = after_sgd(Dh, lambda m: d_by_hand(m, reals, fake_sets, sents, mis, step, 2.5, 4)[0])
    _, ref = d_by_hand(Dh, reals, fake_sets, sents, mis, step, 2.5, 4)
    terms = style_d_step(D, torch.optim.SGD(D.parameters(), lr=1.0), reals, fake_sets, sents, mis, step, cfg)
    assert sorted(terms) == sorted(ref) and ("r1" in terms) == (step == 12)
    assert all(abs(terms[k] - ref[k].item()) < 1e-10 for k in terms)
    assert all(close(p, q, 1e-10) for p, q in zip(D.parameters(), want))
    assert all(f.grad is None for fs in fake_sets for f in fs)        # fakes detached


def test_style_d_objective_without_r1_when_off():
    D, reals, fake_sets, sents, mis = tiny_stage_setup()
    for cfg in (StyleConfig(r1_gamma=0.0), StyleConfig(r1_every=0)):
        _, terms = style_d_objective(D, reals, fake_sets, sents, mis, 0, cfg)
        assert "r1" not in terms


def test_style_g_step_equals_the_loss_written_out_and_leaves_d_alone():
    D, _, _, sents, _ = tiny_stage_setup()
    G = Style2Generator(ngf=2, w_dim=6, c_dim=5, text_dim=5, branch_num=2, base_size=8, mapping_layers=2).double()
    z, words = torch.randn(8, 100, dtype=torch.float64), torch.randn(8, 5, 7, dtype=torch.float64)
    extra = lambda f: dict(total=0.5 * f.pow(2).mean(), sq=f.pow(2).mean())
    split = lambda imgs: [[x[i * 4:(i + 1) * 4] for x in imgs] for i in range(2)]

    def by_hand(Gm):
        sets = split(Gm(z, torch.cat(sents), words, noise_mode="none")[0])
        adv = sum(sp(-Dk(f, s)).mean() for fs, s in zip(sets, sents) for Dk, f in zip(D.stages, fs))
        return adv + extra(torch.cat([fs[-1] for fs in sets]))["total"]

    Gh = copy.deepcopy(G)
    want = after_sgd(Gh, by_hand)
    D.zero_grad(set_to_none=True)
    d0 = [p.clone() for p in D.parameters()]
    terms = style_g_step(D, torch.optim.SGD(G.parameters(), lr=1.0),
                         split(G(z, torch.cat(sents), words, noise_mode="none")[0]), sents, extra)
    assert sorted(terms) == ["g_adv", "g_loss", "g_sq"]
    assert abs(terms["g_loss"] - by_hand(Gh.requires_grad_(False)).item()) < 1e-10
    assert all(close(p, q, 1e-10) for p, q in zip(G.parameters(), want))
    assert all(torch.equal(p, q) and p.grad is None and p.requires_grad for p, q in zip(D.parameters(), d0))


def one_iteration(make, cfg, B=4, T=5, step=0):
    G, D = make(cfg)
    oG, oD = make_style_optimizers(G, D, cfg)
    z, sent, words = torch.randn(B, cfg.nz), torch.randn(B, 256), torch.randn(B, 256, T)
    mask = torch.zeros(B, T, dtype=torch.bool)
    real = torch.rand(B, 3, cfg.img_size, cfg.img_size) * 2 - 1
    g0, d0 = [p.clone() for p in G.parameters()], [p.clone() for p in D.parameters()]
    fakes = (G(z, sent, words, mask, mixing_prob=cfg.mixing_prob)[0] if cfg.branch_num > 1
             else [G(z, sent, mixing_prob=cfg.mixing_prob)])
    terms = style_d_step(D, oD, real_pyramid(real, cfg.image_sizes), [fakes], [sent], [sent.roll(1, 0)], step, cfg)
    terms |= style_g_step(D, oG, [fakes], [sent], lambda f: dict(total=0.1 * f.pow(2).mean(), l2=f.pow(2).mean()))
    assert all(math.isfinite(v) for v in terms.values()), terms
    assert all(not torch.equal(p, q) for p, q in zip(G.parameters(), g0))
    assert all(not torch.equal(p, q) for p, q in zip(D.parameters(), d0))
    return terms


@pytest.mark.parametrize("arch", ["style1", "style2"])
def test_one_optimisation_step_moves_every_parameter(arch):
    cfg = replace(PRESETS["synth_birds_64"], img_size=32, ngf=4, ndf=4, mapping_layers=2,
                  branch_num=1 if arch == "style1" else 3)
    terms = one_iteration(make_style1 if arch == "style1" else make_style2, cfg)
    stages = [f"d_loss{k}" for k in range(cfg.branch_num)]
    assert sorted(terms) == sorted(["d_loss", "r1", "g_adv", "g_l2", "g_loss", *stages])


def test_config_and_builders():
    cfg = PRESETS["style2_synth_birds_64"]
    assert (cfg.nz, cfg.branch_num, cfg.base_size, cfg.image_sizes) == (100, 3, 16, [16, 32, 64])
    assert PRESETS["synth_birds_64"].image_sizes == [64] and StyleConfig().branch_num == 1
    small = replace(cfg, ngf=4, ndf=4, mapping_layers=2)
    G, D = make_style2(small)
    assert isinstance(G, Style2Generator) and D.image_sizes == [16, 32, 64]
    assert [Dk.mbstd_group for Dk in D.stages] == [small.mbstd_group] * 3
    G1, D1 = make_style1(replace(small, branch_num=1))
    assert isinstance(G1, StyleGenerator) and D1.image_sizes == [64]
    with pytest.raises(ValueError, match="set branch_num=1"): make_style1(small)


class AutocastSpy(StyleStageDiscriminators):
    "Records whether autocast is on at each call; logits in bf16 when it is (CPU has no bf16 antialiased resampling)."
    seen: list

    def forward(self, *image_lists, sents):
        on = torch.is_autocast_enabled("cpu")
        self.seen.append(on)
        with torch.autocast("cpu", enabled=False): out = super().forward(*image_lists, sents=sents)
        return [[[l.to(torch.bfloat16) if on else l for l in ls] for ls in per] for per in out]


def test_losses_in_fp32_and_r1_in_its_own_pass_without_autocast():
    D, reals, fake_sets, sents, mis = tiny_stage_setup()
    spy = AutocastSpy(list(D.float().stages)); spy.seen = []
    reals, sents, mis = [x.float() for x in reals], [s.float() for s in sents], [m.float() for m in mis]
    fake_sets = [[f.detach().float() for f in fs] for fs in fake_sets]
    cfg = StyleConfig(r1_gamma=1.0, r1_every=1)
    _, plain = style_d_objective(spy, reals, fake_sets[:1], sents[:1], mis[:1], 0, cfg)
    spy.seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, mixed = style_d_objective(spy, reals, fake_sets[:1], sents[:1], mis[:1], 0, cfg)
        _, g = style_g_objective(spy, fake_sets, sents)
    assert spy.seen == [True, False, True]                            # D pass, R1 pass (autocast off), G pass
    assert all(v.dtype == torch.float32 for v in [*mixed.values(), *g.values()])
    assert torch.equal(mixed["r1"], plain["r1"])


def test_style_steps_stay_on_the_device():
    "Generators, stage discriminators and both objectives (no R1: its double backward needs a real GPU) on fake CUDA."
    cuda = torch.device("cuda")
    for make, b in [(make_style1, 1), (make_style2, 3)]:
        cfg = replace(PRESETS["synth_birds_64"], img_size=32, ngf=4, ndf=4, mapping_layers=2, branch_num=b)
        G, D = make(cfg)
        with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True)):
            G, D = fake_device_copy(G, cuda), fake_device_copy(D, cuda)
            z, s, w = torch.randn(4, 100, device=cuda), torch.randn(4, 256, device=cuda), torch.randn(4, 256, 5, device=cuda)
            mask = torch.zeros(4, 5, dtype=torch.bool, device=cuda)
            if b > 1:
                imgs, atts = G(z, s, w, mask, truncation_psi=0.7, mixing_prob=0.9)
                outs = [*imgs, *atts, G.final_image(z, s, w, mask)]
            else:
                imgs = [G(z, s, truncation_psi=0.7, mixing_prob=0.9)]
                outs = [*imgs]
            reals = [torch.randn(4, 3, R, R, device=cuda) for R in cfg.image_sizes]
            loss_d, td = style_d_objective(D, reals, [imgs], [s], [s.roll(1, 0)], 1, cfg)
            loss_g, tg = style_g_objective(D, [imgs], [s], lambda f: dict(total=f.mean()))
            outs += [loss_d, loss_g, *td.values(), *tg.values()]
            assert all(t.device.type == "cuda" for t in outs)
