"The architecture registry: AttnGAN (+ CL) on the shared loop — steps against the official sequence, EMA, exact resume, errors."
import copy, json, os, signal, subprocess, sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from t2i_nb.archs import ARCHS, Encoders, arch_loss_config, build_models, official_generator, per_branch, train_step
from t2i_nb.attngan import (AttnGANDiscriminators, AttnGANGenerator, attngan_d_step, attngan_g_step, d_loss_stage,
                            discriminator_loss, generator_adv_loss, kl_loss, make_attngan, real_pyramid)
from t2i_nb.core import UnknownNameError
from t2i_nb.encoders import SmallImageEncoder, TextEncoder
from t2i_nb.losses import LossConfig, auxiliary_terms, generator_inputs, nt_xent
from t2i_nb.train import make_config, prepare_assets

from conftest import run_train_script, tiny_run_settings

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(**kw):
    base = dict(ngf=4, ndf=4, img_size=64, batch_size=4, lr_g=2e-4, lr_d=2e-4, ema_decay=0.9, arch="attngan",
                arch_opts={}, sync_bn=False, compile=False, fold_magp=False, gate_init=1.0, dataset="synth_birds", magp_every=1)
    return SimpleNamespace(**(base | kw))


def toy_batch(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.rand(B, 3, 64, 64, generator=g) * 2 - 1, caption=torch.randint(1, 30, (B, 6), generator=g),
                cap_len=torch.tensor([6, 5, 4, 3][:B]), caption2=torch.randint(1, 30, (B, 7), generator=g),
                cap_len2=torch.tensor([7, 2, 4, 5][:B]), class_id=torch.arange(B))


def toy_encoders():
    torch.manual_seed(5)
    return Encoders(TextEncoder(30, nhidden=256).eval().requires_grad_(False),
                    SmallImageEncoder(256, ndf=4, img_size=64).eval().requires_grad_(False))


def bce(p, y): return -(y * p.log().clamp(min=-100) + (1 - y) * (1 - p).log().clamp(min=-100)).mean()


