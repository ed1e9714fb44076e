"""Parsing M = (s*, C, H): the compact layout, reject reasons, M*, rendering, and the fixture corpus."""

import json
from pathlib import Path

import pytest

from mel_core.algorithm import meta_experience


def test_parse_tiny_format():
    text = ("Bifurcation: step 2\nCritique: 12+21=34 should be 12+21=33.\n"
            "Heuristic: If an addition passes a ten, then carry one to the tens.")
    p = meta_experience.parse_analysis(text, gold_answer="28", question="12+7*3-5")
    assert p.ok and p.bifurcation_step == 2 and p.critique.startswith("12+21")
    assert p.heuristics == ["If an addition passes a ten, then carry one to the tens."]


def test_parse_markdown_format():
    text = ("**Bifurcation point:** Step 3\n\n## Critique\nI dropped the sign.\n\n### Subject Heuristics\n"
            "1. If you subtract a larger number, then the result is negative.\n2. If a product follows a sum, then multiply first.")
    p = meta_experience.parse_analysis(text)
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
        assert meta_experience.parse_analysis(text, gold_answer=gold, question=q).reject_reason == reason, text


def test_garbage_is_rejected_not_raised():
    for text in ["", "\x00\x01", "Bifurcation: step", "Heuristic:\n\n"]:
        assert not meta_experience.parse_analysis(text).ok


def test_diagnosis_part_stops_before_the_heuristics():
    compact = "Bifurcation: step 2\nCritique: 3+9=11 should be 3+9=12.\nHeuristic: If a sum passes ten, then carry."
    assert meta_experience.diagnosis_part(compact) == "Bifurcation: step 2\nCritique: 3+9=11 should be 3+9=12."
    paper = ("<think>compare them</think>\n## Failure Point & Latent Cognitive Pattern\nBifurcation step: 3\nI dropped a sign.\n\n"
             "## Success Factors\nB kept the sign.\n\n## First-Person Reflective Summary\nI will check signs.\n\n"
             "## Subject Heuristics\n- If a term moves across the equals sign, then flip its sign.")
    part = meta_experience.diagnosis_part(paper)
    assert part.startswith("## Failure Point") and part.endswith("I will check signs.")
    assert "think" not in part and "Subject Heuristics" not in part
    assert meta_experience.parse_diagnosis(part).ok  # what two_pass conditions on still parses as s*, C
    only_diagnosis = "Bifurcation: step 1\nCritique: wrong order."
    assert meta_experience.diagnosis_part(only_diagnosis) == only_diagnosis


# --------------------------------------------------------------------------- the fixture corpus

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "analyses"


def load_fixtures() -> list[dict]:
    """[{name, text, question, gold_answer, max_heuristics, expect}] from tests/fixtures/analyses."""
    spec = json.loads((FIXTURES / "expectations.json").read_text())
    out = []
    for name, expect in spec["analyses"].items():
        problem = spec["problems"][expect["problem"]]
        out.append({"name": name, "text": (FIXTURES / name).read_text(), "question": problem["question"],
                    "gold_answer": problem["answer"], "max_heuristics": expect.get("max_heuristics", 3),
                    "expect": expect})
    return out


def _after_thinking(text: str) -> str:
    return text[text.rfind("</think>") + len("</think>"):] if "</think>" in text else text


def _mismatches(p: meta_experience.ParsedAnalysis, fx: dict) -> list[str]:
    """What differs from the fixture's expected parse (empty when all is right)."""
    e = fx["expect"]
    got = {"reject_reason": p.reject_reason}
    want = {"reject_reason": e["reject_reason"]}
    if e["reject_reason"] is None and p.ok:
        got.update(step=p.bifurcation_step, rules=len(p.heuristics), first_rule=p.heuristics[0])
        want.update(step=e["step"], rules=e["rules"], first_rule=e["first_rule"])
        if hasattr(p, "target_text"):  # benchmarks/parse_rate.py scores the old parser, which has neither
            got.update(target_end=p.target_text[-len(e["target_ends_with"]):],
                       target_is_prefix=_after_thinking(fx["text"]).lstrip().startswith(p.target_text))
            want.update(target_end=e["target_ends_with"], target_is_prefix=True)
        if "first_name" in e and hasattr(p, "heuristic_names"):
            got["first_name"], want["first_name"] = p.heuristic_names[0], e["first_name"]
    return [f"{k}: got {got[k]!r}, want {want[k]!r}" for k in want if got[k] != want[k]]


