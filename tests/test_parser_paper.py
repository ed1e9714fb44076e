"""The parser on analyses as real instruction/base models write them for the paper's analysis prompt."""

from mel_core.algorithm import meta_experience

Q_QUAD = "Find the sum of all real values of $k$ for which $kx^2 + 12x + 9 = 0$ has exactly one real solution."
GOLD_QUAD = "4"  # k = 4 (double root); k = 0 (linear) is a trap: the sum is 4
Q_TRAIN = "A train travels 240 km in 3 hours, then 150 km in 2.5 hours. What is its average speed in km/h?"
GOLD_TRAIN = "\\frac{780}{11}"
Q_PROB = "Two fair dice are rolled. What is the probability that the sum is at least 10?"
GOLD_PROB = "\\frac{1}{6}"


# 1. Qwen3 with thinking on: a <think> preamble that itself drafts the section names, then markdown headers.
QWEN3_THINKING = """<think>
Okay, let me compare the two attempts. Attempt A says the sum is 4 but forgets... wait, actually it
computes the discriminant 144 - 36k and sets it to zero.
## Subject Heuristics
- maybe something like: If the discriminant is 144, then k=4 (no, that's too specific)
</think>

## Failure Point & Latent Cognitive Pattern
Bifurcation step: 3

In step 3 the solver set the discriminant to zero without asking whether the equation is still
quadratic. The latent pattern is *template matching*: "exactly one solution" was mapped straight to
"discriminant = 0".

## Success Factors
Attempt B split into cases on the leading coefficient before using the discriminant, so the linear
case was examined on its own.

## First-Person Reflective Summary
I jumped to the discriminant because the wording looked familiar. Next time I will first check that
the leading coefficient cannot vanish.

## Subject Heuristics
- If a quadratic's leading coefficient contains a parameter, then treat the case where it equals zero separately.
- If a problem asks for "exactly one solution", then list every way this can happen before computing.

These rules should transfer to other parameterised equations.
"""


def test_qwen3_thinking_preamble_and_markdown_headers():
    p = meta_experience.parse_analysis(QWEN3_THINKING, gold_answer=GOLD_QUAD, question=Q_QUAD)
    assert p.ok, p.reject_reason
    assert p.layout == "paper" and p.bifurcation_step == 3
    assert p.failure.startswith("Bifurcation step: 3") and "template matching" in p.failure
    assert p.success_factors.startswith("Attempt B split") and p.reflection.startswith("I jumped")
    assert p.failure in p.critique and p.success_factors in p.critique and p.reflection in p.critique
    assert p.heuristics == [
        "If a quadratic's leading coefficient contains a parameter, then treat the case where it equals zero "
        "separately.",
        'If a problem asks for "exactly one solution", then list every way this can happen before computing.',
    ]  # the draft inside <think> and the closing prose are not heuristics


# 2. Bold headers with trailing colons inside the bold, ordinal bifurcation, bold If/Then, wrapped rule.
BOLD_HEADERS = """Let me analyze both solutions carefully.

**Failure Point & Latent Cognitive Pattern:**
The incorrect solution goes wrong in the third step, where it averages the two speeds (80 and 60)
instead of dividing total distance by total time. Pattern: treating "average" as the arithmetic mean
by default.

**Success Factors:**
The correct solution went back to the definition of average speed.

**First-Person Reflective Summary:**
I reached for the familiar formula without checking its definition.

**Subject Heuristics:**
* **If** a problem asks for an average rate over segments of different duration, **then** divide the
  total quantity by the total time instead of averaging the rates.
* *If* the segments have equal duration, *then* the plain mean of the rates is allowed.
"""


def test_bold_headers_ordinal_step_and_wrapped_bold_rules():
    p = meta_experience.parse_analysis(BOLD_HEADERS, gold_answer=GOLD_TRAIN, question=Q_TRAIN)
    assert p.ok, p.reject_reason
    assert p.bifurcation_step == 3 and p.layout == "paper"
    assert p.heuristics == [
        "If a problem asks for an average rate over segments of different duration, then divide the total "
        "quantity by the total time instead of averaging the rates.",
        "If the segments have equal duration, then the plain mean of the rates is allowed.",
    ]


