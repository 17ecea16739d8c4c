"Tests of t2i_nb.cost: FLOPs counted on fake tensors against hand formulas, scaling in batch, presets, run arithmetic."
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from t2i_nb.cost import (N_TRAIN, TFLOPS, cost_plan, cost_table, flops_per_iteration, iterations, lstm_flops)
from t2i_nb.ssagan import SSAGenerator
from t2i_nb.config import TRAIN_PRESETS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Small models: one torch thread is faster on a shared, busy CPU."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = replace(TRAIN_PRESETS["synth_birds"], batch_size=2)     # 64 px, ngf/ndf 16, small DAMSM encoders


@pytest.fixture(scope="module")
def small_counts():
    "FLOPs of small iterations, shared by the tests (each count takes a second or two)."
    return {(loss, b): flops_per_iteration(replace(SMALL, batch_size=b), loss)
            for loss, b in (("none", 2), ("f2f", 2), ("none", 4))}


def _fake_count(make_layer, x_shape, backward: bool = False) -> int:
    "FLOPs of a layer on fake tensors (what flops_per_iteration relies on), forward and optionally backward."
    with FakeTensorMode(), FlopCounterMode(display=False) as fc:
        layer, x = make_layer(), torch.empty(*x_shape, requires_grad=backward)
        y = layer(x)
        if backward: y.sum().backward()
    return fc.get_total_flops()


def test_conv_and_linear_match_2_macs():
    B, ci, co, k, H = 3, 5, 7, 3, 16
    conv = lambda: nn.Conv2d(ci, co, k, padding=1)
    macs = B * co * H * H * ci * k * k                        # one multiply-add per output element per kernel tap
    assert _fake_count(conv, (B, ci, H, H)) == 2 * macs
    assert _fake_count(conv, (B, ci, H, H), backward=True) == 3 * 2 * macs   # + grad input + grad weight
    lin = lambda: nn.Linear(10, 6)
    assert _fake_count(lin, (4, 10)) == 2 * 4 * 10 * 6
    conv_s2 = lambda: nn.Conv2d(ci, co, 4, stride=2, padding=1, bias=False)           # D's down-sampling conv
    assert _fake_count(conv_s2, (B, ci, H, H)) == 2 * B * co * (H // 2) ** 2 * ci * 16


def test_lstm_formula():
    rnn = nn.LSTM(300, 128, batch_first=True, bidirectional=True)
    assert lstm_flops(rnn, 4, 18) == 2 * (2 * 4 * 128 * (300 + 128)) * 4 * 18


def test_parts_add_up_and_generator_is_three_forwards(small_counts):
    f = small_counts[("none", 2)]
    assert sum(f["parts"].values()) == f["total"] and all(v >= 0 for v in f["parts"].values())
    assert set(f["steps"]) == {"D update 1", "D update 2", "G update 1"}
    G = SSAGenerator(SMALL.ngf, 100, SMALL.img_size, 256, 1.0)
    with FlopCounterMode(display=False) as fc, torch.no_grad(): G(torch.randn(2, 100), torch.randn(2, 256))
    fwd = fc.get_total_flops()                                # an independent, real forward of the same generator
    # one forward for all rows, then backward = grad input + grad weight = 2 forwards
    # (the first layer's input needs no gradient)
    assert f["parts"]["generator"] == pytest.approx(3 * fwd, rel=0.02)


def test_linear_in_batch(small_counts):
    r = small_counts[("none", 4)]["total"] / small_counts[("none", 2)]["total"]
    assert r == pytest.approx(2, rel=0.02)


def test_f2f_costs_more_than_none(small_counts):
    none, f2f = small_counts[("none", 2)], small_counts[("f2f", 2)]
    assert f2f["total"] > none["total"]
    assert f2f["parts"]["generator"] == pytest.approx(2 * none["parts"]["generator"], rel=0.01)   # 2N generator rows
    assert f2f["parts"]["image_encoder"] > none["parts"]["image_encoder"]


def test_recaptioning_preset_is_refused():
    with pytest.raises(ValueError, match="captioner"): flops_per_iteration(SMALL, "f2f_r2f_cap")


def test_cost_plan_arithmetic():
    cfg = replace(TRAIN_PRESETS["cub_paper"])
    assert iterations(cfg, N_TRAIN["cub"]) == 600 * (8855 // 24) == 220_800
    plan = cost_plan(cfg, N_TRAIN["cub"], tflops=40.0, flops=dict(total=25e12, parts={}))
    assert plan["iterations"] == 220_800
    assert plan["total_pflop"] == pytest.approx(25e12 * 220_800 / 1e15)
    assert plan["gpu_hours"] == pytest.approx(25e12 * 220_800 / 40e12 / 3600)      # 38,333 h
    assert TFLOPS == {"bf16": 100.0, "tf32": 40.0}


def test_cost_table_rows():
    rows = cost_table([("demo", "synth_birds", "none")], {"a": 1.0, "b": 2.0}, {"synth_birds": 100}).splitlines()
    assert len(rows) == 3 and rows[0].count("|") == rows[2].count("|") == 10
    h1, h2 = (float(c.replace(",", "")) for c in rows[2].strip("| ").split(" | ")[-2:])
    assert h1 == pytest.approx(2 * h2, rel=0.01)             # hours halve when the throughput doubles
