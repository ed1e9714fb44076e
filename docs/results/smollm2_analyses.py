"""What a real pretrained model writes when MEL asks it for a meta-experience: SmolLM2-135M-Instruct's analyses of its
own rollouts, read from the run's store (docs/RESULTS.md section 4; data in docs/results/smollm2.json and .md).

Per analysis: how it ended (accepted, or rejected with the parser's / the replay's reason), whether all four sections
of the paper's format were found (Failure Resolution Path, Analysis of Success Factors, First-Person Reflective
Summary, Subject Heuristics: mel_core.algorithm.meta_experience.sections), how many heuristics it gave, whether it ran
to the length limit; acceptance among all analyses and retention among those that reached the replay; held-out greedy
Pass@1 at the first and last evaluation; three accepted and three rejected analyses quoted in full.

    .venv/bin/python docs/results/smollm2_analyses.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's mel_core, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # benchmarks.parse_rate reads the fixtures
from mel_core.algorithm.meta_experience.sections import find_sections, prepare
from mel_core.store.reader import StoreReader

HERE = Path(__file__).parent
FOUR = ("failure", "success_factors", "reflection", "heuristics")


def _sections(raw: str) -> set[str]:
    body, _ = prepare(raw or "")
    _, sections = find_sections(body)
    return {s.name for s in sections}


def read(run_dir: str) -> dict:
    store = StoreReader(f"{run_dir}/mel.duckdb")
    analyses = store.query(
        "SELECT a.analysis_id, a.step, a.status, a.reject_reason, a.raw_text, a.finish_reason, a.num_tokens, "
        "a.replay_text, a.trained_text, a.bifurcation_step, pr.question, pr.answer AS gold_answer, "
        "(SELECT count(*) FROM heuristics h WHERE h.analysis_id = a.analysis_id) AS heuristics "
        "FROM analyses a JOIN pairs p USING (pair_id) JOIN prompts pr ON pr.prompt_id = p.prompt_id ORDER BY a.step, "
        "a.analysis_id")
    evals = store.query("SELECT step, value FROM evals WHERE metric = 'pass@1' ORDER BY step")
    run = store.query("SELECT name, config_json, created_at FROM runs ORDER BY created_at LIMIT 1")[0]
    cfg = json.loads(run["config_json"])
    setting = {"name": run["name"], "created_at": str(run["created_at"]),
               "prompts_per_step": cfg["sampling"]["prompts_per_step"], "group_size": cfg["sampling"]["group_size"],
               "pairs_per_group": cfg["experience"]["pairs_per_group"],
               "analysis_temperature": cfg["experience"]["analysis_temperature"],
               "analysis_max_new_tokens": cfg["experience"]["analysis_max_new_tokens"],
               "steps": len({a["step"] for a in analyses})}
    updates = store.query("SELECT step, loss, rl_loss, nll_loss, num_sequences FROM updates ORDER BY step")
    return {"run_dir": run_dir, "setting": setting, "analyses": analyses, "evals": evals, "updates": updates}


def summarize(runs: list[dict]) -> dict:
    rows = [a for r in runs for a in r["analyses"]]
    n = len(rows)
    outcome = collections.Counter(a["reject_reason"] or a["status"] for a in rows)
    found = [_sections(a["raw_text"]) for a in rows]
    replayed = [a for a in rows if a["status"] == "accepted" or a["reject_reason"] == "replay_failed"]
    accepted = [a for a in rows if a["status"] == "accepted"]
    per_section = {name: sum(name in f for f in found) for name in FOUR}
    # the parse rate on this real output, before and after the parser learned the paper's titles (the revision and
    # file benchmarks/parse_rate.py compares on the fixture corpus)
    from benchmarks.parse_rate import load_revision
    from mel_core.algorithm import meta_experience
    before = load_revision("bb9e215", "mel_core/meta_experience.py")
    parse_rate = {label: sum(parser.parse_analysis(a["raw_text"] or "", gold_answer=a["gold_answer"],
                                                   question=a["question"]).ok for a in rows)
                  for label, parser in (("before (bb9e215)", before), ("after", meta_experience))}
    return {
        "runs": [{**r["setting"], "analyses": len(r["analyses"]),
                  "outcomes": dict(collections.Counter(a["reject_reason"] or a["status"] for a in r["analyses"]))}
                 for r in runs],
        "analyses": n,
        "outcomes": dict(outcome.most_common()),
        "parsed": sum(a["reject_reason"] in (None, "replay_failed") for a in rows),
        "parse_rate_before_after": parse_rate,
        "all_four_sections": sum(set(FOUR) <= f for f in found),
        "sections_found": per_section,
        "ran_to_length_limit": sum(a["finish_reason"] == "length" for a in rows),
        "mean_tokens": sum(a["num_tokens"] or 0 for a in rows) / max(n, 1),
        "heuristics_per_analysis": sum(a["heuristics"] for a in rows) / max(n, 1),
        "with_a_heuristic": sum(a["heuristics"] > 0 for a in rows),
        "leak_rejections": sum("leak" in (a["reject_reason"] or "") for a in rows),
        "replayed": len(replayed),
        "accepted": len(accepted),
        "acceptance_rate": len(accepted) / max(n, 1),
        "retention_ratio": len(accepted) / len(replayed) if replayed else None,
        "heldout_pass1": [{"run": Path(r["run_dir"]).name, "first": r["evals"][0], "last": r["evals"][-1]}
                          for r in runs if r["evals"]],
    }


def _quote(a: dict) -> list[str]:
    head = (f"**{a['analysis_id']}** (step {a['step']}): {a['status']}"
            f"{' — ' + a['reject_reason'] if a['reject_reason'] else ''}; {a['num_tokens']} tokens, "
            f"finish {a['finish_reason']}, {a['heuristics']} heuristic(s). Problem: {a['question']} [gold {a['gold_answer']}]")
    out = [head, "", "```text", (a["raw_text"] or "").rstrip(), "```"]
    if a["replay_text"]:
        out += ["", "Replay with the heuristic(s) in context:", "", "```text", a["replay_text"].rstrip(), "```"]
    return out + [""]


def write(runs: list[dict], s: dict, argv: list[str]) -> None:
    rows = [a for r in runs for a in r["analyses"]]
    accepted = [a for a in rows if a["status"] == "accepted"][:3]
    # the three rejections quoted are the most common reasons' first examples, so the quotes show what is typical
    rejected, seen = [], set()
    for reason in s["outcomes"]:
        a = next((a for a in rows if a["reject_reason"] == reason and reason not in seen), None)
        if a is not None and len(rejected) < 3:
            rejected.append(a)
            seen.add(reason)
    rejected += [a for a in rows if a["status"] == "rejected" and a not in rejected][:3 - len(rejected)]
    (HERE / "smollm2.json").write_text(json.dumps(s, indent=1, default=str) + "\n")
    n = max(s["analyses"], 1)
    lines = [f"# SmolLM2-135M-Instruct's own analyses ({s['analyses']} analyses)", "",
             f"Written by `.venv/bin/python docs/results/smollm2_analyses.py {' '.join(argv)}` from the run(s) "
             "listed in docs/RESULTS.md section 4; numbers in smollm2.json.", "",
             "| run | steps with analyses | B x G, pairs per group | analysis T, token limit | analyses |",
             "|---|---|---|---|---|",
             *[f"| {r['name']} ({r['created_at'][:16]}) | {r['steps']} | {r['prompts_per_step']} x {r['group_size']}, "
               f"{r['pairs_per_group']} | {r['analysis_temperature']}, {r['analysis_max_new_tokens']} | {r['analyses']} |"
               for r in s["runs"]], "",
             "| outcome | analyses | share |", "|---|---|---|",
             *[f"| {k} | {v} | {v / n:.1%} |" for k, v in s["outcomes"].items()], "",
             f"- parsed (reached the replay): {s['parsed']} ({s['parsed'] / n:.1%}); re-parsed now: "
             + ", ".join(f"{k} {v}/{s['analyses']}" for k, v in s["parse_rate_before_after"].items()),
             f"- all four sections of the paper's format found: {s['all_four_sections']} ({s['all_four_sections'] / n:.1%}); "
             "each section: " + ", ".join(f"{k} {v}" for k, v in s["sections_found"].items()),
             f"- ran to the length limit: {s['ran_to_length_limit']} ({s['ran_to_length_limit'] / n:.1%}); "
             f"mean {s['mean_tokens']:.0f} tokens",
             f"- heuristics per analysis: {s['heuristics_per_analysis']:.2f} (analyses with at least one: "
             f"{s['with_a_heuristic']})",
             f"- leak rejections: {s['leak_rejections']}",
             f"- acceptance (accepted / analyses): {s['accepted']}/{s['analyses']}; retention (accepted / replayed): "
             f"{s['accepted']}/{s['replayed']}", ""]
    for h in s["heldout_pass1"]:
        first = (f"{h['first']['value']:.3f} at step {h['first']['step']} -> " if h["first"] != h["last"] else "")
        lines.append(f"- held-out greedy Pass@1 ({h['run']}): {first}{h['last']['value']:.3f} at step {h['last']['step']}")
    lines += ["", f"## Accepted analyses ({len(accepted)} quoted)", ""]
    for a in accepted:
        lines += _quote(a)
    if not accepted:
        lines += ["None was accepted.", ""]
    lines += [f"## Rejected analyses ({len(rejected)} quoted: the first of each reason, most common first, then the next ones)", ""]
    for a in rejected:
        lines += _quote(a)
    (HERE / "smollm2.md").write_text("\n".join(lines))


def main(argv: list[str]) -> dict:
    runs = [read(d) for d in argv]
    s = summarize(runs)
    write(runs, s, argv)
    print(json.dumps({k: v for k, v in s.items() if k not in ("heldout_pass1", "runs")}, indent=1, default=str))
    return s


if __name__ == "__main__":
    main(sys.argv[1:])