# 3. Numbered sections ("1." / "4)"), divergence sentence, numbered rules with labels, no comma before then.
NUMBERED = """Here is my analysis.

1. Failure Point & Latent Cognitive Pattern
The incorrect attempt first diverges from the correct one at Step 2, where it counts the outcomes
(4,6), (5,5), (6,4) but forgets (5,6), (6,5) and (6,6).

2. Success Factors
The correct attempt enumerated the sums row by row in a table.

3. First-Person Reflective Summary
I listed outcomes from memory and stopped too early.

4) Subject Heuristics
1. Rule 1: If you count favourable outcomes of several dice then enumerate them systematically in a grid.
2. Rule 2 - If a condition says "at least", then include every value up to the maximum.
"""


def test_numbered_sections_and_labelled_rules():
    p = meta_experience.parse_analysis(NUMBERED, gold_answer=GOLD_PROB, question=Q_PROB)
    assert p.ok, p.reject_reason
    assert p.bifurcation_step == 2
    assert p.heuristics == [
        "If you count favourable outcomes of several dice then enumerate them systematically in a grid.",
        'If a condition says "at least", then include every value up to the maximum.',
    ]


# 4. A paper-layout answer without the Success Factors section.
MISSING_SUCCESS = """### Failure Point & Latent Cognitive Pattern
Bifurcation step: 4. The solver divided by an expression that can be zero.

### First-Person Reflective Summary
I divided without checking the sign.

### Subject Heuristics
- If you divide both sides by an expression, then check whether it can be zero first.
"""


def test_missing_success_factors_is_rejected():
    p = meta_experience.parse_analysis(MISSING_SUCCESS)
    assert p.layout == "paper" and p.reject_reason == "missing_success_factors"
    assert p.bifurcation_step == 4


def test_missing_reflection_and_failure_are_rejected():
    no_reflection = MISSING_SUCCESS.replace("### First-Person Reflective Summary", "### Success Factors")
    assert meta_experience.parse_analysis(no_reflection).reject_reason == "missing_reflection"
    no_failure = ("**Success Factors:** checked the domain.\n**Reflection:** I forgot the domain.\n"
                  "**Subject Heuristics:**\n- If a log appears, then check its argument is positive.")
    assert meta_experience.parse_analysis(no_failure).reject_reason == "missing_failure_point"
    empty_section = MISSING_SUCCESS.replace("### First-Person", "### Success Factors\n\n### First-Person")
    assert meta_experience.parse_analysis(empty_section).reject_reason == "missing_success_factors"


# 5. All sections, but the failure section never says which step.
NO_STEP = """## Failure Point & Latent Cognitive Pattern
The incorrect solution misread the problem and solved for the wrong quantity.
## Success Factors
It reread the question.
## First-Person Reflective Summary
I rushed.
## Subject Heuristics
- If a question names a target quantity, then restate it before computing.
"""


def test_no_bifurcation_step_index_is_recorded_as_none():
    # the failure section's prose is s*; a step index is recorded when stated, and no longer required
    p = meta_experience.parse_analysis(NO_STEP)
    assert p.ok and p.bifurcation_step is None
    assert p.bifurcation == p.failure and p.failure.startswith("The incorrect solution misread")
    worded = NO_STEP.replace("misread the problem", "misread the problem at step five")
    p = meta_experience.parse_analysis(worded)
    assert p.ok and p.bifurcation_step == 5


# 6. A heuristic that states the answer (LaTeX gold answer written as a plain fraction).
LEAK = """## Failure Point & Latent Cognitive Pattern
Bifurcation step: 2
The attempt missed outcomes.
## Success Factors
Systematic enumeration.
## First-Person Reflective Summary
I stopped counting too early.
## Subject Heuristics
- If two dice must sum to at least ten, then the probability is 1/6.
"""


def test_heuristic_leaking_the_answer_is_rejected():
    assert meta_experience.parse_analysis(LEAK, gold_answer=GOLD_PROB, question=Q_PROB).reject_reason == "heuristic_leaks_answer"
    latex = LEAK.replace("1/6", "$\\frac{1}{6}$")
    assert meta_experience.parse_analysis(latex, gold_answer=GOLD_PROB, question=Q_PROB).reject_reason == "heuristic_leaks_answer"
    other = LEAK.replace("the probability is 1/6", "count the complement")
    assert meta_experience.parse_analysis(other, gold_answer=GOLD_PROB, question=Q_PROB).ok


