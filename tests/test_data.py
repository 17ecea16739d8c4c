"Data layer: the CUB/COCO loader on fixtures in the official format, and SynthBirds."
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_nb.data import (CorruptImageError, DataLayoutError, TextImageDataset, VocabMismatchError, check_vocab_size,
                         cub_crop_box, epoch_loader, mismatch_index, sample_words, write_fixture)
from t2i_nb.synthbirds import ATTRIBUTES, parse_caption, read_attributes


@pytest.fixture
def cub(tmp_path):
    return write_fixture(tmp_path / "birds", "cub", n_train=8, n_test=4)


@pytest.fixture
def coco(tmp_path):
    return write_fixture(tmp_path / "coco", "coco", n_train=5, n_test=3)


def test_captions_pickle_built_in_official_format(cub):
    ds = TextImageDataset(cub, "train")
    with open(cub / "captions.pickle", "rb") as f: train, test, i2w, w2i = pickle.load(f)
    assert len(train) == 8 * 10 and len(test) == 4 * 10
    assert i2w[0] == "<end>" and w2i["<end>"] == 0 and all(i2w[w2i[w]] == w for w in w2i)
    key0 = ds.keys[0]
    lines = [l for l in (cub / "text" / f"{key0}.txt").read_text().splitlines() if l.strip()]
    assert [i2w[t] for t in train[3]] == lines[3].split()      # caption j of image i at i*C + j


def test_cub_item_image_range_size_and_crop(cub):
    ds = TextImageDataset(cub, "test", img_size=32)
    it = ds[1]
    assert it["img"].shape == (3, 32, 32) and it["img"].dtype == torch.float32
    assert -1 <= it["img"].min() and it["img"].max() <= 1
    # the fixture's bbox is (36, 22.5, 48, 45) on 120x90 images: r = 36 around (60, 45) -> clipped to 24..96 x 9..81
    assert cub_crop_box((36.0, 22.5, 48.0, 45.0), 120, 90) == (24, 9, 96, 81)
    assert ds.load(1).size == (72, 72)
    raw = Image.open(ds.image_path(ds.keys[1])).convert("RGB")
    assert np.array_equal(np.asarray(ds.load(1)), np.asarray(raw.crop((24, 9, 96, 81))))


def test_test_transform_is_deterministic_train_is_random(cub):
    te, tr = TextImageDataset(cub, "test", img_size=32), TextImageDataset(cub, "train", img_size=32)
    assert torch.equal(te[0]["img"], te[0]["img"])
    imgs = []
    for e in range(6):
        tr.set_epoch(e); imgs.append(tr[0]["img"])
    assert any(not torch.equal(imgs[0], x) for x in imgs[1:])


def test_caption_ids_lengths_and_word_dropping(cub):
    ds = TextImageDataset(cub, "train", words_num=6)
    for i in range(len(ds)):
        it = ds[i]
        full = [t for t in ds.caption_ids(i, it["cap_index"]) if t != 0]
        kept = it["caption"][:it["cap_len"]].tolist()
        assert it["cap_len"] == min(len(full), 6) and (it["caption"][it["cap_len"]:] == 0).all()
        pos, k = [], 0                                        # kept words are an ordered subsequence
        for w in kept:
            k = full.index(w, k); pos.append(k); k += 1
        assert pos == sorted(pos)
    long_caps = [i for i in range(len(ds)) if len(ds.caption_ids(i, ds[i]["cap_index"])) > 6]
    assert long_caps, "fixture should contain captions longer than words_num"


def test_word_dropping_is_not_truncation():
    rng = np.random.default_rng(1)
    outs = [tuple(sample_words(list(range(1, 21)), 5, rng)[0]) for _ in range(20)]
    assert len(set(outs)) > 10                                 # random subsets, not the first 5 words
    assert all(list(o) == sorted(o) and max(o) <= 20 for o in outs)


def test_two_distinct_captions(cub):
    ds = TextImageDataset(cub, "train", two_captions=True)
    for i in range(len(ds)):
        it = ds[i]
        assert it["cap_index"] != it["cap_index2"] and it["caption2"].shape == it["caption"].shape


def test_empty_and_oov_captions_become_one_end_token(cub):
    ds = TextImageDataset(cub, "train")
    ds.captions[0:ds.C] = [[] for _ in range(ds.C)]          # image 0: every caption empty / all OOV
    it = ds[0]
    assert it["cap_len"] == 1 and (it["caption"] == 0).all()


def test_class_aware_mismatch_in_a_batch(cub):
    ds = TextImageDataset(cub, "train")
    batch = next(iter(epoch_loader(ds, batch_size=6, epoch=0, seed=0)))
    c = batch["class_id"]
    m = mismatch_index(c)
    assert (c[m] != c).all() and (m != torch.arange(6)).all()
    c1 = torch.tensor([4, 4, 4, 9])
    assert mismatch_index(c1).tolist() == [3, 3, 3, 0]


