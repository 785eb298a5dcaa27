"""stmae_research.provenance: when two parts of a results file count as the same code."""

from __future__ import annotations

import pytest

from stmae_research.provenance import ProvenanceError, require_same_code, same_code


def test_same_code_needs_one_commit_and_clean_trees():
    a = {"commit": "c1", "dirty": False, "code_revision": "r1"}
    assert same_code(a, dict(a))
    assert not same_code(a, {**a, "commit": "c2"})
    assert not same_code(a, {**a, "dirty": True})
    assert not same_code(None, a) and not same_code(a, {})
    # without git the package's code revisions decide
    assert same_code({"commit": None, "code_revision": "r1"}, {"commit": None, "code_revision": "r1"})
    assert not same_code({"commit": None, "code_revision": "r1"}, {"commit": None, "code_revision": "r2"})


def test_require_same_code_says_which_code_made_each_side():
    here = {"commit": "b" * 40, "dirty": False}
    require_same_code(dict(here), here, "x")  # same: no error
    with pytest.raises(ProvenanceError, match=r"^f\.json: part 'a' was made at commit aaaaaaaaaa; "
                                                         r"this run is at commit bbbbbbbbbb\. .*commit your changes"):
        require_same_code({"commit": "a" * 40}, here, "f.json: part 'a'")
    with pytest.raises(ProvenanceError, match="records no provenance"):
        require_same_code(None, here, "f.json: part 'a'")
    with pytest.raises(ProvenanceError, match=r"this run has uncommitted changes \(src/stmae/x.py\)"):
        require_same_code(dict(here), {**here, "dirty": True, "modified": ["src/stmae/x.py"]}, "p")
    assert issubclass(ProvenanceError, ValueError)
