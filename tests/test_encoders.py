"DAMSM encoders: official checkpoint keys/shapes, vocabulary check, outputs, unsorted batches."
import pytest
import torch
from torchvision.models import inception_v3

from t2i_nb.data import VocabMismatchError
from t2i_nb.encoders import (IMAGE_ENCODERS, InceptionImageEncoder, SmallImageEncoder, TextEncoder,
                             find_inception_weights, load_image_encoder, load_text_encoder, save_encoder)


def official_text_state_dict(n_words, seed=0):
    "A state dict with the documented keys and shapes of AttnGAN's RNN_ENCODER (random values)."
    g = torch.Generator().manual_seed(seed)
    sd = {"encoder.weight": torch.rand(n_words, 300, generator=g) * 0.2 - 0.1}
    for r in ("", "_reverse"):
        sd[f"rnn.weight_ih_l0{r}"] = torch.randn(512, 300, generator=g) * 0.05
        sd[f"rnn.weight_hh_l0{r}"] = torch.randn(512, 128, generator=g) * 0.05
        sd[f"rnn.bias_ih_l0{r}"] = torch.randn(512, generator=g) * 0.05
        sd[f"rnn.bias_hh_l0{r}"] = torch.randn(512, generator=g) * 0.05
    return sd


@pytest.mark.parametrize("n_words,n_params", [(5450, 2_075_320), (27297, 27297 * 300 + 2_075_320 - 5450 * 300)])
def test_text_encoder_official_keys_load_strict(tmp_path, n_words, n_params):
    sd = official_text_state_dict(n_words)
    assert sum(v.numel() for v in sd.values()) == n_params
    enc = TextEncoder(n_words)
    assert {k: v.shape for k, v in enc.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    enc.load_state_dict(sd, strict=True)
    torch.save(sd, tmp_path / "text_encoder200.pth")
    enc2 = load_text_encoder(tmp_path / "text_encoder200.pth", n_words=n_words)
    assert torch.equal(enc2.rnn.weight_hh_l0_reverse, sd["rnn.weight_hh_l0_reverse"])
    assert not enc2.training


def test_coco_text_encoder_size():
    assert sum(p.numel() for p in TextEncoder(27297).parameters()) == 8_629_420   # "about 8.63 M"


def test_vocab_mismatch_error(tmp_path):
    torch.save(official_text_state_dict(5450), tmp_path / "text_encoder200.pth")
    with pytest.raises(VocabMismatchError) as e:
        load_text_encoder(tmp_path / "text_encoder200.pth", n_words=27297)
    msg = str(e.value)
    assert "27,297" in msg and "5,450" in msg and "text_encoder200.pth" in msg


def test_module_prefix_is_stripped(tmp_path):
    sd = {f"module.{k}": v for k, v in official_text_state_dict(50).items()}
    torch.save(sd, tmp_path / "t.pth")
    assert load_text_encoder(tmp_path / "t.pth").n_words == 50


def test_text_encoder_shapes_unsorted_and_zero_length():
    torch.manual_seed(0)
    enc = TextEncoder(40).eval()
    lens = torch.tensor([3, 7, 1, 5, 0])
    caps = torch.randint(1, 40, (5, 9)) * (torch.arange(9)[None] < lens[:, None])
    with torch.no_grad():
        w, s = enc(caps, lens)
        assert w.shape == (5, 256, 7) and s.shape == (5, 256)
        for i in range(4):
            n = int(lens[i])
            wi, si = enc(caps[i:i + 1, :n], lens[i:i + 1])
            torch.testing.assert_close(w[i, :, :n], wi[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(s[i], si[0], atol=1e-5, rtol=1e-5)
            assert w[i, :, n:].abs().sum() == 0
        # the zero-length caption is encoded as its first (<end>) token alone
        w1, s1 = enc(caps[4:5, :1], torch.tensor([1]))
        torch.testing.assert_close(s[4], s1[0], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(w).all() and torch.isfinite(s).all()


def test_text_encoder_dropout_only_in_train_mode():
    enc = TextEncoder(30)
    caps, lens = torch.randint(1, 30, (2, 6)), torch.tensor([6, 4])
    enc.train(); a, b = enc(caps, lens)[1], enc(caps, lens)[1]
    assert not torch.allclose(a, b)
    enc.eval(); torch.testing.assert_close(enc(caps, lens)[1], enc(caps, lens)[1])


@pytest.fixture(scope="module")
def inception():
    return InceptionImageEncoder()


def official_image_state_dict():
    "torchvision's Inception-v3 (AuxLogits, fc dropped) + AttnGAN's two projections: the official CNN_ENCODER keys."
    sd = {k: v for k, v in inception_v3(weights=None, aux_logits=False, init_weights=False).state_dict().items()
          if not k.startswith(("fc.", "AuxLogits."))}
    sd["emb_features.weight"] = torch.rand(256, 768, 1, 1) * 0.2 - 0.1
    sd["emb_cnn_code.weight"] = torch.rand(256, 2048) * 0.2 - 0.1
    sd["emb_cnn_code.bias"] = torch.zeros(256)
    return sd


def test_inception_keys_counts_and_strict_load(tmp_path, inception):
    sd = official_image_state_dict()
    assert len(sd) == 564 + 3
    ours = inception.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in sd.items()}
    frozen = sum(p.numel() for p in inception.parameters() if not p.requires_grad)
    trainable = [(n, p.numel()) for n, p in inception.named_parameters() if p.requires_grad]
    assert frozen == 21_785_568
    assert trainable == [("emb_features.weight", 196_608), ("emb_cnn_code.weight", 524_288), ("emb_cnn_code.bias", 256)]
    sd["Mixed_6e.branch7x7dbl_3.bn.running_var"] = torch.full((192,), 3.0)   # adapted BN statistics
    inception.load_state_dict(sd, strict=True)
    # old checkpoints (PyTorch 0.3/0.4) have no num_batches_tracked
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, tmp_path / "image_encoder200.pth")
    enc = load_image_encoder(tmp_path / "image_encoder200.pth")
    assert isinstance(enc, InceptionImageEncoder) and not enc.training
    assert torch.equal(enc.Mixed_6e.branch7x7dbl_3.bn.running_var, torch.full((192,), 3.0))
    assert torch.equal(enc.emb_cnn_code.weight, sd["emb_cnn_code.weight"])


def test_inception_forward_shapes(inception):
    with torch.no_grad():
        f, c = inception.eval()(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert f.shape == (2, 256, 17, 17) and c.shape == (2, 256)


def test_inception_bn_statistics_follow_train_mode():
    enc = InceptionImageEncoder(freeze_bn=True).train()
    assert not enc.Mixed_5b.training and enc.emb_cnn_code.training
    enc = InceptionImageEncoder().train()
    assert enc.Mixed_5b.training


def test_imagenet_weights_missing_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        find_inception_weights()
    msg = str(e.value)
    assert "inception_v3_google-0cc3c7bd.pth" in msg and "inception_v3_google-1a9a5a14.pth" in msg
    assert str(tmp_path / "checkpoints") in msg
    (tmp_path / "checkpoints").mkdir()
    torch.save({}, tmp_path / "checkpoints" / "inception_v3_google-1a9a5a14.pth")
    assert find_inception_weights().name == "inception_v3_google-1a9a5a14.pth"


def test_imagenet_state_dict_loads_into_trunk(tmp_path):
    tv = inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    torch.save(tv, tmp_path / "inception_v3_google-0cc3c7bd.pth")
    enc = InceptionImageEncoder(tmp_path / "inception_v3_google-0cc3c7bd.pth")
    assert torch.equal(enc.Mixed_7c.branch_pool.conv.weight, tv["Mixed_7c.branch_pool.conv.weight"])
    assert torch.equal(enc.Conv2d_1a_3x3.bn.running_mean, tv["Conv2d_1a_3x3.bn.running_mean"])
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="bad.pth"):
        InceptionImageEncoder(tmp_path / "bad.pth")


def test_small_encoder_round_trip(tmp_path):
    enc = IMAGE_ENCODERS["small"](ndf=16)
    enc.train()(torch.rand(8, 3, 64, 64) * 2 - 1)          # moves the BN statistics
    enc.eval()
    f, c = enc(torch.rand(3, 3, 64, 64) * 2 - 1)
    assert f.shape == (3, 256, 8, 8) and c.shape == (3, 256)
    save_encoder(enc, tmp_path / "image_encoder.pth")
    enc2 = load_image_encoder(tmp_path / "image_encoder.pth")
    assert isinstance(enc2, SmallImageEncoder)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        for a, b in zip(enc(x), enc2(x)): torch.testing.assert_close(a, b)
    assert list(tmp_path.iterdir()) == [tmp_path / "image_encoder.pth"]     # atomic: no temp file left
