"""scripts/diagnose_demo_model.py: where a synthetic-shapes model fails (naming, painting,
listing what it sees), run on the shipped demo model."""
from __future__ import annotations

import re

import pytest

from lisa_kit.api import DEMO_MODEL_DIR


@pytest.fixture(scope="module")
def script(repo_script):
    return repo_script("scripts/diagnose_demo_model.py")


def test_listing_report_separates_colours_kinds_and_names(script):
    lists = [(["the blue square", "the red circle"], ["the blue circle", "the red circle"]),  # kind wrong
             (["the red circle"], ["the red circle"]),                                         # exact
             (["the red circle", "the red circle", "the green square"], ["the red circle"])]  # extras
    out = script.listing_report(lists)
    assert "lists exactly the image's shapes: 1/3" in out
    assert "colours right 0.67" in out and "kinds right 0.33" in out  # the first list: colours only
    # 3 of the 6 names said are true (a repeated name counts once per true shape); 3 of 4 true found
    assert "precision 0.50" in out and "recall 0.75" in out
    # what a model may write instead of a name: each is a wrong entry, never an error
    odd = script.listing_report([(["the", "", "blue", "the big red square"], ["the blue square"])])
    assert "0/1; colours right 0.00, kinds right 0.00" in odd and "precision 0.00" in odd


def test_the_demo_model_is_diagnosed_per_family(script, capsys, one_thread):
    if not (DEMO_MODEL_DIR / "recipe.yaml").exists():
        pytest.skip("no demo model installed")
    assert script.main(["--checkpoint", str(DEMO_MODEL_DIR), "--images", "3", "--show", "1"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+(\d+)\s+[\d.]+\s+[\d.]+", out, re.M)}
    assert rows.pop("all") == sum(rows.values()) > 0
    assert re.search(r"lists exactly the image's shapes: \d/3; colours right [\d.]+, kinds right", out)
    # the mask under teacher-forced names: rates in [0, 1] and the misses counted by kind
    m = re.search(r"mask under a given name \((\d+) questions\): given_right ([\d.]+), given_other ([\d.]+), "
                  r"other_paints_answer ([\d.]+); masks missing the given name paint: (.+)$", out, re.M)
    assert m and int(m.group(1)) > 0 and all(0 <= float(m.group(i)) <= 1 for i in (2, 3, 4))
    assert m.group(5) == "none" or re.fullmatch(r"((same kind|same colour|another|nothing) \d+(, )?)+", m.group(5))
