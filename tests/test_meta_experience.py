"""Parsing M = (s*, C, H): the compact layout, reject reasons, M*, rendering, and the fixture corpus."""

from mel_core import meta_experience as M


def test_parse_tiny_format():
    text = ("Bifurcation: step 2\nCritique: 12+21=34 should be 12+21=33.\n"
            "Heuristic: If an addition passes a ten, then carry one to the tens.")
    p = M.parse_analysis(text, gold_answer="28", question="12+7*3-5")
    assert p.ok and p.bifurcation_step == 2 and p.critique.startswith("12+21")
    assert p.heuristics == ["If an addition passes a ten, then carry one to the tens."]


def test_parse_markdown_format():
    text = ("**Bifurcation point:** Step 3\n\n## Critique\nI dropped the sign.\n\n### Subject Heuristics\n"
            "1. If you subtract a larger number, then the result is negative.\n2. If a product follows a sum, then multiply first.")
    p = M.parse_analysis(text)
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
        assert M.parse_analysis(text, gold_answer=gold, question=q).reject_reason == reason, text


def test_garbage_is_rejected_not_raised():
    for text in ["", "\x00\x01", "Bifurcation: step", "Heuristic:\n\n"]:
        assert not M.parse_analysis(text).ok


def test_diagnosis_part_stops_before_the_heuristics():
    compact = "Bifurcation: step 2\nCritique: 3+9=11 should be 3+9=12.\nHeuristic: If a sum passes ten, then carry."
    assert M.diagnosis_part(compact) == "Bifurcation: step 2\nCritique: 3+9=11 should be 3+9=12."
    paper = ("<think>compare them</think>\n## Failure Point & Latent Cognitive Pattern\nBifurcation step: 3\nI dropped a sign.\n\n"
             "## Success Factors\nB kept the sign.\n\n## First-Person Reflective Summary\nI will check signs.\n\n"
             "## Subject Heuristics\n- If a term moves across the equals sign, then flip its sign.")
    part = M.diagnosis_part(paper)
    assert part.startswith("## Failure Point") and part.endswith("I will check signs.")
    assert "think" not in part and "Subject Heuristics" not in part
    assert M.parse_diagnosis(part).ok  # what two_pass conditions on still parses as s*, C
    only_diagnosis = "Bifurcation: step 1\nCritique: wrong order."
    assert M.diagnosis_part(only_diagnosis) == only_diagnosis
