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
