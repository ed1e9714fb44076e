"""The meta-experience M = (s*, C, H): parsing an analysis the model wrote into it, the text M* that is trained on,
and its rendering for the replay. docs/PARSER.md says which layouts, section titles, rule forms and leaks the parser
accepts and why.
"""

from mel_core.algorithm.meta_experience.parse import (
    PARTS,
    ParsedAnalysis,
    combine,
    parse_analysis,
    parse_diagnosis,
    parse_heuristics,
    render_experience,
    render_heuristics,
)
from mel_core.algorithm.meta_experience.rules import is_rule
from mel_core.algorithm.meta_experience.sections import diagnosis_part

__all__ = ["PARTS", "ParsedAnalysis", "combine", "diagnosis_part", "is_rule", "parse_analysis", "parse_diagnosis",
           "parse_heuristics", "render_experience", "render_heuristics"]