def test_loader_order_is_fixed_by_seed_and_epoch(cub):
    ds = TextImageDataset(cub, "train")
    k = lambda e, s: next(iter(epoch_loader(ds, 4, epoch=e, seed=s)))["index"].tolist()
    assert k(0, 0) == k(0, 0) and (k(0, 0) != k(1, 0) or k(0, 0) != k(2, 0))


def test_multi_resolution_output(cub):
    it = TextImageDataset(cub, "train", img_size=64, resolutions=(16, 32, 64))[0]
    assert [x.shape[-1] for x in it["imgs"]] == [16, 32, 64] and torch.equal(it["imgs"][-1], it["img"])


def test_coco_layout_detected_with_five_captions(coco, tmp_path):
    ds = TextImageDataset(coco, "train", img_size=32)
    assert ds.kind == "coco" and ds.C == 5 and len(ds.captions) == 25
    assert ds[0]["img"].shape == (3, 32, 32)
    assert (ds.class_ids == np.arange(5)).all()              # no class_info.pickle: each image its own class
    moved = tmp_path / "elsewhere"
    (coco / "images").rename(moved)
    ds2 = TextImageDataset(coco, "train", image_dir=moved)   # configurable image folder, no hard-coded paths
    assert ds2[0]["img"].shape == (3, 64, 64)


def test_coco_dfgan_subfolders(coco):
    (coco / "images" / "train2014").mkdir()
    for p in list((coco / "images").glob("COCO_train*.jpg")): p.rename(coco / "images" / "train2014" / p.name)
    ds = TextImageDataset(coco, "train")
    assert ds.image_path(ds.keys[0]).parent.name == "train2014" and ds[0]["img"].shape[0] == 3


def test_missing_files_name_path_and_layout(cub, tmp_path):
    with pytest.raises(DataLayoutError, match="does not exist"): TextImageDataset(tmp_path / "nope")
    (cub / "test" / "filenames.pickle").unlink()
    with pytest.raises(DataLayoutError, match=r"test/filenames.pickle(.|\n)*expected the AttnGAN layout"):
        TextImageDataset(cub, "test")


def test_missing_image_and_corrupt_image_name_the_file(cub):
    ds = TextImageDataset(cub, "train")
    p = ds.image_path(ds.keys[2])
    p.write_bytes(p.read_bytes()[:200])                      # truncated JPEG
    with pytest.raises(CorruptImageError, match=str(p.name)): ds[2]
    ds.image_path(ds.keys[3]).unlink()
    with pytest.raises(DataLayoutError, match="missing image"): ds[3]


def test_vocab_mismatch_reports_both_numbers():
    with pytest.raises(VocabMismatchError, match="5,450 words but text_encoder100.pth has 27,297"):
        check_vocab_size(5450, 27297, "text_encoder100.pth")


def test_synth_birds_round_trip_through_cub_loader(synth_birds):
    ds = TextImageDataset(synth_birds, "train", img_size=64, two_captions=True)
    te = TextImageDataset(synth_birds, "test", img_size=64)
    assert ds.kind == "cub" and len(ds) == 120 and len(te) == 40 and ds.C == 10
    assert len(set(ds.class_ids)) > 10
    it = ds[5]
    assert it["img"].shape == (3, 64, 64) and it["img"].min() >= -1 and it["img"].max() <= 1
    assert not torch.equal(it["caption"], it["caption2"])
    assert set(ds.keys).isdisjoint(te.keys)


def test_synth_birds_attributes_agree_with_captions(synth_birds):
    attrs = read_attributes(synth_birds)
    assert list(attrs.columns[:2]) == ["split", "class_id"] and len(attrs) == 160
    for split in ("train", "test"):
        ds = TextImageDataset(synth_birds, split)
        n_said = 0
        for i in range(len(ds)):
            truth = attrs.loc[ds.keys[i]]
            assert truth["class_id"] == ds.class_ids[i]
            for j in range(ds.C):
                said = parse_caption(ds.decode(ds.caption_ids(i, j)).split())
                assert 2 <= len(said) <= 4
                for a, v in said.items():
                    assert v in ATTRIBUTES[a] and truth[a] == v, (ds.keys[i], j, a, v)
                n_said += len(said)
        assert n_said > 0


def test_synth_birds_is_deterministic(tmp_path):
    from t2i_nb.synthbirds import make_synth_birds
    a = make_synth_birds(tmp_path / "a", n_train=6, n_test=2, seed=3, progress=False)
    b = make_synth_birds(tmp_path / "b", n_train=6, n_test=2, seed=3, progress=False)
    c = make_synth_birds(tmp_path / "c", n_train=6, n_test=2, seed=4, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "attributes.csv").read_text() != (c / "attributes.csv").read_text()