def test_two_caption_step_equals_t2i_cl_written_out():
    "D on both branches, G: per-branch adversarial + KL + DAMSM, plus F2F once — against the formulas with plain BCE."
    torch.manual_seed(0)
    m = build_models(tiny_cfg(ema_decay=0.0), "cpu")
    ref = copy.deepcopy(m)
    enc, batch = toy_encoders(), toy_batch()
    lcfg = arch_loss_config("attngan", "synth_birds", "attngan_cl")
    noise = torch.randn(4, 100)
    torch.manual_seed(1); terms = train_step(m, batch, enc, lcfg, noise)
    # the same iteration, written out with the official formulas
    torch.manual_seed(1)
    inp = generator_inputs(enc.text, batch, lcfg, noise)
    imgs, _, mu, lv = ref.G(inp["noise"], inp["sent"], inp["words"], inp["mask"])
    B, Ds = 4, list(ref.D.stages)
    reals = real_pyramid(batch["img"], ref.arch_cfg.image_sizes)
    errD = 0.
    for s in range(2):
        sent = inp["sent"][s * B:(s + 1) * B]
        for D, r, f in zip(Ds, reals, imgs):
            fr, ff = D(r), D(f[s * B:(s + 1) * B].detach())
            errD = errD + ((bce(D.UNCOND_DNET(fr), 1) + bce(D.COND_DNET(fr, sent), 1)) / 2
                           + (bce(D.UNCOND_DNET(ff), 0) + bce(D.COND_DNET(ff, sent), 0)
                              + bce(D.COND_DNET(fr[:-1], sent[1:]), 0)) / 3)
    ref.optD.zero_grad(); errD.backward(); ref.optD.step()
    for p in ref.D.parameters(): p.requires_grad_(False)
    adv = kl = 0.
    for s in range(2):
        sent, rows = inp["sent"][s * B:(s + 1) * B], slice(s * B, (s + 1) * B)
        for D, f in zip(Ds, imgs):
            h = D(f[rows]); adv = adv + bce(D.UNCOND_DNET(h), 1) + bce(D.COND_DNET(h, sent), 1)
        kl = kl + kl_loss(mu[rows], lv[rows])
    aux = auxiliary_terms(imgs[-1], inp, lcfg, enc.image)
    codes = enc.image(imgs[-1])[1]
    torch.testing.assert_close(aux["f2f"], nt_xent(codes[:B], codes[B:], 0.5))
    errG = adv + kl + 2 * 5.0 * aux["damsm"] + 0.2 * aux["f2f"]
    ref.optG.zero_grad(); errG.backward(); ref.optG.step()
    assert terms["d_loss"] == pytest.approx(errD.item(), rel=1e-5)
    assert terms["g_loss"] == pytest.approx(errG.item(), rel=1e-5)
    for a, b in zip([*m.G.parameters(), *m.D.parameters()], [*ref.G.parameters(), *ref.D.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)   # Adam moves each weight by ~2e-4


def test_one_caption_set_steps_equal_official_per_stage_adams():
    "One Adam over the stacked stage Ds after one backward == the official Adam per stage after each stage's backward."
    torch.manual_seed(0)
    G, Ds = make_attngan(build_models(tiny_cfg(), "cpu").arch_cfg)
    D2 = AttnGANDiscriminators(copy.deepcopy(Ds))
    opts = [torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999)) for D in Ds]
    opt2 = torch.optim.Adam(D2.parameters(), 2e-4, betas=(0.5, 0.999))
    sent, words = torch.randn(4, 256), torch.randn(4, 256, 5)
    mask = torch.arange(5)[None] >= torch.tensor([5, 4, 3, 1])[:, None]
    with torch.no_grad(): imgs = G(torch.randn(4, 100), sent, words, mask)[0]
    reals = real_pyramid(torch.rand(4, 3, 64, 64) * 2 - 1, [16, 32, 64])
    for _ in range(2):                                    # two steps: Adam's moments too
        for D, o, r, f in zip(Ds, opts, reals, imgs): o.zero_grad(); discriminator_loss(D, r, f, sent).backward(); o.step()
        attngan_d_step(D2, opt2, reals, [imgs], [sent])
    for a, b in zip((p for D in Ds for p in D.parameters()), D2.parameters()): torch.testing.assert_close(a, b)


def test_per_branch_counts_every_term_but_f2f_per_branch():
    lcfg = LossConfig(lambda_damsm=5.0, lambda_r2f=0.1, lambda_f2f=0.2)
    aux = dict(damsm=torch.tensor(2.0), r2f=torch.tensor(3.0), f2f=torch.tensor(4.0))
    aux["total"] = 5 * aux["damsm"] + 0.1 * aux["r2f"] + 0.2 * aux["f2f"]
    assert per_branch(aux, lcfg, 2)["total"].item() == pytest.approx(2 * (10 + 0.3) + 0.8)
    assert per_branch(aux, lcfg, 1)["total"].item() == pytest.approx(aux["total"].item())


def test_ema_follows_the_official_formula():
    torch.manual_seed(0)
    m = build_models(tiny_cfg(ema_decay=0.9), "cpu")
    before = [p.clone() for p in m.ema.module.parameters()]
    train_step(m, toy_batch(), toy_encoders(), arch_loss_config("attngan", "synth_birds", "attngan"), torch.randn(4, 100))
    for a, e, p in zip(before, m.ema.module.parameters(), m.G.parameters()):
        torch.testing.assert_close(e, 0.9 * a + 0.1 * p.detach())
    for b, c in zip(m.ema.module.buffers(), m.G.buffers()): assert torch.equal(b, c)