def test_numeric_answer_leak_and_small_structural_answers():
    base = LEAK.replace(
        "- If two dice must sum to at least ten, then the probability is 1/6.", "- {rule}")
    q = Q_QUAD
    leak = base.format(rule="If the equation is quadratic in k, then the answer is 4.")
    assert meta_experience.parse_analysis(leak, gold_answer="4", question=q).reject_reason == "heuristic_leaks_answer"
    # a structural number equal to the answer is fine outside an answer context
    fine = base.format(rule="If a quadratic has a double root, then its discriminant is 0 and it has 2 equal roots.")
    assert meta_experience.parse_analysis(fine, gold_answer="2", question=q).ok
    # a non-structural number equal to the answer counts only when the rule states it as a result
    big = base.format(rule="If you are unsure, then check that the sum 780 is divisible.")
    assert meta_experience.parse_analysis(big, gold_answer="780", question="x").ok
    stated = base.format(rule="If you are unsure, then the sum is 780.")
    assert meta_experience.parse_analysis(stated, gold_answer="780", question="x").reject_reason == "heuristic_leaks_answer"
    assert meta_experience.parse_analysis(stated, gold_answer="1,780", question="x").ok  # 780 is not 1780


# 7. A heuristic copying the problem's numbers (and the other side: small structural numbers pass).
PROBLEM_NUMBERS = """**Failure Point & Latent Cognitive Pattern**: The error is at step 1: the solver used 12^2 - 4k.
**Success Factors**: Correct discriminant.
**First-Person Reflective Summary**: I mixed up the coefficients.
**Subject Heuristics**:
- If the linear coefficient is 12, then its square is 144.
"""


def test_heuristic_with_problem_numbers_is_rejected_but_structural_numbers_pass():
    p = meta_experience.parse_analysis(PROBLEM_NUMBERS, gold_answer=GOLD_QUAD, question=Q_QUAD)
    assert p.bifurcation_step == 1 and p.reject_reason == "heuristic_has_problem_numbers"
    decimal = PROBLEM_NUMBERS.replace("- If the linear coefficient is 12, then its square is 144.",
                                      "- If a leg takes 2.5 hours, then convert it to minutes.")
    assert meta_experience.parse_analysis(decimal, gold_answer=GOLD_TRAIN, question=Q_TRAIN).reject_reason == \
        "heuristic_has_problem_numbers"
    # 2, 4 and 10 are structural: general rules use them, even though the question holds 9 / x^2 / 10
    structural = PROBLEM_NUMBERS.replace(
        "- If the linear coefficient is 12, then its square is 144.",
        "- If a quadratic ax^2 + bx + c has one root, then b^2 - 4ac = 0 (use powers of 10 to check the arithmetic).\n"
        "- If the leading coefficient can be 0, then also solve the resulting linear equation.")
    p = meta_experience.parse_analysis(structural, gold_answer=GOLD_QUAD, question=Q_QUAD + " Use base 10.")
    assert p.ok, p.reject_reason
    assert len(p.heuristics) == 2


# 8. Prose-only heuristics: advice without any If/Then rule.
PROSE_ONLY = """## Failure Point & Latent Cognitive Pattern
Bifurcation step: 2 — the solver forgot a case.
## Success Factors
Careful case analysis.
## First-Person Reflective Summary
I should slow down.
## Subject Heuristics
Always check every case when a parameter is involved. Enumerating cases carefully prevents most errors
of this kind, and it is worth the extra time.
- Be careful with degenerate cases.
"""


def test_prose_only_heuristics_are_rejected():
    assert meta_experience.parse_analysis(PROSE_ONLY).reject_reason == "heuristic_not_if_then"
    no_then = PROSE_ONLY.replace("- Be careful with degenerate cases.", "- If a parameter appears, be careful.")
    assert meta_experience.parse_analysis(no_then).heuristics == ["If a parameter appears, be careful."]  # "If ..., ..." is a rule
    no_condition = PROSE_ONLY.replace("- Be careful with degenerate cases.", "- If in doubt be careful.")
    assert meta_experience.parse_analysis(no_condition).reject_reason == "heuristic_not_if_then"
    placeholder = PROSE_ONLY.replace("- Be careful with degenerate cases.", "- If [condition], then [action].")
    assert meta_experience.parse_analysis(placeholder).reject_reason == "heuristic_not_if_then"
    missing = PROSE_ONLY[:PROSE_ONLY.index("## Subject Heuristics")]
    assert meta_experience.parse_analysis(missing).reject_reason == "missing_heuristic"


