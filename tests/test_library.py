"""The heuristic library: text features, incremental leader clustering, the heuristic_clusters view."""

import pytest

from mel_core.config import LibraryConfig
from mel_core.store import library
from mel_core.store.writer import Store

THRESHOLD = LibraryConfig().similarity_threshold

CARRY = "If an addition passes a ten, then carry one to the tens."
BORROW = "If a subtraction needs more ones than it has, then borrow one from the tens."
MINUS = "If a subtraction takes away more than it starts with, then keep the minus sign on the result."
TIMES_FIRST = "If a * comes after a + or -, then do the * step first."
COPY = "If a step uses an earlier result, then copy that result exactly."

PARAPHRASES = [  # (a, b): the same rule, reworded the way a model rewords it
    (CARRY, "When an addition goes past ten, carry a one to the tens place."),
    (CARRY, "Carry one to the tens if an addition passes a ten."),
    (CARRY, "if an addition passes ten then carry one into the tens"),
    (TIMES_FIRST, "If a * follows a + or a -, then do the * step first."),
    (COPY, "If a step reuses an earlier result, then copy the result exactly."),
    (MINUS, "If the subtraction takes away more than it starts with, keep the minus sign on the result"),
    ("If the problem has parentheses, evaluate the innermost parentheses first.",
     "If there are nested parentheses, then evaluate the innermost ones first."),
]
DIFFERENT = [  # (a, b): different rules, including ones that share their condition
    (CARRY, BORROW), (CARRY, MINUS), (BORROW, MINUS), (TIMES_FIRST, COPY), (COPY, MINUS),
    (MINUS, "If a subtraction takes away more than it starts with, then borrow one from the tens."),
    (CARRY, "If an addition passes a ten, then write the ones digit only."),
    ("If the problem has parentheses, evaluate the innermost parentheses first.",
     "If the problem asks for a probability, then count the favourable outcomes first."),
]


def test_features_are_deterministic_unit_vectors():
    v = library.features(CARRY)
    assert v.shape == (library.FEATURE_DIM,) and v.dtype.name == "float32"
    assert abs(float(v @ v) - 1.0) < 1e-5
    assert (library.features(CARRY) == v).all()
    assert library.similarity(CARRY, "IF AN ADDITION PASSES A TEN, THEN CARRY ONE TO THE TENS!") == pytest.approx(1.0)
    stems = library.content_words("carry carries carried pass passes passed one ones ten tens come comes coming")
    assert stems == ["carry"] * 3 + ["pass"] * 3 + ["on"] * 2 + ["ten"] * 2 + ["com"] * 3
    assert library.content_words("If a * comes after a + or -, then do it.") == ["*", "com", "after", "+", "-", "do"]


@pytest.mark.parametrize("a,b", PARAPHRASES)
def test_paraphrases_reach_the_threshold(a, b):
    assert library.similarity(a, b) >= THRESHOLD


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_different_rules_stay_below_the_threshold(a, b):
    assert library.similarity(a, b) < THRESHOLD


# ------------------------------------------------------------------------------ a hand-made store

# (heuristic_id, step, text, accepted); ids sort in the order the clustering visits them within a step.
STEP1 = [("h1a", 1, CARRY, True), ("h1b", 1, BORROW, False), ("h1c", 1, CARRY, False),
         ("h1d", 1, "When an addition goes past ten, carry a one to the tens place.", True)]
STEP2 = [("h2a", 2, BORROW, True), ("h2b", 2, MINUS, None), ("h2c", 2, "Carry one to the tens if an addition passes a ten.", True),
         ("h2d", 2, "If a subtraction needs more ones than it has, borrow one from the tens", True)]
INTERNALIZED = {"h1a", "h1d", "h2a"}  # h2c/h2d accepted, but their update has not run yet


def _store(path, rows, run_id="run1", internalized=INTERNALIZED) -> Store:
    s = Store(path)
    with s.transaction() as w:
        w.insert("heuristics", [{"heuristic_id": h, "run_id": run_id, "step": st, "text": t, "accepted": a,
                                 "analysis_id": f"a-{h}"} for h, st, t, a in rows])
        w.insert("internalized", [{"update_id": f"u{h[1]}", "heuristic_id": h, "analysis_id": f"a-{h}"}
                                  for h, *_ in rows if h in internalized])
    return s


def _assign(s: Store, run_id="run1", threshold=THRESHOLD) -> dict:
    with s.transaction() as w:
        return library.assign_clusters(w, run_id, threshold)


def _members(s: Store) -> dict[str, str]:
    return {r["heuristic_id"]: r["cluster_id"] for r in s.query("SELECT heuristic_id, cluster_id FROM heuristics")}