def test_registry_errors_name_the_valid_choices():
    with pytest.raises(UnknownNameError, match="valid architectures: attngan, ssagan, style1_attngan, style2_attngan"):
        make_config(arch="attgan")
    with pytest.raises(UnknownNameError, match="unknown loss preset 'attngan_cl' for arch 'ssagan'"):
        make_config(arch="ssagan", loss="attngan_cl")
    with pytest.raises(ValueError, match="arch_opts r_nums not taken by arch 'attngan'; valid: branch_num, r_num"):
        make_config(arch="attngan", arch_opts={"r_nums": 3})


def test_presets_and_defaults_per_dataset(tmp_path):
    c = make_config(arch="attngan", loss="attngan_cl")
    assert (c.ngf, c.ndf, c.lr_g, c.lr_d, c.ema_decay, c.batch_size) == (16, 16, 2e-4, 2e-4, 0.99, 8)
    c = make_config(preset="synth_birds_study", arch="attngan")                 # the committed study's settings
    assert (c.epochs, c.batch_size, c.ema_decay) == (3, 12, 0.99)             # AttnGAN's own EMA on top
    s, m = make_config(preset="synth_birds_study"), make_config()             # SSA-GAN: study vs main job
    assert (s.epochs, s.batch_size, s.magp_every, s.ema_decay) == (3, 12, 1, 0.0)
    assert (m.epochs, m.batch_size, m.magp_every, m.ema_decay) == (6, 8, 4, 0.98)
    assert make_config("cub", data_dir=str(tmp_path)).magp_every == 1 and make_config("cub", data_dir=str(tmp_path)).ema_decay == 0
    (tmp_path / "coco").mkdir()
    c = make_config("coco", arch="attngan", loss="attngan", data_dir=str(tmp_path / "coco"))
    assert (c.ngf, c.ndf, c.batch_size, c.arch_opts, c.ema_decay) == (48, 96, 14, {"r_num": 3}, 0.999)
    assert arch_loss_config(c.arch, c.dataset, c.loss, c.lambdas).lambda_damsm == 50.0
    assert make_config(arch="attngan", ngf=8).ngf == 8                 # what the user gives wins
    assert make_config("coco", arch="attngan", data_dir=str(tmp_path / "coco"),
                       arch_opts={"kl_weight": 2.0}).arch_opts == {"r_num": 3, "kl_weight": 2.0}   # merged
    assert [make_config(arch=a).loss for a in ("ssagan", "attngan", "style1_attngan", "style2_attngan")] == \
        ["f2f_r2f", "attngan", "style1_attngan", "style2_attngan_r2f"]    # each architecture's plain row
    m = build_models(make_config("coco", arch="attngan", loss="attngan", data_dir=str(tmp_path / "coco")), "meta")
    assert sum(p.numel() for p in m.G.parameters()) == 13_811_456      # the official COCO generator
    m = build_models(make_config("cub", arch="attngan", loss="attngan", data_dir=str(tmp_path / "coco")), "meta")
    assert sum(p.numel() for p in m.G.parameters()) == 7_084_592       # the official CUB generator and D64/128/256
    assert [sum(p.numel() for p in D.parameters()) for D in m.D.stages] == [6_313_730, 19_424_002, 71_858_946]


def test_official_generator_through_the_registry(tmp_path):
    cfg = make_config(arch="attngan", ngf=4)
    G = AttnGANGenerator(ngf=4, base_size=16)
    torch.save({f"module.{k}": v for k, v in G.state_dict().items()}, tmp_path / "netG_epoch_600.pth")
    G2 = official_generator(cfg, tmp_path / "netG_epoch_600.pth")
    for k, v in G.state_dict().items(): assert torch.equal(G2.state_dict()[k], v)
    with pytest.raises(ValueError, match="ngf: the checkpoint has 4, the model was built with 16"):
        official_generator(make_config(arch="attngan"), tmp_path / "netG_epoch_600.pth")


run_script = run_train_script