# 9. Bullets of every kind, mixed prose kept out, max_heuristics, "Heuristic 1:" sub-headers.
MIXED_BULLETS = """# Analysis

#### Failure Point & Latent Cognitive Pattern
- **Bifurcation Step:** **5**
- The student substituted before simplifying.

#### Success Factors
- Simplified first.

#### First-Person Reflective Summary
- I substituted too early.

#### Subject Heuristics
Here are the rules I derived:
• If an expression can be simplified symbolically, then simplify it before substituting values.
+ If a substitution produces large numbers, then look for a factorisation first
  because it usually shortens the arithmetic.
**Heuristic 3:** If two expressions share a factor, then cancel it only after checking it is non-zero.
(4) If a result looks surprisingly messy, then recheck the previous step.
"""


def test_mixed_bullets_and_max_heuristics():
    p = meta_experience.parse_analysis(MIXED_BULLETS, max_heuristics=3)
    assert p.ok and p.bifurcation_step == 5
    assert p.heuristics == [
        "If an expression can be simplified symbolically, then simplify it before substituting values.",
        "If a substitution produces large numbers, then look for a factorisation first because it usually "
        "shortens the arithmetic.",
        "If two expressions share a factor, then cancel it only after checking it is non-zero.",
    ]
    assert len(meta_experience.parse_analysis(MIXED_BULLETS, max_heuristics=10).heuristics) == 4


# 10. Base model (no chat template) that puts the bifurcation line above the sections, and an
#     explicit step that wins over other steps mentioned first.
BASE_MODEL = """ Bifurcation point: Step 4

Failure Point & Latent Cognitive Pattern: Steps 1-3 are shared by both attempts. At step 4 the
incorrect attempt cancels x from both sides.
Success Factors: The correct attempt factored instead of cancelling.
First-Person Reflection: I cancelled a variable that could be zero.
Subject Heuristics: If a variable appears on both sides of an equation, then factor instead of dividing by it.
"""


def test_base_model_plain_colon_headers():
    p = meta_experience.parse_analysis(BASE_MODEL, question="Solve x^2 = 7x.", gold_answer="0, 7")
    assert p.ok, p.reject_reason
    assert p.bifurcation_step == 4
    assert p.reflection == "I cancelled a variable that could be zero."
    assert p.heuristics == [
        "If a variable appears on both sides of an equation, then factor instead of dividing by it."]


def test_unfinished_thinking_and_prose_lines_are_not_headers():
    truncated = "<think>\nLet me see. ## Failure Point\nBifurcation step: 2 ... the attempt"
    assert meta_experience.parse_analysis(truncated).reject_reason == "unfinished_thinking"
    h = meta_experience.parse_heuristics(truncated)
    assert h.heuristics == [] and h.reject_reason == "unfinished_thinking" and h.target_text is None
    # "Success factors were..." at the start of a prose line does not open a section
    prose = NO_STEP.replace("It reread the question.", "It reread the question.\nSuccess factors were few.")
    prose = prose.replace("misread the problem", "misread the problem in Step 2")
    p = meta_experience.parse_analysis(prose)
    assert p.ok and p.success_factors == "It reread the question.\nSuccess factors were few."


def test_parse_diagnosis_and_heuristics_separately_on_paper_layout():
    d = meta_experience.parse_diagnosis(QWEN3_THINKING)
    assert d.ok and d.heuristics == [] and d.bifurcation_step == 3
    h = meta_experience.parse_heuristics(QWEN3_THINKING, gold_answer=GOLD_QUAD, question=Q_QUAD, max_heuristics=1)
    assert h.ok and len(h.heuristics) == 1
    assert h.target_text.endswith("then treat the case where it equals zero separately.")


def test_tiny_format_keeps_parsing_and_ignores_a_runaway_line():
    text = ("Bifurcation: step 2\nCritique: 12+21=34 should be 12+21=33.\n"
            "Heuristic: If an addition passes a ten, then carry one to the tens.\nQ: 31+47")
    p = meta_experience.parse_analysis(text, gold_answer="28", question="12+7*3-5+31+47")
    assert p.ok and p.layout == "compact" and p.failure is None and p.success_factors is None
    assert p.heuristics == ["If an addition passes a ten, then carry one to the tens."]


