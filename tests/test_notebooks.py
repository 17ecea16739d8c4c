"""The notebooks are the documentation: each component notebook is committed with its outputs (a figure or a table of
its component at work), deterministic text (no machine paths), and the whole folder stays small."""
import json, re
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parents[1] / "nbs"
COMPONENTS = sorted(NBS.glob("[0-9]*.ipynb"))


def outputs(nb: Path) -> list[dict]:
    return [o for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def test_there_are_component_notebooks():
    assert len(COMPONENTS) >= 18


@pytest.mark.parametrize("nb", COMPONENTS, ids=lambda p: p.stem)
def test_component_notebook_is_committed_with_outputs(nb):
    outs = outputs(nb)
    assert outs, f"{nb.name} is committed without outputs: run `python -m t2i_nb.docs execute` and commit it"
    rich = [o for o in outs if {"image/png", "text/html", "text/markdown", "image/svg+xml"} & set(o.get("data", {}))]
    assert rich, f"{nb.name} shows no figure or table of its component at work"
    text = json.dumps(outs)
    assert not re.search(r"(/tmp/|/root/|/home/|/work/)", text), f"{nb.name}: a machine path in its outputs"
    assert not any(o.get("output_type") == "error" for o in outs), f"{nb.name}: an error is committed in its outputs"


def test_notebooks_folder_stays_small():
    size = sum(p.stat().st_size for p in NBS.glob("*.ipynb"))
    assert size < 15 * 2**20, f"nbs/ holds {size / 2**20:.1f} MB of notebooks (limit 15 MB)"


@pytest.mark.parametrize("nb", sorted(NBS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_notebook_shows_its_outputs(nb):
    "Experiment notebooks too: each is committed as executed (the main job, the study, the tables, the pretraining)."
    outs = outputs(nb)
    assert outs, f"{nb.name} is committed without outputs"
    assert not re.search(r"(/tmp/|/root/|/home/)", json.dumps(outs)), f"{nb.name}: a machine path in its outputs"
