import pytest

from mel_core.problems.prompts import PromptSet


def test_tiny_prompts_render_incorrect_first():
    ps = PromptSet.load("configs/prompts/tiny")
    text = ps.render_analysis("1+2", incorrect="1+2=4\nAnswer: 4\n", correct="1+2=3\nAnswer: 3")
    assert text.index("Answer: 4") < text.index("Answer: 3")
    assert ps.render_solve("1+2").startswith("Q: 1+2")
    assert "If a, then b." in ps.render_validation("1+2", "If a, then b.")


def test_missing_field_is_an_error(tmp_path):
    for name in ("solve", "analysis", "validation"):
        (tmp_path / f"{name}.txt").write_text("{question} {incorrect} {correct} {experience}")
    (tmp_path / "analysis.txt").write_text("{question} {correct}")
    with pytest.raises(ValueError, match="incorrect"):
        PromptSet.load(tmp_path)


PAPER_SECTIONS = [
    ("Failure Resolution Path & Error Pattern Recognition", ("Failure Point", "Latent Cognitive Pattern")),
    ("Analysis of Success Factors", ("Reasoning Pivot", "Robustness Factor", "Reason for Effectiveness")),
    ("First-Person Reflective Summary", ("Review", "Insight", "Action")),
    ("Subject Heuristics (Internalized Experience)", ()),
]


def test_paper_prompts_render_with_boxed_and_sections():
    ps = PromptSet.load("configs/prompts/paper")
    solve = ps.render_solve("What is 2+3?")
    assert "\\boxed{}" in solve and "What is 2+3?" in solve
    analysis = ps.render_analysis("What is 2+3?", incorrect="2+3=6 \\boxed{6}", correct="2+3=5 \\boxed{5}")
    assert analysis.index("\\boxed{6}") < analysis.index("\\boxed{5}")  # incorrect first
    assert analysis.index("(incorrect)") < analysis.index("(correct)")
    assert "meta-cognitive reasoning analyst" in analysis
    for section in ("Bifurcation step: N", "If [condition], then [action]"):
        assert section in analysis, section
    # the paper's section titles (Appendix C), in its order, each with its fields named inside it
    at = 0
    for title, fields in PAPER_SECTIONS:
        at = analysis.index(f"## {title}\n", at)
        for name in fields:
            assert f"\n{name}: " in analysis[at:analysis.find("\n## ", at + 1)], (title, name)
    validation = ps.render_validation("What is 2+3?", "If adding, then line up the digits.")
    assert "\\boxed{}" in validation
    assert validation.index("If adding, then line up the digits.") < validation.index("What is 2+3?")
    for text in (solve, analysis, validation):
        assert "{{" not in text and "}}" not in text


def _chat_tokenizer(template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "user": 3, "assistant": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>")
    if template is not None:
        fast.chat_template = template
    return fast


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_to_model_input_wraps_one_user_turn_with_chat_template():
    ps = PromptSet.load("configs/prompts/paper")
    text = ps.render_solve("What is 2+3?")
    tok = _chat_tokenizer(CHATML)
    wrapped = ps.to_model_input(text, tok, use_chat_template=True)
    assert wrapped == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    assert PromptSet.to_model_input(text, tok, True) == wrapped  # callable on the class too
    # off, no tokenizer, or a tokenizer without a template (base models): the raw text
    assert ps.to_model_input(text, tok, use_chat_template=False) == text
    assert ps.to_model_input(text, None, use_chat_template=True) == text
    assert ps.to_model_input(text, _chat_tokenizer(None), use_chat_template=True) == text


def test_to_model_input_passes_template_kwargs():
    tok = _chat_tokenizer(CHATML.replace("<|im_start|>assistant\n{% endif %}",
                                         "<|im_start|>assistant\n{% if enable_thinking is defined and not "
                                         "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"))
    assert PromptSet.to_model_input("hi", tok, True, enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    assert PromptSet.to_model_input("hi", tok, True).endswith("assistant\n")


def test_two_pass_templates_are_optional_and_rendered(tmp_path):
    ps = PromptSet.load("configs/prompts/paper")
    abstract = ps.render_abstract("What is 2+3?", "2+3=6", "2+3=5", diagnosis="## Failure Point\nBifurcation step: 1\n")
    assert abstract.index("2+3=6") < abstract.index("2+3=5") < abstract.index("Bifurcation step: 1")
    assert "## Subject Heuristics" in abstract and "## Subject Heuristics" not in ps.render_diagnose("q", "a", "b")
    tiny = PromptSet.load("configs/prompts/tiny")
    assert tiny.diagnose is None and tiny.render_diagnose("1+2", "x", "y") == tiny.render_analysis("1+2", "x", "y")
    # a set without abstract.txt loads, but two_pass refuses it before any work starts
    core = {"solve": "{question}", "analysis": "{question}{incorrect}{correct}", "validation": "{experience}{question}"}
    for name, text in core.items():
        (tmp_path / f"{name}.txt").write_text(text)
    assert PromptSet.load(tmp_path).abstract is None
    from mel_core import config as C
    with pytest.raises(C.ConfigError, match="abstract.txt"):
        C.load("configs/tiny.yaml", [f"prompts.dir={tmp_path}", "experience.analysis_mode=two_pass"])
    C.load("configs/tiny.yaml", [f"prompts.dir={tmp_path}"])  # single_pass does not need it


def test_the_paper_prompts_headers_are_the_parsers():
    """An analysis that follows a template — its headers, its fields — parses into the sections it asks for."""
    from mel_core.algorithm import meta_experience

    ps = PromptSet.load("configs/prompts/paper")
    body = {"Failure Resolution": "Bifurcation step: 2\nFailure Point: divided by k.\nLatent Cognitive Pattern: haste.",
            "Analysis of Success": "Reasoning Pivot: split on k.\nRobustness Factor: cases.\n"
                                   "Reason for Effectiveness: nothing assumed.",
            "First-Person": "Review: I divided.\nInsight: k can vanish.\nAction: I will split first.",
            "Subject Heuristics": "- If a parameter can vanish, then treat that case separately."}

    def follow(template: str) -> str:
        headers = [line for line in template.splitlines() if line.startswith("## ")]
        return "\n\n".join(h + "\n" + next(b for k, b in body.items() if h[3:].startswith(k)) for h in headers)

    full = meta_experience.parse_analysis(follow(ps.analysis))
    assert full.ok and full.bifurcation_step == 2 and full.failure.endswith("Latent Cognitive Pattern: haste.")
    assert full.success_factors.endswith("nothing assumed.") and full.reflection.endswith("I will split first.")
    diagnosis = follow(ps.diagnose)
    assert meta_experience.parse_diagnosis(diagnosis).ok and "Subject Heuristics" not in diagnosis
    abstract = meta_experience.parse_heuristics(follow(ps.abstract))
    assert abstract.ok and abstract.heuristics == ["If a parameter can vanish, then treat that case separately."]
    assert abstract.target_text.startswith("## Subject Heuristics")  # the template's one header, nothing else
