import pytest

from mel_core.prompts import PromptSet


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
