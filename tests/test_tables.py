"Tables regenerate byte for byte from run metrics; paper and measured numbers stay in separate columns."
from pathlib import Path

import numpy as np
import pytest

from t2i_nb.tables import SYNTH_STUDY, collect_runs, compare, paper_table, study_table, write_fake_run, write_tables

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("table1_cub.md", "table2_coco.md", "table_synthbirds.md", "synthbirds_stats.csv")


def test_committed_tables_are_regenerated_identically_from_committed_metrics(tmp_path):
    paths = write_tables(ROOT / "results", tmp_path)
    for name in TABLES:
        assert (ROOT / "results" / name).exists(), f"results/{name} is not committed"
        assert paths[name].read_text() == (ROOT / "results" / name).read_text(), f"results/{name} is stale: run nbs/tables.ipynb"


def test_committed_synthbirds_study_has_every_row_with_the_same_five_seeds():
    ("Every row of the study (every architecture, and the two_cap controls) shares seeds 100-104, one set of "
     "pretrained assets (one evaluator) and one independent retrieval pair.")
    runs = collect_runs(ROOT / "results")
    study = runs[runs.study == SYNTH_STUDY]
    seeds = study.groupby(["arch", "loss"]).seed.apply(lambda s: tuple(sorted(set(s))))
    rows = [("ssagan", "none"), ("ssagan", "f2f"), ("attngan", "attngan"),
            ("attngan", "attngan_cl"), ("style1_attngan", "style1_attngan"),
            ("style1_attngan", "style1_attngan_f2f"), ("style2_attngan", "style2_attngan_r2f"),
            ("ssagan", "two_cap"), ("attngan", "two_cap")]
    assert dict(seeds) == {r: (100, 101, 102, 103, 104) for r in rows}
    import json
    results = [m for p in (ROOT / "results" / SYNTH_STUDY).glob("*/metrics.json") for m in json.loads(p.read_text())]
    hashes = lambda metric, key: {m.get(key) for m in results if m["metric"] == metric}
    assert len(hashes("fid_sb_1k_test", "weights_hash")) == 1 and None not in hashes("fid_sb_1k_test", "weights_hash")
    pair = hashes("rprec_100_indep", "pair_encoder_hash")
    assert len(pair) == 1 and None not in pair
    assert sum(m["metric"] == "rprec_100_indep" for m in results) == 45


NEW = {"rprec_100_heldout": {"protocol_shuffled_folds": True}, "rprec_100_train": {"protocol_shuffled_folds": True},
       "consistency_sb": {"protocol_negatives": "another species' caption, same noise"}}


@pytest.fixture
def study(tmp_path):
    rng = np.random.default_rng(0)
    vals = {}
    for loss in ("none", "f2f_r2f"):
        for seed in (1, 2, 3):
            v = dict(fid_sb_1k_test=rng.uniform(5, 9), is_sb_1k=rng.uniform(8, 10), rprec_100_heldout=rng.uniform(0.1, 0.3),
                     semantic_acc_sb=rng.uniform(0.4, 0.7), consistency_sb=rng.uniform(0.2, 0.4))
            write_fake_run(tmp_path / SYNTH_STUDY / f"ssagan-{loss}-s{seed}", v, loss=loss, seed=seed, protocol=NEW)
            vals.setdefault(loss, []).append(v)
    write_fake_run(tmp_path / "runs" / "coco-run", dict(fid_clean_30k_test=20.0, rprec_100_train=0.9), dataset="coco", loss="r2f",
                   protocol=NEW)
    return tmp_path, vals


def test_study_table_cells_are_mean_and_sample_std_over_seeds(study):
    root, vals = study
    lines = study_table(collect_runs(root), SYNTH_STUDY).splitlines()
    assert lines[0].startswith("| architecture | loss preset | seeds |")
    rows = {r.split(" | ")[1]: r.split(" | ")[1:] for r in lines[2:]}
    assert all(r.startswith("| ssagan | ") for r in lines[2:])
    for loss, runs in vals.items():
        fid = np.array([r["fid_sb_1k_test"] for r in runs]); rp = np.array([r["rprec_100_heldout"] for r in runs]) * 100
        assert rows[loss][1] == "3"
        assert rows[loss][2].strip("*") == f"{fid.mean():.2f} ± {fid.std(ddof=1):.2f}"
        assert rows[loss][4].strip("*") == f"{rp.mean():.1f} ± {rp.std(ddof=1):.1f}"
    best_fid = min(vals, key=lambda l: np.mean([r["fid_sb_1k_test"] for r in vals[l]]))
    assert rows[best_fid][2].startswith("**") and not rows[({"none", "f2f_r2f"} - {best_fid}).pop()][2].startswith("**")