def test_step_numeral_preferred_over_ordinal_word_and_word_answers():
    text = NO_STEP.replace("misread the problem", "did the first step well but misread the problem in step 3")
    assert meta_experience.parse_analysis(text).bifurcation_step == 3
    rule = LEAK.replace("the probability is 1/6", "it must be a Monday")
    assert meta_experience.parse_analysis(rule, gold_answer="\\text{Monday}").reject_reason == "heuristic_leaks_answer"
    assert meta_experience.parse_analysis(rule.replace("Monday", "Mondays"), gold_answer="Monday").ok
    assert meta_experience.parse_analysis(rule, gold_answer="B").ok  # single letters are too short to call a leak


# ------------------------------------------------------------- the paper's own titles (Appendix C)

APPENDIX_C = """## 1. Failure Resolution Path & Error Pattern Recognition
Bifurcation step: 2
- **Failure Point:** in step 2 Attempt A divides both sides by k.
- **Latent Cognitive Pattern:** treating a parameter as non-zero by default.

## 2. Analysis of Success Factors
- **Reasoning Pivot:** Attempt B split on k = 0 first.
- **Robustness Factor:** each case was solved on its own.
- **Reason for Effectiveness:** nothing was assumed about k.

## 3. First-Person Reflective Summary
- **Review:** I divided by k without a second thought.
- **Insight:** a parameter can vanish.
- **Action:** I will split on the parameter first.

## 4. Subject Heuristics (Internalized Experience)
- If a parameter can vanish, then treat that case separately.
- If you divide by an expression, then check that it is non-zero.
"""
DIAGNOSIS_BODIES = {"failure": "Attempt A divided by k at step 2.", "success_factors": "Attempt B split the cases.",
                    "reflection": "I skipped the check.", "heuristic": "- If a parameter can vanish, then split the cases."}


def _four(titles: dict) -> str:
    return "\n\n".join(f"{titles[s]}\n{body}" for s, body in DIAGNOSIS_BODIES.items())


def _fields(p) -> dict:
    return {"failure": p.failure, "success_factors": p.success_factors, "reflection": p.reflection,
            "heuristic": p.heuristics and p.heuristics[0]}


PAPER_TITLES = {  # each section: the paper's exact title, then paraphrases, each in some markup
    "failure": ["## Failure Resolution Path & Error Pattern Recognition", "**1. Failure Resolution Path**",
                "### Error Pattern Recognition", "Resolution Path:", "## Failure Path and Error Patterns",
                "Section 1: Error Pattern Recognition & Failure Point"],
    "success_factors": ["## Analysis of Success Factors", "**2. Analysis of the Success Factors**",
                        "### Analysis of Success", "Success Analysis:", "(2) Success Factor Analysis"],
    "reflection": ["## First-Person Reflective Summary", "**3. Reflective Summary**", "### First Person Summary",
                   "Reflection (First-Person):", "## Self-Reflective Summary"],
    "heuristic": ["## Subject Heuristics (Internalized Experience)", "**4. Internalized Experience**",
                  "### Heuristics (Internalized Experience)", "Internalised Experience:", "## Internalized Heuristics",
                  "IV. Subject-Level Heuristics"],
}


def test_the_papers_titles_and_their_paraphrases_open_their_sections():
    default = {"failure": "## Failure Point", "success_factors": "## Success Factors",
               "reflection": "## Reflection", "heuristic": "## Subject Heuristics"}
    for section, titles in PAPER_TITLES.items():
        for title in titles:
            p = meta_experience.parse_analysis(_four({**default, section: title}))
            assert p.ok and p.layout == "paper", (title, p.reject_reason)
            field = _fields(p)[section]
            assert field and field.endswith(DIAGNOSIS_BODIES[section].lstrip("- ")), (title, field)