def test_fixture_corpus_parse_rate_and_fields():
    fixtures = load_fixtures()
    good = [fx for fx in fixtures if fx["expect"]["reject_reason"] is None]
    bad = [fx for fx in fixtures if fx["expect"]["reject_reason"] is not None]
    assert len(good) >= 30 and len(bad) >= 10
    results = {fx["name"]: meta_experience.parse_analysis(fx["text"], gold_answer=fx["gold_answer"], question=fx["question"],
                                            max_heuristics=fx["max_heuristics"]) for fx in fixtures}
    parsed = [fx for fx in good if results[fx["name"]].ok]
    print(f"\nmeta_experience on tests/fixtures/analyses: well-formed parsed {len(parsed)}/{len(good)}, "
          f"malformed rejected as expected {sum(results[fx['name']].reject_reason == fx['expect']['reject_reason'] for fx in bad)}/{len(bad)}")
    assert len(parsed) >= 0.95 * len(good), [(fx["name"], results[fx["name"]].reject_reason) for fx in good]
    wrong = {fx["name"]: m for fx in parsed + bad if (m := _mismatches(results[fx["name"]], fx))}
    assert not wrong, wrong


def test_fixture_targets_hold_the_whole_meta_experience_and_nothing_after():
    for fx in load_fixtures():
        p = meta_experience.parse_analysis(fx["text"], gold_answer=fx["gold_answer"], question=fx["question"])
        if not p.ok:
            assert p.target_text is None
            continue
        assert p.target_text == p.target_text.strip() and "<think>" not in p.target_text
        for part in (p.failure or p.critique, p.success_factors, p.reflection):
            assert part is None or part[:40] in p.target_text, (fx["name"], part)
        assert meta_experience.render_experience(p, "full") == p.target_text
        assert meta_experience.render_experience(p, "heuristics") == " ".join(p.heuristics)


# --------------------------------------------------------------------------------- rule forms

PAPER = """## Failure Point & Latent Cognitive Pattern
{failure}

## Success Factors
Attempt B checked the case first.

## First-Person Reflective Summary
I skipped the check.

## Subject Heuristics
{heuristics}"""


def paper(heuristics: str = "- If a parameter can vanish, then treat that case separately.",
          failure: str = "At step 2 Attempt A divided by k.") -> str:
    return PAPER.format(failure=failure, heuristics=heuristics)


RULE_FORMS = {
    "If a parameter can vanish, then treat that case separately.": True,
    "If you count outcomes then enumerate them systematically.": True,
    "If a parameter appears, be careful.": True,
    "If the equation involves logs, the domain must be checked first.": True,
    "When using the discriminant, I must verify the equation is quadratic.": True,
    "When in doubt, systematically enumerate the cases.": True,
    "Whenever a denominator contains a variable, I exclude the values that make it zero.": True,
    "Before dividing, always check that the divisor is non-zero.": True,
    "When using a, b or c, it is essential to check the units.": True,
    # not rules
    "If we compare the two attempts, several lessons emerge.": False,  # an intro, no directive
    "If the discriminant is zero, the root is repeated.": False,  # a fact without "then"
    "If in doubt be careful.": False,  # no "then", no comma
    "When I saw the two radicals, I immediately added them.": False,  # narration
    "When I saw it, I should have checked the domain.": False,
    "When analysing the attempts, I can identify several lessons:": False,  # ends in a colon: an intro
    "If [condition], then [action].": False,
    "Always check the domain when logs appear.": False,  # does not open with its condition
}


