"""Device correctness without a GPU: every forward path of training, generation and evaluation runs with models and
data on a fake `cuda` device (FakeTensorMode); any tensor made on the CPU and mixed in raises
FakeTensorDeviceMismatchError. Backward passes need a real GPU (benchmarks/gpu_check.py runs them there)."""
import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import t2i_nb.attngan as attngan
import t2i_nb.ssagan as ssagan
import t2i_nb.style as style
from t2i_nb.accel import EMA, fake_device_copy
from t2i_nb.captioner import Captioner, CaptionerConfig
from t2i_nb.data import mismatch_index
from t2i_nb.encoders import SmallImageEncoder
from t2i_nb.evaluator import SBEvaluator, SBFeatures
from t2i_nb.losses import LOSS_PRESETS, loss_config
from t2i_nb.metrics import RPrecisionExtractor
from t2i_nb.archs import ARCHS, Encoders, build_models, train_step
from t2i_nb.config import make_config
from t2i_nb.sampling import generate
from t2i_nb.train import load_latest_checkpoint

CUDA = torch.device("cuda")
N_WORDS, B, L = 40, 4, 7


def fake_mode():
    "Fake tensors; real CPU tensors may enter (as CPU tensors); data-dependent shapes (packed LSTM inputs) allowed."
    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True))


def fake_batch():
    "A training batch as the loader would give it, on the fake GPU."
    caps = torch.randint(1, N_WORDS, (B, L), device=CUDA)
    return dict(img=torch.rand(B, 3, 64, 64, device=CUDA) * 2 - 1, caption=caps, cap_len=torch.full((B,), L, device=CUDA),
                caption2=caps.flip(0), cap_len2=torch.full((B,), L, device=CUDA),
                class_id=torch.tensor([0, 0, 1, 2], device=CUDA))


class StandInText(torch.nn.Module):
    """The DAMSM text encoder's interface (words B×256×T, sentence B×256) without its packed LSTM: FakeTensorMode
    puts `pack_padded_sequence`'s batch sizes on the fake GPU, where real CUDA keeps them on the CPU."""
    def __init__(self): super().__init__(); self.emb = torch.nn.Embedding(N_WORDS, 256)
    def forward(self, caps, lens):
        w = self.emb(caps)
        return w.transpose(1, 2), w.mean(1)


def encoders():
    "Fresh SynthBirds-sized frozen encoders (and captioner) moved to the fake GPU."
    return Encoders(*(fake_device_copy(m.eval().requires_grad_(False)) for m in (StandInText(), SmallImageEncoder(ndf=8),
                                                            Captioner(N_WORDS, CaptionerConfig(channels=4)))))


@pytest.fixture
def no_backward(monkeypatch):
    "Keep the forward passes of a step, drop what needs a real GPU: backward/optimizer updates and input gradients."
    for module in (ssagan, attngan, style):                 # each architecture's optimiser step
        monkeypatch.setattr(module, "_update", lambda opt, loss, terms, where, prec=None: terms)
    monkeypatch.setattr(torch.autograd, "grad", lambda out, inputs, **kw: tuple(
        torch.zeros_like(x) for x in ((inputs,) if torch.is_tensor(inputs) else inputs)))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("loss", sorted(LOSS_PRESETS))
@pytest.mark.parametrize("fold", [False, True])
def test_a_training_step_forward_stays_on_the_device(arch, loss, fold, no_backward):
    cfg = make_config(arch=arch, loss=loss, ngf=4, ndf=4, fold_magp=fold, ema_decay=0.9, device="cpu")
    m = build_models(cfg, torch.device("cpu"))
    with fake_mode():
        m.G, m.D = fake_device_copy(m.G, CUDA), fake_device_copy(m.D, CUDA)
        m.ema = EMA(m.G, 0.9)
        terms = train_step(m, fake_batch(), encoders(), loss_config(loss), torch.randn(B, 100, device=CUDA))
        assert {"d_loss", "g_loss", "g_adv"} <= set(terms) and all(t.device.type == 'cuda' for t in terms.values())


def test_generation_and_evaluation_forwards_stay_on_the_device():
    cfg = make_config(ngf=4, ndf=4, device="cpu")
    G = build_models(cfg, torch.device("cpu")).G
    sb = SBFeatures(SBEvaluator(width=4))                                      # hashes real weights
    caps, lens = torch.randint(1, N_WORDS, (B, L)), torch.full((B,), L)          # real CPU data, as fake_batches makes
    with fake_mode():
        G, enc = fake_device_copy(G.eval(), CUDA), encoders()
        img = generate(G, enc.text, caps, lens, torch.randn(B, 100), CUDA)
        assert img.device.type == "cpu" and img.shape == (B, 3, 64, 64)          # returned on the CPU for grids
        b = dict(img=img.to(CUDA), img2=img.to(CUDA), caption=caps.to(CUDA), cap_len=lens.to(CUDA))
        sb.model, sb.device = fake_device_copy(sb.model, CUDA), CUDA
        assert all(v.device.type == 'cuda' for v in sb(b).values())
        rp = RPrecisionExtractor(enc.text, enc.image, caps, lens, np.arange(B))
        rp.setup(CUDA)                                                          # pool encoded on the device
        assert rp.pool_emb.device.type == 'cuda'


def test_the_check_catches_a_cpu_tensor(monkeypatch):
    "The bug this file guards against: a helper that builds CPU tensors beside CUDA class ids (mismatch_index before)."
    def old_mismatch_index(class_ids):                 # as released before this test existed
        c = torch.as_tensor(class_ids).reshape(-1)
        B = len(c)
        shifts = torch.arange(1, max(B, 2))
        cand = (torch.arange(B)[:, None] + shifts[None, :]) % B
        differs = c[cand] != c[:, None]
        first = torch.where(differs.any(1), differs.float().argmax(1), torch.zeros(B, dtype=torch.long))
        return cand[torch.arange(B), first]
    with fake_mode():
        c = torch.tensor([0, 0, 1, 2], device=CUDA)
        assert mismatch_index(c).device.type == 'cuda'
        with pytest.raises(FakeTensorDeviceMismatchError): old_mismatch_index(c)


def test_checkpoints_load_onto_the_run_device(tmp_path):
    from t2i_nb.train import _CKPT_KEYS, save_checkpoint
    save_checkpoint(tmp_path, {k: 0 for k in _CKPT_KEYS} | {"G": {"w": torch.ones(2)}, "epoch": 1, "step": 1})
    state, _ = load_latest_checkpoint(tmp_path, map_location="meta")        # map_location reaches torch.load
    assert state["G"]["w"].device.type == "meta"