def test_the_papers_field_labels_stay_inside_their_sections():
    p = meta_experience.parse_analysis(APPENDIX_C)
    assert p.ok and p.bifurcation_step == 2
    assert p.failure.startswith("Bifurcation step: 2") and p.failure.endswith("non-zero by default.")
    assert "**Failure Point:**" in p.failure and "**Latent Cognitive Pattern:**" in p.failure
    assert p.success_factors.startswith("- **Reasoning Pivot:**") and p.success_factors.endswith("about k.")
    assert p.reflection.startswith("- **Review:**") and "**Insight:**" in p.reflection
    assert p.reflection.endswith("split on the parameter first.")
    assert len(p.heuristics) == 2
    # the field labels as sub-headers of their own, in another markup, stay in their sections too
    subheaders = APPENDIX_C.replace("- **", "### ").replace(":** ", "\n")
    q = meta_experience.parse_analysis(subheaders)
    assert q.ok and q.failure.startswith("Bifurcation step: 2") and "### Latent Cognitive Pattern" in q.failure
    assert "### Reason for Effectiveness" in q.success_factors and "### Action" in q.reflection
    # field labels alone, with no section title, still title the failure section (as before)
    labels_only = APPENDIX_C.replace("## 1. Failure Resolution Path & Error Pattern Recognition\n", "")
    r = meta_experience.parse_analysis(labels_only)
    assert r.ok and r.failure.startswith("in step 2 Attempt A") and r.bifurcation_step == 2


def test_a_named_rule_in_the_heuristics_is_not_a_diagnosis_header():
    named = APPENDIX_C.replace("- If a parameter", "- **Error Pattern Awareness**: If a parameter").replace(
        "- If you divide", "- **Root Cause Check**: If you divide")
    p = meta_experience.parse_analysis(named)
    assert p.ok and p.heuristic_names == ["Error Pattern Awareness", "Root Cause Check"]
    assert p.failure.endswith("non-zero by default.")


# ------------------------------------------------------------------- by number and by position

def test_an_unusual_title_is_found_by_its_number():
    text = APPENDIX_C.replace("## 2. Analysis of Success Factors", "## 2. The Turning Point in Attempt B")
    p = meta_experience.parse_analysis(text)
    assert p.ok and p.success_factors.startswith("- **Reasoning Pivot:**")
    two = text.replace("## 4. Subject Heuristics (Internalized Experience)", "## 4. Distilled Wisdom")
    p = meta_experience.parse_analysis(two)  # two unusual titles: the numbered ones left still fit the paper's
    assert p.ok and p.success_factors.startswith("- **Reasoning Pivot:**") and len(p.heuristics) == 2
    roman = two.replace("## 1.", "## I.").replace("## 2.", "## II.").replace("## 3.", "## III.").replace("## 4.", "## IV.")
    assert meta_experience.parse_analysis(roman).ok


def test_a_number_maps_only_where_it_fits():
    text = APPENDIX_C.replace("## 2. Analysis of Success Factors", "## 2. The Turning Point in Attempt B")
    # the header numbered 2 comes after the one numbered 3: no mapping
    s2, s3 = text.index("## 2."), text.index("## 3.")
    swapped = text[:s2] + text[s3:text.index("## 4.")] + text[s2:s3] + text[text.index("## 4."):]
    assert meta_experience.parse_analysis(swapped).reject_reason == "missing_success_factors"
    # another markup than the titled headers ("2." sub-item vs "## N."): no mapping
    sub = text.replace("## 2. The Turning Point in Attempt B", "2. The Turning Point in Attempt B")
    assert meta_experience.parse_analysis(sub).reject_reason == "missing_success_factors"
    # out of the paper's order and renumbered in text order, the numbers are not the paper's: no mapping (and
    # none by position either, the unusual header not being where the paper puts the missing section)
    s = _sections(text)
    renumbered = (s["reflection"].replace("## 3.", "## 1.") + s["failure"].replace("## 1.", "## 2.")
                  + s["success_factors"].replace("## 2.", "## 3.") + s["heuristic"])
    assert meta_experience.parse_analysis(renumbered).reject_reason == "missing_success_factors"
    # a numbered sub-item in the failure section is not the success section, even numbered 2
    listed = ("## 1. Failure Resolution Path & Error Pattern Recognition\n1. Attempt A divides by k.\n"
              "2. Attempt B Checks First\n\n## 3. First-Person Reflective Summary\nI skipped it.\n\n"
              "## 4. Subject Heuristics (Internalized Experience)\n- If a parameter can vanish, then split.")
    assert meta_experience.parse_analysis(listed).reject_reason == "missing_success_factors"


