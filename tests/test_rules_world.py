"""The rules world (mel_core/problems/worlds/rules.py): solving, splits by rule, the warm start's weak rules, the error model,
its analyses as the parser reads them, the oracle analyst, and evaluation datasets of one rule."""

import random
import re
from collections import Counter

import pytest

from mel_core import config as config_mod
from mel_core import vocabulary
from mel_core.algorithm import meta_experience
from mel_core.algorithm.rewards.synthetic import verify_synthetic
from mel_core.config import ConfigError, RulesWorldConfig, SyntheticConfig
from mel_core.model import tiny
from mel_core.problems import worlds
from mel_core.problems.prompts import PromptSet
from mel_core.problems.worlds import rules as R
from mel_core.study import evaluation


def synthetic(**rules) -> SyntheticConfig:
    return SyntheticConfig(world="rules", train_size=200, eval_size=40, seed=7, rules=RulesWorldConfig(**rules))


def _parse(line: str) -> tuple[str, int, str, int]:
    """``"2 dec seven down six"`` -> ("dec", 7, "down", 6)."""
    _, command, before, tag, after = line.split()
    return command, R.DIGITS.index(before), tag, R.DIGITS.index(after)


# ------------------------------------------------------------------------------------------- solving


@pytest.mark.parametrize("question, lines", [
    ("five: inc dec neg dbl", ["1 inc five jump seven", "2 dec seven down six", "3 neg six mirror three",
                               "4 dbl three double six", "Answer: six"]),
    ("four: inc inc dec", ["1 inc four up five", "2 inc five skip five", "3 dec five down four", "Answer: four"]),
    ("one: dec dec inc", ["1 dec one down zero", "2 dec zero skip zero", "3 inc zero up one", "Answer: one"]),
    ("zero: dec inc neg", ["1 dec zero stay zero", "2 inc zero up one", "3 neg one mirror eight", "Answer: eight"]),
    ("nine: inc dbl dec", ["1 inc nine jump one", "2 dbl one double two", "3 dec two down one", "Answer: one"]),
])
def test_solution_lines(question, lines):
    assert R.solution_lines(question) == lines
    assert R.answer(question) == lines[-1].removeprefix("Answer: ")


def test_bad_questions_are_rejected():
    for bad in ["5: inc", "five inc dec", "five: add", "five: inc  dec", "ten: inc"]:
        with pytest.raises(ValueError):
            R.solution_lines(bad)


def test_every_solution_follows_the_rules_and_answers_right():
    """Each step: the digit before is the previous step's digit after, the tag is the one rule that applies, and
    the digit after is that rule's effect (written out independently of the module's tables)."""
    effect = {"skip": lambda d: d, "jump": lambda d: (d + 2) % 10, "up": lambda d: (d + 1) % 10,
              "stay": lambda d: d, "down": lambda d: (d - 1) % 10, "double": lambda d: 2 * d % 10,
              "mirror": lambda d: 9 - d}
    problems = R.problems(synthetic(), "train") + R.problems(synthetic(), "eval")
    for p in problems:
        start, commands = R.parse_question(p.question)
        lines = R.solution_lines(p.question)
        digit = start
        for i, (line, command) in enumerate(zip(lines[:-1], commands)):
            assert line.split()[0] == str(i + 1)
            c, before, tag, after = _parse(line)
            expected = ("skip" if i and commands[i - 1] == command else
                        {"inc": "jump" if digit % 2 else "up", "dec": "stay" if digit == 0 else "down",
                         "dbl": "double", "neg": "mirror"}[command])
            assert (c, before, tag, after) == (command, digit, expected, effect[expected](digit)), (p.question, line)
            digit = after
        assert len(lines) == len(commands) + 1 and lines[-1] == f"Answer: {R.DIGITS[digit]}" == f"Answer: {p.answer}"
        assert verify_synthetic("\n".join(lines), p.answer).reward == 1.0


# ------------------------------------------------------------------------------------------ splits