def test_paper_numbers_and_measured_numbers_never_share_a_column(study):
    root, _ = study
    t2 = paper_table(collect_runs(root), "table2_coco").splitlines()
    header = t2[2].split(" | ")
    assert header[1:4] == ["paper IS ↑", "paper FID ↓", "paper R-prec % ↑"]
    assert header[4:6] == ["measured FID ↓ `fid_clean_30k_test`", "measured R-prec % ↑ `rprec_100_train`"]
    r2f = next(l for l in t2 if l.startswith("| SSAGAN + CL (R2F) ")).split(" | ")
    assert r2f[1:6] == ["7.6", "12.08", "85.20", "20.00 (n=1)", "90.00 (n=1)"]
    none = next(l for l in t2 if l.startswith("| SSAGAN | ")).split(" | ")
    assert none[4:6] == ["—", "—"]


def test_tables_notebook_writes_the_same_files_as_the_library(study, tmp_path_factory, papermill):
    root, _ = study
    out_nb, out_lib = tmp_path_factory.mktemp("nb"), tmp_path_factory.mktemp("lib")
    r = papermill("tables", out_nb / "t.ipynb", root=root, out_dir=out_nb)
    assert r.returncode == 0, r.stderr[-3000:]
    write_tables(root, out_lib)
    for name in TABLES: assert (out_nb / name).read_text() == (out_lib / name).read_text()
    assert (out_nb / "synthbirds_metrics.png").stat().st_size > 10_000


def test_a_corrupt_metrics_file_is_named(tmp_path):
    run = write_fake_run(tmp_path / "r", {"fid_sb_1k_test": 1.0})
    (run / "metrics.json").write_text("[{")
    with pytest.raises(ValueError, match=r"r/metrics.json is not valid JSON"):
        collect_runs(tmp_path)


def test_comparisons_use_welch_and_the_architectures_own_baseline(study):
    from scipy import stats
    root, vals = study
    cmp = compare(collect_runs(root), SYNTH_STUDY).set_index(["metric", "loss"])
    a = [r["semantic_acc_sb"] * 100 for r in vals["f2f_r2f"]]; b = [r["semantic_acc_sb"] * 100 for r in vals["none"]]
    row = cmp.loc[("semantic_acc_sb", "f2f_r2f")]
    assert row.baseline == "none" and row.n == row.n_baseline == 3
    assert row.p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    half = stats.t.ppf(0.975, 2) * np.std(a, ddof=1) / np.sqrt(3)
    assert (row.ci_low, row.ci_high) == pytest.approx((np.mean(a) - half, np.mean(a) + half), rel=1e-12)


def test_a_metric_measured_under_a_superseded_protocol_gets_its_own_column(tmp_path):
    write_fake_run(tmp_path / "s" / "ssagan-none-s1", {"consistency_sb": 0.3})                      # first release
    write_fake_run(tmp_path / "s" / "ssagan-f2f-s1", {"consistency_sb": 0.1}, loss="f2f", protocol=NEW)
    header = study_table(collect_runs(tmp_path), "s").splitlines()[0]
    assert "`consistency_sb@v0`" in header and "`consistency_sb`" in header


def test_an_f2f_row_is_also_compared_with_its_two_cap_control(tmp_path):
    from scipy import stats
    vals = {"none": (0.50, 0.55, 0.52), "f2f": (0.70, 0.66, 0.71), "two_cap": (0.64, 0.60, 0.69), "r2f": (0.6, 0.5, 0.55)}
    for loss, vs in vals.items():
        for seed, v in zip((100, 101, 102), vs):
            write_fake_run(tmp_path / "s" / f"ssagan-{loss}-s{seed}", {"semantic_acc_sb": v}, loss=loss, seed=seed,
                           protocol=NEW)
    cmp = compare(collect_runs(tmp_path), "s").set_index("loss")
    f = cmp.loc["f2f"]
    assert f.control == "two_cap" and f.n_control == 3
    assert f.diff_control == pytest.approx(100 * (np.mean(vals["f2f"]) - np.mean(vals["two_cap"])), rel=1e-12)
    assert f.p_control == pytest.approx(stats.ttest_ind(vals["f2f"], vals["two_cap"], equal_var=False).pvalue, rel=1e-9)
    assert cmp.loc["r2f"].n_control == 0 and cmp.loc["two_cap"].n_control == 0 and cmp.loc["two_cap"].baseline == "none"