@pytest.mark.parametrize("arch, loss", [("attngan", "attngan_cl"), ("style2_attngan", "style2_attngan_r2f")])
def test_sigkill_then_resume_gives_the_same_weights_and_ema(tmp_path, arch, loss):
    kw = tiny_run_settings(tmp_path, epochs=3, arch=arch, loss=loss, ema_decay=0.9, arch_opts={"r1_every": 4} if "style" in arch else {})
    prepare_assets(make_config(**kw))
    ref, killed = dict(kw, run_name="uninterrupted"), dict(kw, run_name="killed")
    assert run_script(ref).returncode == 0
    assert run_script(killed, kill_at=10).returncode == -signal.SIGKILL
    r = run_script(killed)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(tmp_path / "runs" / n / "checkpoints" / "ckpt_0003.pt", weights_only=True)
            for n in ("uninterrupted", "killed"))
    for part in ("G", "D", "G_ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]: assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    assert any(not torch.equal(a["G"][k], a["G_ema"][k]) for k in a["G"])   # the checkpoint holds a real average
    cfg = json.loads((tmp_path / "runs" / "killed" / "config.json").read_text())
    lam = "lambda_f2f" if arch == "attngan" else "lambda_r2f"
    assert cfg["config"]["arch"] == arch and cfg["loss"][lam] == 0.2 and cfg["loss"]["lambda_damsm"] == 5.0


def test_seeded_generation_is_repeatable_and_leaves_the_callers_rng_alone():
    "AttnGAN samples its conditioning augmentation: evaluation seeds it, so metrics do not depend on training's RNG."
    from t2i_nb.sampling import generate
    torch.manual_seed(0)
    m, enc = build_models(tiny_cfg(), "cpu"), toy_encoders()
    b, z = toy_batch(), torch.randn(4, 100)
    state = torch.get_rng_state()
    a1 = generate(m.G_eval, enc.text, b["caption"], b["cap_len"], z, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    a2 = generate(m.G_eval, enc.text, b["caption"], b["cap_len"], z, seed=3)
    a3 = generate(m.G_eval, enc.text, b["caption"], b["cap_len"], z, seed=4)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)


def _spy_step(arch, loss, monkeypatch, **lambdas):
    "One iteration of `arch` with `loss` on toy data; (terms, rows the generator made, rows DAMSM saw, D's input sizes)."
    import t2i_nb.losses as L
    from t2i_nb.damsm import damsm_loss as real_damsm                 # the original, not an earlier call's spy
    seen = {"damsm": [], "D": []}
    monkeypatch.setattr(L, "damsm_loss", lambda feats, code, *a, **k: seen["damsm"].append(len(code)) or
                        real_damsm(feats, code, *a, **k))
    torch.manual_seed(0)
    m = build_models(tiny_cfg(arch=arch, ema_decay=0.0, lr_d=4e-4), "cpu")
    d_forward = m.D.forward
    m.D.forward = lambda x, *a, **k: seen["D"].append(len(x)) or d_forward(x, *a, **k)
    lcfg = arch_loss_config(arch, "synth_birds", loss, lambdas)
    torch.manual_seed(1)
    terms = train_step(m, toy_batch(), toy_encoders(), lcfg, torch.randn(4, 100))
    return terms, seen


def test_two_cap_control_runs_f2fs_rows_without_the_f2f_term(monkeypatch):
    "The control: 2N generator rows through the adversarial loss and DAMSM as in `f2f`, and nothing else differs."
    none, s_none = _spy_step("ssagan", "none", monkeypatch)
    ctrl, s_ctrl = _spy_step("ssagan", "two_cap", monkeypatch)
    f2f, s_f2f = _spy_step("ssagan", "f2f", monkeypatch)
    assert "g_f2f" not in ctrl and "g_f2f" in f2f and set(ctrl) == set(none)
    assert s_none["damsm"] == [4] and s_ctrl["damsm"] == s_f2f["damsm"] == [8]          # DAMSM on N vs 2N fakes
    # D step: real + first set's fakes (8 rows); MA-GP: real (4); G step: every fake (N or 2N)
    assert s_none["D"] == [8, 4, 4] and s_ctrl["D"] == s_f2f["D"] == [8, 4, 8]
    for k in ("d_loss", "magp", "g_adv", "g_damsm"):                                     # same inputs, same numbers
        assert ctrl[k] == pytest.approx(f2f[k], rel=1e-6), k
    assert f2f["g_loss"] == pytest.approx(ctrl["g_loss"] + 0.2 * f2f["g_f2f"], rel=1e-5)
    both, s_both = _spy_step("ssagan", "two_cap", monkeypatch, d_both=True)              # D on both caption sets
    assert s_both["D"] == [16, 4, 8]


def test_d_both_and_class_masking_switch_what_they_say(monkeypatch):
    "AttnGAN family: D sees both caption sets by default (T2I_CL) and one set when told; masking changes only F2F."
    both, _ = _spy_step("attngan", "attngan_cl", monkeypatch)
    one, _ = _spy_step("attngan", "attngan_cl", monkeypatch, d_both=False)
    assert both["d_loss"] != pytest.approx(one["d_loss"])
    masked, _ = _spy_step("attngan", "attngan_cl", monkeypatch, mask_same_class=True)
    assert masked["g_f2f"] == pytest.approx(both["g_f2f"], rel=1e-6)       # toy batch: 4 classes, nothing to mask
    b = toy_batch(); b["class_id"] = torch.tensor([0, 0, 1, 1])
    inp = generator_inputs(toy_encoders().text, b, arch_loss_config("ssagan", "synth_birds", "f2f"), torch.randn(4, 100))
    fakes = torch.rand(8, 3, 64, 64) * 2 - 1
    enc = toy_encoders().image
    plain = auxiliary_terms(fakes, inp, arch_loss_config("ssagan", "synth_birds", "f2f"), enc)["f2f"]
    mask = auxiliary_terms(fakes, inp, arch_loss_config("ssagan", "synth_birds", "f2f", {"mask_same_class": True}), enc)["f2f"]
    codes = enc(fakes)[1]
    assert mask == pytest.approx(float(nt_xent(*codes.chunk(2), 0.5, classes=[0, 0, 1, 1])), rel=1e-6)
    assert plain == pytest.approx(float(nt_xent(*codes.chunk(2), 0.5)), rel=1e-6) and mask != pytest.approx(plain)


@pytest.mark.parametrize("arch, loss", [("ssagan", "f2f_r2f"), ("attngan", "attngan_cl"),
                                        ("style1_attngan", "style1_attngan_f2f"), ("style2_attngan", "style2_attngan_r2f")])
def test_bf16_autocast_steps_run_on_the_cpu_where_images_are_resized(arch, loss):
    "bf16 fakes reach the antialiased resizes (DAMSM encoder at 32 px, style D's ×½): once NotImplementedError on a CPU."
    from t2i_nb.accel import Precision
    terms = {}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = build_models(tiny_cfg(arch=arch, ema_decay=0.0), "cpu")
        torch.manual_seed(5)
        enc = Encoders(TextEncoder(30, nhidden=256).eval().requires_grad_(False),
                       SmallImageEncoder(256, ndf=4, img_size=32).eval().requires_grad_(False))   # 64 px fakes -> 32
        torch.manual_seed(1)
        terms[prec] = train_step(m, toy_batch(), enc, arch_loss_config(arch, "synth_birds", loss), torch.randn(4, 100),
                                 prec=Precision(prec, "cpu"))
    assert set(terms["bf16"]) == set(terms["fp32"])
    for k, v in terms["fp32"].items():     # the first step sees the same weights: only bf16 rounding differs
        assert terms["bf16"][k] == pytest.approx(v, rel=0.05, abs=0.05), k