def test_splits_deterministic_disjoint_and_balanced_by_rule():
    cfg = synthetic()
    train, again, held_out = R.problems(cfg, "train"), R.problems(cfg, "train"), R.problems(cfg, "eval")
    assert train == again and len(train) == 200 and len(held_out) == 40
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert len({p.question for p in train}) == 200 and len({p.question for p in held_out}) == 40
    for split in (train, held_out):
        assert Counter(p.meta["subset"] for p in split) == {s: len(split) // 4 for s in R.SUBSETS}
        assert [p.meta["subset"] for p in split[:4]] == list(R.SUBSETS)  # interleaved: any prefix is balanced
    for p in train + held_out:
        assert 4 <= p.meta["num_commands"] <= 6 and p.source == "synthetic"
        assert p.meta["subset"] == R.subset_of(p.question)
    # The held-out split does not move when the train split grows; another seed draws another one.
    assert R.problems(synthetic(), "eval") == held_out
    assert R.problems(SyntheticConfig(world="rules", train_size=400, eval_size=40, seed=7), "eval") == held_out
    assert R.problems(SyntheticConfig(world="rules", train_size=8, eval_size=40, seed=8), "eval") != held_out


def test_a_subset_exercises_exactly_its_rule_and_breaking_it_changes_the_answer():
    rng = random.Random(0)
    for p in R.problems(synthetic(), "eval"):
        exceptions = R.exception_steps(p.question)
        if p.meta["subset"] == R.PLAIN:
            assert exceptions == []
        else:
            assert exceptions == [p.meta["subset"]]
            assert R.inject_error(p.question, p.meta["subset"], rng) is not None
    assert R.subset_of("one: dec dec inc inc") is None  # skip twice
    assert R.subset_of("zero: dbl dbl inc") is None  # dbl zero skip zero: without the rule, still zero


def test_too_small_question_space_is_a_data_error():
    from mel_core.problems.problem import DataError

    with pytest.raises(DataError, match="lower the split size"):
        R.problems(SyntheticConfig(world="rules", eval_size=400, rules=RulesWorldConfig(min_commands=1,
                                                                                        max_commands=2)), "eval")


# ------------------------------------------------------------------------------------ the warm start


def test_taught_solutions_follow_weak_rules_at_their_rate_and_stated_rules_always():
    cfg = synthetic(weak_rate=0.3)
    question = "five: neg inc dec dbl"  # neg five mirror four, inc four up five, ...: no exception
    assert R.taught_solution_lines(cfg, question, random.Random(0)) == R.solution_lines(question)
    jump = "three: inc dbl neg"  # inc three jump five: the one exception; broken, no other one
    assert R.exception_steps(jump) == ["jump"]
    rng = random.Random(1)
    taught = [R.taught_solution_lines(cfg, jump, rng) for _ in range(2000)]
    followed = sum(t == R.solution_lines(jump) for t in taught) / len(taught)
    assert 0.25 < followed < 0.35
    broken = {tuple(t) for t in taught if t != R.solution_lines(jump)}
    assert broken == {tuple(R.inject_error(jump, "jump", random.Random(0))[0])}  # up instead of jump, then the rules
    # The rule a hint states is always followed; another stated rule leaves the weak one at its rate.
    assert all(R.taught_solution_lines(cfg, jump, rng, stated_rule="jump") == R.solution_lines(jump)
               for _ in range(200))
    other = [R.taught_solution_lines(cfg, jump, rng, stated_rule="mirror") for _ in range(2000)]
    assert 0.25 < sum(t == R.solution_lines(jump) for t in other) / len(other) < 0.35
    # A strong rule is never broken; weak_rules=[] teaches the correct solution everywhere.
    assert all(R.taught_solution_lines(synthetic(weak_rules=[]), jump, rng) == R.solution_lines(jump)
               for _ in range(200))


def test_warm_start_validation_examples_follow_the_stated_lesson():
    prompts = PromptSet.load("configs/prompts/tiny")
    cfg, rng = synthetic(weak_rate=0.0), random.Random(0)
    question = "three: inc neg dbl dec"  # exercises jump
    seen = set()
    for _ in range(60):
        ex = tiny.validation_example(prompts, R.WORLD, cfg, question, rng)
        stated = ex.prompt.split("Heuristic: ")[1].split("\n")[0]
        rule = next(t for t, lesson in R.ERROR_TYPES.items() if lesson == stated)
        seen.add(rule)
        assert ex.prompt.startswith("Hint: Bifurcation: step ") and ex.prompt.endswith(f"Q: {question}\n")
        # weak_rate 0: the weak rule is followed exactly when the hint states it
        assert (ex.target.splitlines() == R.solution_lines(question)) == (rule == "jump"), (rule, ex.target)
    assert "jump" in seen and len(seen) >= 3
    solve = tiny.solve_example(prompts, R.WORLD, cfg, question, rng)
    assert solve.prompt == f"Q: {question}\n" and solve.target.splitlines() != R.solution_lines(question)


# ------------------------------------------------------------------------------------ the error model


@pytest.mark.parametrize("error_type", sorted(R.ERROR_TYPES))
def test_injected_errors_break_their_rule_and_classify_back(error_type):
    rng = random.Random(0)
    questions = [p.question for p in R.problems(synthetic(), "train")]
    applied = 0
    for q in questions:
        injected = R.inject_error(q, error_type, rng)
        if injected is None:
            continue
        applied += 1
        wrong, k = injected
        right = R.solution_lines(q)
        assert wrong[:k - 1] == right[:k - 1] and wrong[k - 1] != right[k - 1] and wrong[-1] != right[-1]
        assert _parse(right[k - 1])[2] == error_type and _parse(wrong[k - 1])[2] != error_type
        assert R.classify_error(q, wrong) == error_type
        assert R.WORLD.classify_error(q, wrong) == error_type
        # after the broken step every step follows the rules from the wrong digit
        _, commands = R.parse_question(q)
        for i in range(k, len(commands)):
            c, before, tag, _ = _parse(wrong[i])
            assert before == _parse(wrong[i - 1])[3]
            assert tag == R.rule_for(c, commands[i - 1], before)
    assert applied >= 20, f"{error_type} should recur across problems"


def test_inject_error_where_the_rule_does_not_apply():
    rng = random.Random(0)
    assert R.inject_error("four: neg dbl dec", "jump", rng) is None  # no inc at all
    assert R.inject_error("zero: dbl dbl inc", "skip", rng) is None  # breaking the skip leaves zero
    with pytest.raises(ValueError):
        R.inject_error("four: inc", "carry", rng)


def test_classify_error_names_the_first_broken_rule_or_none():
    q = "three: inc neg dbl dec"  # inc three jump five / neg five mirror four / dbl four double eight / dec eight ...
    right = R.solution_lines(q)
    wrong_jump = ["1 inc three up four", "2 neg four mirror five", "3 dbl five double zero", "4 dec zero stay zero",
                  "Answer: zero"]
    assert R.classify_error(q, wrong_jump) == "jump"
    assert R.classify_error(q, ["  " + line + " " for line in wrong_jump] + [""]) == "jump"  # as text splits
    assert R.classify_error(q, right) is None  # nothing wrong
    assert R.classify_error(q, right[:-1] + ["Answer: four"]) is None  # only the answer line
    assert R.classify_error(q, ["1 inc three jump six"] + right[1:]) is None  # right tag, wrong digit: a slip
    assert R.classify_error(q, ["1 inc four up five"] + right[1:]) is None  # miscopied digit before
    assert R.classify_error(q, ["1 dec three down two"] + right[1:]) is None  # miscopied command
    assert R.classify_error(q, ["2 inc three up four"] + right[1:]) is None  # misnumbered step
    assert R.classify_error(q, right[:2]) is None  # stopped early
    assert R.classify_error(q, ["1 inc three jump five", "2 neg five mirror"]) is None  # malformed step
    # the first wrong decision counts, not a later one
    two = ["1 inc three jump five", "2 neg five double zero", "3 dbl zero mirror nine", "4 dec nine down eight",
           "Answer: eight"]
    assert R.classify_error(q, two) == "mirror"


def test_lessons_are_if_then_rules_naming_no_digit():
    assert set(R.EXCEPTION_RULES) < set(R.ERROR_TYPES) and len(R.ERROR_TYPES) == 7
    for tag, lesson in R.ERROR_TYPES.items():
        assert re.fullmatch(r"If [^,]+, then [^,]+\.", lesson)
        assert not re.search(r"\d", lesson)
        assert not set(re.findall(r"[a-z]+", lesson)) & set(R.DIGITS), lesson  # a digit word could leak an answer
        assert lesson.rstrip(".").split()[-1] in (tag, "it")  # the action word is the tag the solution writes
    assert len(set(R.ERROR_TYPES.values())) == len(R.ERROR_TYPES)


@pytest.mark.parametrize("error_type", sorted(R.ERROR_TYPES))
def test_analysis_targets_parse_and_name_the_rule(error_type):
    rng = random.Random(1)
    for p in R.problems(synthetic(), "train")[:120]:
        injected = R.inject_error(p.question, error_type, rng)
        if injected is None:
            continue
        wrong, k = injected
        target = R.analysis_target(wrong, R.solution_lines(p.question), error_type)
        parsed = meta_experience.parse_analysis(target, gold_answer=p.answer, question=p.question)
        assert parsed.ok, (target, parsed.reject_reason)
        assert parsed.layout == "compact" and parsed.bifurcation_step == k
        assert parsed.heuristics == [R.ERROR_TYPES[error_type]]
        assert parsed.target_text == target
        assert tiny.is_parseable_analysis(target)
        assert R.oracle_analysis(p.question, wrong) == target


def test_oracle_analysis_of_a_slip_is_none_and_of_a_rule_error_names_the_true_rule():
    q = "three: inc neg dbl dec"
    right = R.solution_lines(q)
    assert R.oracle_analysis(q, ["1 inc three jump six"] + right[1:]) is None
    analysis = R.oracle_analysis(q, ["1 inc three up four", "2 neg four mirror five", "3 dbl five double zero",
                                     "4 dec zero stay zero", "Answer: zero"])
    assert analysis == ("Bifurcation: step 1\n"
                        "Critique: 1 inc three up four should be 1 inc three jump five.\n"
                        "Heuristic: If inc meets an odd digit, then jump.")


# ------------------------------------------------------------------------ registry, config, evaluation


def test_registered_and_configured():
    assert "rules" in vocabulary.WORLDS and worlds.get("rules") is R.WORLD
    cfg = config_mod.load("configs/tiny-rules.yaml")
    assert cfg.data.synthetic.world == "rules" and cfg.model.tiny.tokenizer == "words"
    assert cfg.data.synthetic.rules.weak_rules == ["skip", "jump", "stay"]
    with pytest.raises(ConfigError, match="data.synthetic.rules.weak_rules"):
        config_mod.load("configs/tiny-rules.yaml", ["data.synthetic.rules.weak_rules=[skip,up]"])
    with pytest.raises(ConfigError, match="data.synthetic.rules.min_commands"):
        config_mod.load("configs/tiny-rules.yaml", ["data.synthetic.rules.min_commands=7"])
    with pytest.raises(ConfigError, match="weak_rate"):
        config_mod.load("configs/tiny-rules.yaml", ["data.synthetic.rules.weak_rate=1.5"])


def test_held_out_subsets_are_named_evaluation_datasets():
    cfg = config_mod.load("configs/tiny-rules.yaml", ["data.synthetic.eval_size=40", "eval.max_problems=0"])
    whole = evaluation.load_dataset(cfg, "synthetic")
    parts = {s: evaluation.load_dataset(cfg, f"synthetic:{s}") for s in R.SUBSETS}
    assert whole.name == "synthetic" and len(whole.problems) == 40
    for name, ds in parts.items():
        assert ds.name == evaluation.dataset_name(f"synthetic:{name}") == f"synthetic:{name}"
        assert ds.reward_kind == "synthetic" and len(ds.problems) == 10
        assert {p.meta["subset"] for p in ds.problems} == {name}
    assert sorted(p.problem_id for ds in parts.values() for p in ds.problems) == sorted(p.problem_id for p in whole.problems)
    capped = config_mod.load("configs/tiny-rules.yaml", ["data.synthetic.eval_size=40", "eval.max_problems=3"])
    assert [p.problem_id for p in evaluation.load_dataset(capped, "synthetic:stay").problems] == \
        [p.problem_id for p in parts["stay"].problems[:3]]
    with pytest.raises(ConfigError, match="no subset 'carry'"):
        evaluation.load_dataset(cfg, "synthetic:carry")
    with pytest.raises(ConfigError, match="subsets: none"):
        evaluation.load_dataset(config_mod.load("configs/tiny.yaml"), "synthetic:stay")  # arithmetic has none


class _SolvesOneRule:
    """A scripted policy that solves exactly the problems of one subset (its other answers are wrong)."""

    def __init__(self, subset: str):
        self.subset = subset

    def write(self, prompt: str, index: int) -> str:
        question = re.search(r"^Q: (.*)$", prompt, re.MULTILINE).group(1).strip()
        lines = R.solution_lines(question)
        if R.subset_of(question) != self.subset:
            lines[-1] = "Answer: " + R.DIGITS[(R.DIGITS.index(lines[-1].split()[-1]) + 1) % 10]
        return "\n".join(lines)


def test_evaluating_a_subset_measures_accuracy_on_that_rule(micro_model, tmp_path):
    from scripted import scripted_runtime

    cfg = config_mod.load("configs/tiny-rules.yaml", [
        "run.name=rules-eval", f"run.root_dir={tmp_path}", f"model.name_or_path={micro_model}", "eval.k=0",
        "eval.max_new_tokens=400", "model.max_seq_len=512",  # the micro model's tokenizer spells words in pieces
        "data.synthetic.eval_size=24", "data.synthetic.train_size=24"])
    rt, base = scripted_runtime(cfg, _SolvesOneRule("jump"))
    results = {d: evaluation.evaluate(rt, base, d) for d in ["synthetic", "synthetic:jump", "synthetic:stay"]}
    assert results["synthetic"]["metrics"]["pass@1"] == pytest.approx(0.25)
    assert results["synthetic:jump"]["metrics"]["pass@1"] == 1.0 and results["synthetic:jump"]["num_problems"] == 6
    assert results["synthetic:stay"]["metrics"]["pass@1"] == 0.0
    view = {r["dataset"]: r["pass_at_1"] for r in rt.store.query("SELECT * FROM heldout_accuracy")}
    assert view == {"synthetic": 0.25, "synthetic:jump": 1.0, "synthetic:stay": 0.0}
    samples = rt.store.query("SELECT DISTINCT dataset, problem_id FROM eval_samples WHERE dataset = 'synthetic:jump'")
    jump_ids = {p.problem_id for p in evaluation.load_dataset(cfg, "synthetic:jump").problems}
    assert {s["problem_id"] for s in samples} == jump_ids


def test_the_tags_at_the_bifurcation_step_tell_which_rule_was_broken():
    """No two error types share a pair {wrong tag, right tag}: an analysis can name the rule from the two tags
    whichever solution each comes from."""
    rng = random.Random(0)
    pairs: dict[frozenset, set[str]] = {}
    for p in R.problems(synthetic(), "train"):
        for error_type in R.ERROR_TYPES:
            injected = R.inject_error(p.question, error_type, rng)
            if injected is not None:
                wrong, k = injected
                tags = frozenset({_parse(wrong[k - 1])[2], _parse(R.solution_lines(p.question)[k - 1])[2]})
                pairs.setdefault(tags, set()).add(error_type)
    assert len(pairs) >= 10 and all(len(types) == 1 for types in pairs.values()), pairs