def test_an_unusual_title_is_found_by_its_position():
    bold = _four({"failure": "**Failure Resolution Path & Error Pattern Recognition**",
                  "success_factors": "**Analysis of Success Factors**", "reflection": "**Looking Back**",
                  "heuristic": "**Subject Heuristics (Internalized Experience)**"})
    p = meta_experience.parse_analysis(bold)
    assert p.ok and p.reflection == "I skipped the check."
    # conservative: a fifth header of the same markup, or the unusual one out of the paper's order, maps nothing
    five = bold.replace("**Looking Back**", "**Looking Back**\nSo.\n\n**One More Thing**")
    assert meta_experience.parse_analysis(five).reject_reason == "missing_reflection"
    r, h = bold.index("**Looking Back**"), bold.index("**Subject Heuristics")
    out_of_order = bold[:r] + bold[h:] + "\n\n" + bold[r:h].rstrip()
    assert meta_experience.parse_analysis(out_of_order).reject_reason == "missing_reflection"
    # a document title in the sections' markup is not the missing section: the heuristics stay missing
    titled = "## Comparing the Two Attempts\nHere is my analysis.\n\n" + APPENDIX_C[:APPENDIX_C.index("## 4.")]
    titled = titled.replace("## 1. ", "## ").replace("## 2. ", "## ").replace("## 3. ", "## ")
    assert meta_experience.parse_analysis(titled).reject_reason == "missing_heuristic"
    # never from prose: a plain line that is not marked up as a header opens nothing
    prose = bold.replace("**Looking Back**", "Looking Back")
    assert meta_experience.parse_analysis(prose).reject_reason == "missing_reflection"


# ---------------------------------------------------------------------------- sections out of order

def _sections(text: str) -> dict:
    starts = {name: text.index(f"## {k}.") for k, name in enumerate(DIAGNOSIS_BODIES, start=1)}
    ends = {name: min([s for s in starts.values() if s > start] + [len(text)]) for name, start in starts.items()}
    return {name: text[starts[name]:ends[name]].rstrip() + "\n\n" for name in starts}


def test_sections_out_of_order():
    s = _sections(APPENDIX_C)
    reflection_first = s["reflection"] + s["failure"] + s["success_factors"] + s["heuristic"]
    p = meta_experience.parse_analysis(reflection_first)
    assert p.ok and p.reflection.endswith("split on the parameter first.") and p.bifurcation_step == 2
    assert p.target_text == reflection_first.strip()
    # heuristics first or in the middle are found; M* still ends at the last kept rule, so the sections after
    # it are parsed (and required) but not trained on
    for order in (("heuristic", "failure", "success_factors", "reflection"),
                  ("failure", "heuristic", "success_factors", "reflection")):
        text = "".join(s[name] for name in order)
        p = meta_experience.parse_analysis(text)
        assert p.ok and len(p.heuristics) == 2 and p.success_factors.endswith("about k."), order
        assert text.startswith(p.target_text) and p.target_text.endswith("check that it is non-zero.")
        assert "Reasoning Pivot" not in p.target_text
        missing = text.replace(s["reflection"], "")
        assert meta_experience.parse_analysis(missing).reject_reason == "missing_reflection"
    # heuristics first in another markup than the diagnosis headers stay a document title (as before)
    title_first = "# Subject Heuristics\n- If a, then b.\n\n" + "".join(s[n] for n in DIAGNOSIS_BODIES if n != "heuristic")
    assert meta_experience.parse_analysis(title_first).reject_reason == "missing_heuristic"


def test_target_is_a_prefix_of_every_well_formed_fixture():
    from tests.test_meta_experience import _after_thinking, load_fixtures

    checked = 0
    for fx in load_fixtures():
        p = meta_experience.parse_analysis(fx["text"], gold_answer=fx["gold_answer"], question=fx["question"],
                                           max_heuristics=fx["max_heuristics"])
        if fx["expect"]["reject_reason"] is not None:
            continue
        after = _after_thinking(fx["text"]).lstrip()
        assert p.ok and after.startswith(p.target_text), fx["name"]
        assert p.target_text.endswith(fx["expect"]["target_ends_with"]), fx["name"]
        covered = [(a, b) for _, a, b in p.spans]  # the parts tile M* exactly
        assert covered[0][0] == 0 and covered[-1][1] == len(p.target_text), fx["name"]
        assert all(b == c for (_, b), (c, _) in zip(covered, covered[1:])), fx["name"]
        checked += 1
    assert checked >= 57