def test_rule_forms():
    wrong = {rule: want for rule, want in RULE_FORMS.items() if meta_experience.is_rule(rule) != want}
    assert not wrong, wrong


def test_pattern_names_are_recorded_and_removed_from_the_rule():
    items = ["- [Domain Guard]: If a log appears, then check its argument.",
             "- **Sign Tracking**: When a term moves across, I must flip its sign.",
             "- **Case Split.** If a parameter can vanish, then split into cases.",
             "- **Symmetry** If two outcomes differ in order, then count both.",
             "- Cycle Check - Before using a period, verify it on one cycle.",
             "- Rule 4: If a result looks odd, then recheck the previous step."]
    p = meta_experience.parse_analysis(paper("\n".join(items)), max_heuristics=10)
    assert p.ok, p.reject_reason
    assert p.heuristic_names == ["Domain Guard", "Sign Tracking", "Case Split", "Symmetry", "Cycle Check", None]
    assert p.heuristics == ["If a log appears, then check its argument.",
                            "When a term moves across, I must flip its sign.",
                            "If a parameter can vanish, then split into cases.",
                            "If two outcomes differ in order, then count both.",
                            "Before using a period, verify it on one cycle.",
                            "If a result looks odd, then recheck the previous step."]


# ----------------------------------------------------------------------------- s*: step index

STEPS = {
    "At step 3 Attempt A divided by k.": 3,
    "Attempt A goes wrong in Step #4.": 4,
    "The error is in step three.": 3,
    "The third step is where Attempt A divided by k.": 3,
    "Attempt A's fourth line divides by k.": 4,
    "The reasoning breaks at line 5 of Attempt A.": 5,
    "Bifurcation step: 6\nAttempt A divided by k.": 6,
    "Steps 1-2 are shared; Attempt A first diverges at step 3, where it divides by k.": 3,
    "Attempt A did the first step well, but in step 4 it divided by k.": 4,  # a numeral beats an ordinal word
    "Attempt A divided by k without asking whether k can be zero.": None,  # prose only: s* without an index
}


def test_step_index_read_from_the_failure_prose():
    for failure, step in STEPS.items():
        p = meta_experience.parse_analysis(paper(failure=failure))
        assert p.ok and p.bifurcation_step == step, (failure, p.bifurcation_step, p.reject_reason)
        assert p.bifurcation == p.failure and p.failure.startswith(failure.split("\n")[0])


def test_compact_layout_still_requires_its_step_line():
    assert meta_experience.parse_analysis("Critique: x\nHeuristic: If a, then b.").reject_reason == "missing_bifurcation"
    assert meta_experience.parse_analysis("Bifurcation: none\nCritique: x\nHeuristic: If a, then b.").reject_reason == \
        "missing_bifurcation"
    p = meta_experience.parse_analysis("Bifurcation: step 4\nCritique: x\nHeuristic: If a, then b.")
    assert p.ok and p.layout == "compact" and p.bifurcation == "step 4"


# ----------------------------------------------------------------------------------- titles

TITLES = {  # the documented paraphrases, each in a different markup
    "failure": ["## Failure Point & Latent Cognitive Pattern", "**Failure Analysis:**", "### Error Analysis",
                "1. Root Cause", "## Point of Divergence", "**What Went Wrong**", "#### Where Attempt A Went Wrong",
                "## Bifurcation Point", "### Latent Cognitive Pattern"],
    "success_factors": ["## Success Factors", "**Key Success Factors:**", "### What Went Right",
                        "2) What Attempt B Did Right", "**Why Attempt B Succeeded**", "Section 2: Success Analysis"],
    "reflection": ["## First-Person Reflective Summary", "**Reflection:**", "### Self-Reflection",
                   "(3) Personal Reflection", "III. Reflective Summary", "**First-Person Reflection**"],
    "heuristic": ["## Subject Heuristics", "**Heuristics:**", "### General Rules", "4. Lessons Learned",
                  "## Meta-Experience", "**Key Lessons**", "#### Subject-Specific Heuristics", "IV. Transferable Rules"],
}