def test_step_by_step_clusters_and_counts_match_the_hand_computed_ones(tmp_path):
    s = _store(tmp_path / "m.duckdb", STEP1)
    out = _assign(s)
    assert out == {"assigned": 4, "new_clusters": 2, "clusters": 2, "reclustered": False}
    with s.transaction() as w:  # the next step's records arrive, then its abstract stage clusters them
        w.insert("heuristics", [{"heuristic_id": h, "run_id": "run1", "step": st, "text": t, "accepted": a}
                                for h, st, t, a in STEP2])
        w.insert("internalized", [{"update_id": "u2", "heuristic_id": "h2a", "analysis_id": "a-h2a"}])
    assert _assign(s) == {"assigned": 4, "new_clusters": 1, "clusters": 3, "reclustered": False}

    m = _members(s)
    carry, borrow, minus = m["h1a"], m["h1b"], m["h2b"]
    assert len({carry, borrow, minus}) == 3
    assert m["h1c"] == m["h1d"] == m["h2c"] == carry  # exact duplicate and two paraphrases
    assert m["h2a"] == m["h2d"] == borrow  # a later step's duplicate joins the earlier cluster
    founders = {r["cluster_id"]: r["founder_heuristic_id"] for r in s.query("SELECT * FROM library_clusters")}
    assert founders == {carry: "h1a", borrow: "h1b", minus: "h2b"}

    rows = {r["cluster_id"]: r for r in s.query("SELECT * FROM heuristic_clusters WHERE run_id = 'run1'")}
    got = {c: (r["produced"], r["accepted"], r["internalized"], r["steps"], r["first_step"], r["last_step"],
               r["distinct_texts"]) for c, r in rows.items()}
    assert got == {carry: (4, 3, 2, 2, 1, 2, 3),   # h1a h1c h1d h2c; accepted h1a h1d h2c; internalized h1a h1d
                   borrow: (3, 2, 1, 2, 1, 2, 2),  # h1b h2a h2d; accepted h2a h2d; internalized h2a
                   minus: (1, 0, 0, 1, 2, 2, 1)}
    assert rows[carry]["representative"] == CARRY  # accepted once, like the paraphrases, but produced twice
    assert rows[borrow]["representative"] == BORROW  # accepted once, like the comma-less variant, but produced twice
    assert rows[minus]["representative"] == MINUS


def test_reruns_are_noops_and_ids_do_not_depend_on_how_steps_arrived(tmp_path):
    s = _store(tmp_path / "a.duckdb", STEP1)
    _assign(s)
    with s.transaction() as w:
        w.insert("heuristics", [{"heuristic_id": h, "run_id": "run1", "step": st, "text": t, "accepted": a}
                                for h, st, t, a in STEP2])
    _assign(s)
    before = (_members(s), s.query("SELECT * FROM library_clusters ORDER BY cluster_id"))
    assert _assign(s) == {"assigned": 0, "new_clusters": 0, "clusters": 3, "reclustered": False}
    assert (_members(s), s.query("SELECT * FROM library_clusters ORDER BY cluster_id")) == before

    other = _store(tmp_path / "b.duckdb", STEP1 + STEP2)  # all at once, in another file
    _assign(other)
    assert _members(other) == before[0]

    # another run in the same file is clustered on its own (same texts, its own clusters)
    with other.transaction() as w:
        w.insert("heuristics", [{"heuristic_id": "x" + h, "run_id": "run2", "step": st, "text": t}
                                for h, st, t, _ in STEP1])
    assert _assign(other, "run2")["new_clusters"] == 2
    assert _members(other)["xh1a"] is not None and _members(other)["xh1a"] not in set(before[0].values())


def test_a_new_threshold_reclusters_the_run_under_new_ids(tmp_path):
    s = _store(tmp_path / "m.duckdb", STEP1 + STEP2)
    _assign(s)
    old = _members(s)
    out = _assign(s, threshold=0.99)  # only texts equal up to template words and case stay together
    assert out["reclustered"] and out["assigned"] == 8
    new = _members(s)
    assert not set(new.values()) & set(old.values())
    assert new["h1a"] == new["h1c"] and new["h1a"] != new["h1d"]
    assert {r["method"] for r in s.query("SELECT method FROM library_clusters")} == {library.signature(0.99)}
    assert s.query("SELECT sum(produced) AS n FROM heuristic_clusters")[0]["n"] == 8


def test_run_threshold_reads_the_runs_config():
    assert library.run_threshold('{"library": {"similarity_threshold": 0.9}}', 0.7) == 0.9
    assert library.run_threshold('{"run": {}}', 0.7) == 0.7  # written before the library existed
    assert library.run_threshold(None, 0.7) == 0.7
