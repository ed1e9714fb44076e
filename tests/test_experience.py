from mel_core import experience as E


def test_pairs_only_from_mixed_groups_and_seeded():
    groups = {"p1": [("a", 1.0), ("b", 0.0), ("c", 0.0)], "p2": [("d", 1.0), ("e", 1.0)], "p3": [("f", 0.0), ("g", 0.0)]}
    pairs = E.make_pairs(groups, 1, seed=7)
    assert len(pairs) == 1 and pairs[0].prompt_id == "p1" and pairs[0].correct_rollout_id == "a"
    assert pairs == E.make_pairs(groups, 1, seed=7)
    assert len(E.make_pairs(groups, 5, seed=7)) == 2  # only 2 distinct (correct, incorrect) combinations
    assert len(E.make_pairs(groups, 1, seed=7, strategy="all")) == 2
    chosen = {E.make_pairs(groups, 1, seed=s)[0].incorrect_rollout_id for s in range(20)}
    assert chosen == {"b", "c"}  # the seed really picks among the incorrect rollouts


def test_parse_tiny_format():
    text = ("Bifurcation: step 2\nCritique: 12+21=34 should be 12+21=33.\n"
            "Heuristic: If an addition passes a ten, then carry one to the tens.")
    p = E.parse_analysis(text, gold_answer="28", question="12+7*3-5")
    assert p.ok and p.bifurcation_step == 2 and p.critique.startswith("12+21")
    assert p.heuristics == ["If an addition passes a ten, then carry one to the tens."]


def test_parse_markdown_format():
    text = ("**Bifurcation point:** Step 3\n\n## Critique\nI dropped the sign.\n\n### Subject Heuristics\n"
            "1. If you subtract a larger number, then the result is negative.\n2. If a product follows a sum, then multiply first.")
    p = E.parse_analysis(text)
    assert p.ok and p.bifurcation_step == 3 and len(p.heuristics) == 2


def test_reject_reasons():
    q, gold = "12+7*3-5", "28"
    cases = {
        "Critique: x\nHeuristic: If a, then b.": "missing_bifurcation",
        "Bifurcation: step 1\nHeuristic: If a, then b.": "missing_critique",
        "Bifurcation: step 1\nCritique: x": "missing_heuristic",
        "Bifurcation: step 1\nCritique: x\nHeuristic: always carry.": "heuristic_not_if_then",
        "Bifurcation: step 1\nCritique: x\nHeuristic: If stuck, then answer 28.": "heuristic_leaks_answer",
        "Bifurcation: step 1\nCritique: x\nHeuristic: If you see 12, then add it.": "heuristic_has_problem_numbers",
    }
    for text, reason in cases.items():
        assert E.parse_analysis(text, gold_answer=gold, question=q).reject_reason == reason, text


def test_garbage_is_rejected_not_raised():
    for text in ["", "\x00\x01", "Bifurcation: step", "Heuristic:\n\n"]:
        assert not E.parse_analysis(text).ok


def test_acceptance_and_retention():
    assert E.accept([1.0], 1) and not E.accept([0.0], 1)
    assert E.accept([1.0, 0.0, 1.0], 2) and not E.accept([1.0, 0.0, 0.0], 2)
    assert E.retention_ratio(1, 4) == 0.25 and E.retention_ratio(0, 0) == 0.0


def test_disjoint_pairing_never_reuses_a_rollout():
    groups = {"p": [("c1", 1.0), ("c2", 1.0), ("w1", 0.0), ("w2", 0.0), ("w3", 0.0)]}
    pairs = E.make_pairs(groups, 0, seed=3, strategy="disjoint")
    used = [p.correct_rollout_id for p in pairs] + [p.incorrect_rollout_id for p in pairs]
    assert len(pairs) == 2 and len(used) == len(set(used))
    assert len(E.make_pairs(groups, 1, seed=3, strategy="disjoint")) == 1


def test_diagnosis_part_stops_before_the_heuristics():
    compact = "Bifurcation: step 2\nCritique: 3+9=11 should be 3+9=12.\nHeuristic: If a sum passes ten, then carry."
    assert E.diagnosis_part(compact) == "Bifurcation: step 2\nCritique: 3+9=11 should be 3+9=12."
    paper = ("<think>compare them</think>\n## Failure Point & Latent Cognitive Pattern\nBifurcation step: 3\nI dropped a sign.\n\n"
             "## Success Factors\nB kept the sign.\n\n## First-Person Reflective Summary\nI will check signs.\n\n"
             "## Subject Heuristics\n- If a term moves across the equals sign, then flip its sign.")
    part = E.diagnosis_part(paper)
    assert part.startswith("## Failure Point") and part.endswith("I will check signs.")
    assert "think" not in part and "Subject Heuristics" not in part
    assert E.parse_diagnosis(part).ok  # what two_pass conditions on still parses as s*, C
    only_diagnosis = "Bifurcation: step 1\nCritique: wrong order."
    assert E.diagnosis_part(only_diagnosis) == only_diagnosis