def test_every_documented_title_opens_its_section():
    default = {"failure": "## Failure Point", "success_factors": "## Success Factors",
               "reflection": "## Reflection", "heuristic": "## Subject Heuristics"}
    bodies = {"failure": "Attempt A divided by k at step 2.", "success_factors": "Attempt B split the cases.",
              "reflection": "I skipped the check.", "heuristic": "- If a parameter can vanish, then split the cases."}
    for section, titles in TITLES.items():
        for title in titles:
            text = "\n\n".join(f"{title if s == section else default[s]}\n{bodies[s]}" for s in default)
            p = meta_experience.parse_analysis(text)
            assert p.ok and p.layout == "paper", (title, p.reject_reason)
            field = {"failure": p.failure, "success_factors": p.success_factors, "reflection": p.reflection,
                     "heuristic": p.heuristics and p.heuristics[0]}[section]
            assert field and bodies[section].lstrip("- ") in field, (title, field)


def test_a_document_title_is_not_the_heuristics_section():
    text = "# Meta-Experience Analysis\n\nHere is my comparison.\n\n" + paper()
    assert meta_experience.parse_analysis(text).ok
    assert meta_experience.diagnosis_part(text).startswith("# Meta-Experience Analysis")
    assert meta_experience.diagnosis_part(text).endswith("I skipped the check.")


# ------------------------------------------------------------------------------------ leak rule

def _reason(rule: str, gold: str, question: str = "Solve the problem.") -> str | None:
    return meta_experience.parse_analysis(paper(f"- {rule}"), gold_answer=gold, question=question).reject_reason


LEAKS = [  # (rule, gold answer, leaks?)
    ("If the roots are real, then the answer is 42.", "42", True),
    ("If in doubt, then write $\\boxed{42}$.", "42", True),
    ("If the sum of the roots is needed, then r + s = 42.", "42", True),
    ("If the distance is fixed, then the speed is 42 km/h.", "42", True),
    ("If the product is needed, then it equals 42.", "42.0", True),
    ("If the hours are converted, then multiply by 42.", "42", False),  # a number, not a result
    ("If the sum is 42x + 1, then factor it.", "42", False),  # the expression goes on
    ("If a result is 420, then recheck it.", "42", False),
    ("If the probability is needed, then it is 0.75.", "-\\frac{3}{4}", True),  # 3/4 = 0.75, sign ignored
    ("If a quadratic has a double root, then b^2 - 4ac = 0.", "0", False),  # structural: only answer contexts
    ("If the factor is 2, then the answer is 2.", "2", True),
    ("If the result must be halved, then divide by 2.", "2", False),
    ("If a box is checked, then $\\boxed{2}$ is final.", "2", True),
    ("If the diagonal of a unit square is needed, then it is \\sqrt{2}.", "\\sqrt{2}", True),  # expressions: anywhere
    ("If the weekday is needed, then count from Monday.", "\\text{Monday}", True),
    ("If a count is needed, then count Mondays.", "Monday", False),
    ("If the choice is unclear, then pick B.", "B", False),  # too short to tell
]


def test_leak_rule_edges():
    wrong = [(rule, gold) for rule, gold, leaks in LEAKS
             if (_reason(rule, gold) == "heuristic_leaks_answer") != leaks]
    assert not wrong, wrong


def test_problem_numbers_but_not_structural_ones():
    q = "What is the remainder when $7^{2024}$ is divided by 13?"
    assert _reason("If the exponent is 2024, then reduce it.", "3", q) == "heuristic_has_problem_numbers"
    assert _reason("If the modulus is 13.0, then use Fermat.", "3", q) == "heuristic_has_problem_numbers"
    assert _reason("If a base like 7 is reduced modulo n, then list its powers.", "3", q) is None  # 7 is structural
    # only the kept rules are checked: a fourth rule past max_heuristics is neither kept nor checked
    rules = "\n".join(f"- If case {i} holds, then check it." for i in range(1, 4)) + "\n- If 2024, then 13."
    assert meta_experience.parse_analysis(paper(rules), gold_answer="3", question=q, max_heuristics=3).ok
    assert meta_experience.parse_analysis(paper(rules), gold_answer="3", question=q, max_heuristics=4).reject_reason == \
        "heuristic_has_problem_numbers"


