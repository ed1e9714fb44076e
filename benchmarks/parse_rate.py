"""Parse rate of the meta-experience parser on the fixture corpus, before and after: an older revision's
parser, one file (default: ``bb9e215:mel_core/meta_experience.py``, the parser before the wings move and the paper's
section titles) against this checkout's ``mel_core.algorithm.meta_experience``.

    .venv/bin/python benchmarks/parse_rate.py [--rev bb9e215] [--path mel_core/meta_experience.py]

For each parser: well-formed analyses parsed (ok), well-formed ones with every expected field right (for
the old parser, which has no target_text or heuristic_names, every field it has), and malformed ones
rejected with their expected reason — on the whole corpus and on the analyses written in the paper's own
Appendix C format (SUBSETS). The corpus and its expectations are tests/fixtures/analyses (see
tests/test_meta_experience.py). Nothing is trained or generated.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from test_meta_experience import _mismatches, load_fixtures  # noqa: E402

from benchmarks._doc import write_section  # noqa: E402
from mel_core.algorithm import meta_experience  # noqa: E402

# The table's rows for each parser: fixture names (fnmatch patterns). *_appc_* analyses use the paper's Appendix C
# section titles and fields; *_appc_titles_* the exact titles (the others: paraphrased, out of order, by number).
SUBSETS = {"all": "*", "paper's exact titles": "*_appc_titles_*", "paper's format, any": "*_appc_*"}


def load_revision(rev: str, path: str):
    """The module at `rev:path`, imported under a private name (it is plain Python with no package imports)."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"parser_at_{rev}", f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def score(parser, fixtures: list[dict]) -> dict:
    good = bad = good_ok = good_right = bad_right = 0
    for fx in fixtures:
        p = parser.parse_analysis(fx["text"], gold_answer=fx["gold_answer"], question=fx["question"],
                                  max_heuristics=fx["max_heuristics"])
        if fx["expect"]["reject_reason"] is None:
            good += 1
            good_ok += p.ok
            good_right += p.ok and not _mismatches(p, fx)  # a parser without target_text: its other fields
        else:
            bad += 1
            bad_right += p.reject_reason == fx["expect"]["reject_reason"]
    return {"good": good, "good_ok": good_ok, "good_right": good_right, "bad": bad, "bad_right": bad_right}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="bb9e215")
    ap.add_argument("--path", default="mel_core/meta_experience.py")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not rewrite docs/BENCHMARKS.md")
    args = ap.parse_args()
    fixtures = load_fixtures()
    rows = []
    for label, parser in ((f"before (`{args.rev}:{args.path}`)", load_revision(args.rev, args.path)),
                          ("after (`mel_core/algorithm/meta_experience.py`)", meta_experience)):
        for subset, pattern in SUBSETS.items():
            s = score(parser, [fx for fx in fixtures if fnmatch.fnmatch(fx["name"], pattern)])
            print(f"{label}, {subset}: well-formed parsed {s['good_ok']}/{s['good']} "
                  f"(all fields right {s['good_right']}/{s['good']}), "
                  f"malformed rejected with the expected reason {s['bad_right']}/{s['bad']}")
            rows.append(f"| {label} | {subset} (`{pattern}`) | {s['good_ok']}/{s['good']} | "
                        f"{s['good_right']}/{s['good']} | {s['bad_right']}/{s['bad']} |")
    if not args.no_doc:
        write_section("parse_rate.py", f"python benchmarks/parse_rate.py --rev {args.rev} --path {args.path}", [
            f"The fixture corpus `tests/fixtures/analyses` ({len(fixtures)} analyses in the paper's format as real "
            "models lay it out, with expected parses); `*_appc_*` fixtures use the paper's own Appendix C section "
            "titles and fields.", "",
            "| parser | fixtures | well-formed parsed | well-formed, every field right | malformed rejected for the "
            "expected reason |", "|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
