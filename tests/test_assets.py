"Pretrained assets on CUB-format data: the re-captioning model is pretrained once into the dataset's cache, then read."
import pytest
import torch

import t2i_nb.captioner as captioner_mod
from t2i_nb.assets import _captioner
from t2i_nb.config import make_config
from t2i_nb.data import TextImageDataset, dataset_fingerprint, write_fixture


def test_cub_captioner_is_pretrained_once_then_read_from_the_cache(tmp_path, monkeypatch):
    root = write_fixture(tmp_path / "birds", "cub", n_train=8, n_test=4)
    cfg = make_config("cub", data_dir=str(root), loss="f2f_r2f_cap", pretrain_epochs=1, img_size=64, device="cpu")
    train = TextImageDataset(root, "train", img_size=64)       # (writes captions.pickle, as AttnGAN's loader does)
    before = {p.relative_to(root) for p in root.rglob("*")}
    cap, path = _captioner(cfg, train, "cpu", dataset_fingerprint(root))
    assert path.startswith(str(root / "t2i_cache" / "captioner")) and path.endswith("captioner.pth")
    assert not any(p.requires_grad for p in cap.parameters())                 # frozen, ready for the G step
    new = {p.relative_to(root) for p in root.rglob("*")} - before
    assert all(p.parts[0] == "t2i_cache" for p in new)                          # nothing of the dataset's touched
    monkeypatch.setattr(captioner_mod, "pretrain_captioner",
                        lambda *a, **k: pytest.fail("the cached captioner was pretrained again"))
    again, path2 = _captioner(cfg, train, "cpu", dataset_fingerprint(root))
    assert path2 == path and torch.equal(next(again.parameters()), next(cap.parameters()))