# -------------------------------------------------------------------------------- M*: target_text

def test_target_stops_at_the_last_kept_rule():
    rules = "\n".join(f"- If case {i} holds, then check case {i + 1}." for i in range(1, 6))
    text = "<think>\nhmm\n</think>\n\n" + paper(rules + "\n\nThese rules generalise.\n\nProblem: Find x if x^2 = 9.")
    p = meta_experience.parse_analysis(text, max_heuristics=2)
    assert p.target_text.startswith("## Failure Point") and p.target_text.endswith("then check case 3.")
    assert text[text.index("</think>") + 8:].lstrip().startswith(p.target_text)
    assert "case 3 holds" not in p.target_text and "Problem" not in p.target_text


def test_runaway_text_is_cut_but_a_problem_preamble_is_kept():
    text = paper() + "\n<|im_end|>\n<|im_start|>user\nSolve: if x = 2, then what is 3x?"
    assert meta_experience.parse_analysis(text).heuristics == ["If a parameter can vanish, then treat that case separately."]
    preamble = "Problem: we must compare two attempts.\n\n" + paper()
    p = meta_experience.parse_analysis(preamble)
    assert p.ok and p.target_text.startswith("Problem: we must compare")
    # with nothing but a new problem after its header, the heuristics section is empty
    empty = paper("\nProblem: If x = 2, then what is x + 1?")
    assert meta_experience.parse_analysis(empty).reject_reason == "missing_heuristic"


def test_compact_target_drops_the_runaway_line():
    text = "Bifurcation: step 2\nCritique: 1+9=11 should be 1+9=10.\nHeuristic: If a sum passes ten, then carry.\nQ: 3+4"
    p = meta_experience.parse_analysis(text, gold_answer="10", question="1+9")
    assert p.target_text == text[:text.index("\nQ:")]


def test_two_pass_targets_and_combine():
    diagnosis_gen = paper().split("## Subject Heuristics")[0] + "## Subject Heuristics\n- If a, then b."
    d = meta_experience.parse_diagnosis(diagnosis_gen)
    assert d.ok and d.target_text == meta_experience.diagnosis_part(diagnosis_gen) and d.target_text.endswith("I skipped the check.")
    abstract_gen = ("Sure. Here are the rules.\n\n## Subject Heuristics\n- If a parameter can vanish, then split.\n"
                    "- If a divisor is symbolic, then check it is non-zero.\n\nProblem: next one")
    h = meta_experience.parse_heuristics(abstract_gen, max_heuristics=1)
    assert h.ok and h.target_text == "Sure. Here are the rules.\n\n## Subject Heuristics\n- If a parameter can vanish, then split."
    m = meta_experience.combine(d, h)
    assert m.ok and m.bifurcation_step == 2 and m.heuristics == ["If a parameter can vanish, then split."]
    assert m.target_text == d.target_text + "\n\n" + h.target_text
    assert meta_experience.render_experience(m, "full") == m.target_text
    rejected = meta_experience.combine(d, meta_experience.parse_heuristics("## Subject Heuristics\nNothing general here."))
    assert rejected.reject_reason == "heuristic_not_if_then" and rejected.target_text is None


def test_render_experience_contexts():
    p = meta_experience.parse_analysis(paper("- If a, then b.\n- When c, check d."))
    assert meta_experience.render_experience(p, "heuristics") == "If a, then b. When c, check d." == meta_experience.render_heuristics(p.heuristics)
    full = meta_experience.render_experience(p, "full")
    assert full == p.target_text and "Failure Point" in full and "When c, check d." in full
    with pytest.raises(ValueError):
        meta_experience.render_experience(p, "rules")
    with pytest.raises(ValueError):
        meta_experience.render_experience(meta_experience.parse_analysis("nothing"), "full")
