"""Evaluation of one policy version on one dataset: greedy Pass@1, and Avg@k / Pass@k from k samples.

The policy sees the plain solve prompt (through ``Runtime.model_input``, so chat templates apply) and
never a meta-experience [P]: MEL's claim is that the experience is internalized in the weights. Each
mode is one batched engine call (all problems greedy; all problems x k samples at eval.temperature),
verified in one ``Verifier.verify`` call with the dataset's reward kind and ``cfg.verify``.

A dataset is ``synthetic`` (the held-out split of the embedded task, disjoint from training),
``synthetic:<subset>`` (one named part of it, e.g. the rules world's problems of one rule) or the
path of a JSONL file (MATH-500, GSM8K, AIME24/25, AMC23, OlympiadBench ship under ``data/``). A *suite*
names a fixed list of them: ``paper`` is the MEL paper's Table 1 (:data:`PAPER_SUITE`), printed in that
table's layout by :func:`format_suite_table`.

Records: one ``evals`` row per metric and one ``eval_samples`` row per generation. An evaluation of
(run, checkpoint, dataset) replaces that triple's earlier rows in one transaction, so the store
always holds one consistent evaluation of it (with the same config, the same values: greedy decoding
is deterministic and sampling is seeded).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mel_core.config import ConfigError, MelConfig
from mel_core.ids import derive_seed, make_id, now
from mel_core.model.checkpoints import Checkpoint
from mel_core.model.engines.base import SamplingParams
from mel_core.problems import worlds
from mel_core.problems.sources import Fields, Problem, load_file, load_jsonl, load_problems, source_name
from mel_core.step.runtime import Runtime
from mel_core.store import run_reads, stage_records
from mel_core.study.metrics import avg_at_k, mean_pass_at_k

SYNTHETIC = "synthetic"
# Bump when the evaluation logic changes, so cached evaluations of the old logic are not reused.
EVAL_VERSION = 1


@dataclass(frozen=True)
class EvalDataset:
    name: str  # what the store's `dataset` column holds: 'synthetic', or the file's source name ('math500')
    problems: list[Problem]
    reward_kind: str  # 'synthetic' (exact integer) or 'math' (math-verify)


# The held-out split of the training data (data.eval_fraction of data.source, or data.eval_source) as an eval dataset.
HELDOUT = "heldout"


def _file_digest(path: Path) -> str:
    """The bytes of a file, or of every file under a folder (a Parquet or save_to_disk dataset), hashed."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if not path.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _fingerprint(cfg: MelConfig, dataset: str) -> str:
    """Changes when the dataset's problems would: the synthetic task's settings, or the file's bytes (of the
    held-out split: its file's, and the fraction held out)."""
    from mel_core.config import resolve_path

    if _synthetic_subset(dataset) is not None:
        return hashlib.sha256(json.dumps(asdict(cfg.data.synthetic), sort_keys=True).encode()).hexdigest()[:16]
    if dataset.strip() == HELDOUT:
        d = cfg.data
        return _file_digest(resolve_path(d.eval_source or d.source)) + f":{d.eval_fraction}:{d.messages_field}"
    return _file_digest(resolve_path(dataset))


def _jsonl_fields(path: Path, cfg: MelConfig) -> tuple[str, str, str]:
    """(question, answer, id) fields of a benchmark file: data.* names when the file has them, else the
    common ones ('problem' or 'question'; 'answer', else OlympiadBench's 'final_answer'); row ids are line
    numbers unless data.id_field is there."""
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        row = {}  # load_jsonl reports the bad line
    d = cfg.data
    question = next((f for f in (d.question_field, "problem", "question") if f in row), d.question_field)
    answer = next((f for f in (d.answer_field, "answer", "final_answer") if f in row), d.answer_field)
    return question, answer, d.id_field if d.id_field and d.id_field in row else ""


def _synthetic_subset(dataset: str) -> str | None:
    """'synthetic' -> '' (the whole held-out split), 'synthetic:stay' -> 'stay' (one named part of it), else None."""
    name = dataset.strip()
    if name.lower() == SYNTHETIC:
        return ""
    head, sep, subset = name.partition(":")
    return subset.strip() if sep and head.strip().lower() == SYNTHETIC and subset.strip() else None


def reward_kind(dataset: str) -> str:
    """How a dataset's answers are verified: 'synthetic' for the embedded world's held-out split or a named part of
    it ('synthetic:stay'), 'math' (math-verify) for a file."""
    return "synthetic" if _synthetic_subset(dataset) is not None else "math"  # (heldout: of a file, so math)


def dataset_name(dataset: str) -> str:
    """The store's name of a configured dataset: 'synthetic', 'synthetic:<subset>' (a named part of the held-out
    split, e.g. the rules world's 'synthetic:stay'), or the file's source name ('data/math500/test.jsonl' ->
    'math500', as its problem ids)."""
    from mel_core.config import resolve_path

    subset = _synthetic_subset(dataset)
    if subset is not None:
        return f"{SYNTHETIC}:{subset}" if subset else SYNTHETIC
    if dataset.strip() == HELDOUT:
        return HELDOUT
    return source_name(resolve_path(dataset))


def synthetic_subset_problems(cfg: MelConfig, subset: str) -> list[Problem]:
    """The held-out problems of one named subset of the world (Problem.meta["subset"]), in split order."""
    world = worlds.get(cfg.data.synthetic.world)
    if subset not in world.subsets:
        known = ", ".join(f"synthetic:{s}" for s in world.subsets) or "none"
        raise ConfigError(f"dataset 'synthetic:{subset}': the {world.name} world has no subset {subset!r} "
                          f"(its subsets: {known})")
    return [p for p in world.problems(cfg.data.synthetic, "eval") if p.meta.get("subset") == subset]


def load_dataset(cfg: MelConfig, dataset: str) -> EvalDataset:
    """The problems of one configured dataset, capped at eval.max_problems (the first N, in order; of a subset,
    its first N)."""
    from mel_core.config import resolve_path

    cap = cfg.eval.max_problems or None
    subset = _synthetic_subset(dataset)
    if subset == "":
        problems = worlds.get(cfg.data.synthetic.world).problems(cfg.data.synthetic, "eval")[:cap]
        return EvalDataset(SYNTHETIC, problems, reward_kind(dataset))
    if subset is not None:
        return EvalDataset(f"{SYNTHETIC}:{subset}", synthetic_subset_problems(cfg, subset)[:cap], reward_kind(dataset))
    if dataset.strip() == HELDOUT:
        if cfg.data.source == SYNTHETIC:
            raise ConfigError("dataset 'heldout': the embedded world's held-out split is 'synthetic'")
        return EvalDataset(HELDOUT, load_problems(cfg.data, "eval")[:cap], reward_kind(dataset))
    path = resolve_path(dataset)
    if not path.exists():
        load_jsonl(path)  # raises its (permanent) missing-file error, naming the file
    fields = Fields(*_jsonl_fields(path, cfg), cfg.data.messages_field) if path.is_file() and path.suffix == ".jsonl" \
        else Fields.of(cfg.data)
    problems = load_file(path, fields)[:cap]
    return EvalDataset(dataset_name(dataset), problems, reward_kind(dataset))


def eval_config_hash(cfg: MelConfig, dataset: str) -> str:
    """Everything that shapes one dataset's evaluation of a given checkpoint (its cache key part)."""
    from mel_core.problems.prompts import PromptSet

    e = cfg.eval
    shaping = {"version": EVAL_VERSION, "dataset": _fingerprint(cfg, dataset),
               "greedy": e.greedy, "temperature": e.temperature, "k": e.k, "max_new_tokens": e.max_new_tokens,
               "max_problems": e.max_problems, "seed": cfg.run.seed, "prompts": asdict(cfg.prompts),
               "solve": PromptSet.load(cfg.prompts.dir).solve, "verify": asdict(cfg.verify)}
    if cfg.verify.reward == "auto":  # (as before verify.reward existed: cached evaluations stay valid)
        shaping["verify"].pop("reward")
    else:  # a plug-in's identity holds its source's hash: an edited plug-in evaluates anew
        from mel_core.algorithm.rewards.verifier import Verifier
        shaping["verify"]["reward"] = Verifier.from_config(cfg.verify, reward_kind(dataset)).identity_hash
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_due(cfg: MelConfig, step: int) -> bool:
    """Whether a campaign evaluates the checkpoint after `step` (its start: 0 = the base, or a fork's
    run.fork.step): the start, every N steps and the last."""
    n = cfg.eval.every_n_steps
    start = cfg.run.fork.step if cfg.run.fork.run_id else 0
    return n > 0 and (step == start or step % n == 0 or step == cfg.run.steps)


def evaluate(rt: Runtime, ckpt: Checkpoint, dataset: str, *, run_id: str | None = None,
             step: int | None = None) -> dict:
    """Evaluate policy version `ckpt` on `dataset`; write `evals` and `eval_samples`; return the metrics.

    `run_id` is the run the checkpoint belongs to (default: the runtime's run); `step` defaults to the
    checkpoint's step in the store (NULL for a checkpoint the store does not know).
    """
    from mel_core.algorithm.rewards.verifier import Verifier

    cfg, e = rt.cfg, rt.cfg.eval
    run_id = run_id or rt.run_id
    if step is None:
        rt.settle_saves()  # the checkpoint's row may be one a background save (run.async_save) has yet to commit
        step = run_reads.checkpoint_step(rt.store, ckpt.checkpoint_id)
    ds = load_dataset(cfg, dataset)
    if not ds.problems:
        raise ValueError(f"dataset {dataset!r} has no problems to evaluate")
    verifier = Verifier.from_config(cfg.verify, ds.reward_kind)
    rt.ensure_version(ckpt)
    # A prompt the context cannot hold with a whole answer would be generated past the model's window and scored:
    # refused as a campaign refuses its training problems, before anything is generated or written.
    too_long = rt.too_long(ds.problems, e.max_new_tokens)
    if too_long:
        raise rt.too_long_error(too_long, len(ds.problems), dataset, "eval.max_new_tokens", e.max_new_tokens,
                                "leave such problems out of the dataset (or lower eval.max_problems)")
    prompts = [rt.model_input(rt.prompts.render_solve(p.question)) for p in ds.problems]
    golds = [p.answer for p in ds.problems]

    # (greedy?, params) per mode; each mode is one engine call and one verify call.
    modes = []
    if e.greedy:
        modes.append((True, SamplingParams(n=1, temperature=0.0, max_new_tokens=e.max_new_tokens)))
    if e.k > 0:
        modes.append((False, SamplingParams(n=e.k, temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                                            seed=derive_seed(cfg.run.seed, "eval", ckpt.checkpoint_id, ds.name))))
    created, started = now(), time.perf_counter()
    verifier_row = stage_records.verifier_row(verifier)
    metric_rows, sample_rows, metrics = [], [], {}
    for greedy, params in modes:
        t0 = time.perf_counter()
        solved = rt.solve(prompts, golds, params, desc=f"eval {ds.name} {'greedy' if greedy else f'k={params.n}'}",
                          verifier=verifier, problems=ds.problems)
        seconds = time.perf_counter() - t0
        rewards = [[s.verdict.reward for s in solved[j * params.n:(j + 1) * params.n]] for j in range(len(golds))]
        if greedy:
            values = {"pass@1": (1, avg_at_k(rewards))}
        else:
            values = {f"avg@{e.k}": (e.k, avg_at_k(rewards))}
            if e.k > 1:  # with k = 1 the sampled Pass@1 is Avg@1; 'pass@1' stays the greedy metric's name
                values[f"pass@{e.k}"] = (e.k, mean_pass_at_k(rewards, e.k))
        for metric, (k, value) in values.items():
            metrics[metric] = value
            metric_rows.append({
                "eval_id": make_id("eval", run_id, ckpt.checkpoint_id, ds.name, metric, k, params.temperature),
                "run_id": run_id, "checkpoint_id": ckpt.checkpoint_id, "step": step, "dataset": ds.name,
                "metric": metric, "k": k, "temperature": params.temperature, "value": value,
                "num_problems": len(ds.problems), "seconds": seconds, "created_at": created})
        for s in solved:
            p, i, c, v = ds.problems[s.prompt_index], s.sample_index, s.completion, s.verdict
            sample_rows.append({
                "sample_id": make_id("eval_sample", run_id, ckpt.checkpoint_id, ds.name, p.problem_id, greedy,
                                     params.temperature, i),
                "run_id": run_id, "checkpoint_id": ckpt.checkpoint_id, "step": step, "dataset": ds.name,
                "problem_id": p.problem_id, "question": p.question, "answer": p.answer, "greedy": greedy,
                "temperature": params.temperature, "sample_index": i, "text": c.text,
                "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason, "reward": v.reward,
                "extracted_answer": v.extracted, "verify_reason": v.reason, "created_at": created,
                "verifier_hash": verifier_row["verifier_hash"], "row_json": p.row_json})
    rt.settle_saves()  # no evaluation of a checkpoint is recorded before the checkpoint itself
    with rt.store.transaction() as w:
        stage_records.replace_evaluation(w, run_id, ckpt.checkpoint_id, ds.name, verifier_row, metric_rows, sample_rows)
    rt.store.publish()
    return {"run_id": run_id, "checkpoint_id": ckpt.checkpoint_id, "step": step, "dataset": ds.name,
            "num_problems": len(ds.problems), "metrics": metrics, "seconds": time.perf_counter() - started}


def format_eval(result: dict) -> str:
    """One line per evaluated dataset, for the campaign's terminal output."""
    m = " ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items())
    step = "-" if result["step"] is None else result["step"]
    return (f"eval step {step:>3} | {result['dataset']}: {m} | {result['num_problems']} problems "
            f"| {result['seconds']:.1f}s")


# ------------------------------------------------------------------------------------------- suites

# The MEL paper's Table 1 (arXiv 2602.10224): its five benchmarks, in its column order, under its headings.
PAPER_SUITE: tuple[tuple[str, str], ...] = (
    ("AIME 2024", "data/aime24/test.jsonl"),
    ("AIME 2025", "data/aime25/test.jsonl"),
    ("AMC 2023", "data/amc23/test.jsonl"),
    ("MATH 500", "data/math500/test.jsonl"),
    ("OlympiadBench", "data/olympiadbench/test.jsonl"),
)
SUITES: dict[str, tuple[tuple[str, str], ...]] = {"paper": PAPER_SUITE}
AVERAGE = "Average"
MISSING = "-"


def suite_datasets(suite: str, extra: Sequence[str] = ()) -> list[str]:
    """The suite's dataset paths, then those of `extra` that are not already among them (by store name:
    ``data/math500/test.jsonl`` and ``./data/math500/test.jsonl`` are one dataset)."""
    if suite not in SUITES:
        raise ConfigError(f"--suite: unknown suite {suite!r} (known: {', '.join(sorted(SUITES))})")
    out = [path for _, path in SUITES[suite]]
    seen = {dataset_name(d) for d in out}
    for d in extra:
        if dataset_name(d) not in seen:
            seen.add(dataset_name(d))
            out.append(d)
    return out


def metrics_by_dataset(rows: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """`evals` rows (dataset, metric, value) -> dataset -> metric -> value, what :func:`format_suite_table` reads."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        out.setdefault(r["dataset"], {})[r["metric"]] = r["value"]
    return out


def table_metrics(k: int) -> list[tuple[str, str | None]]:
    """(heading, metric key) of each benchmark's three columns: greedy Pass@1, then Avg@k and Pass@k of the
    sampled mode. No key where evaluate() writes none: Pass@k with k = 1 (the name 'pass@1' is the greedy
    metric's) and both sampled columns with k = 0 (no sampling)."""
    return [("Pass@1", "pass@1"), (f"Avg@{k}" if k > 0 else "Avg@k", f"avg@{k}" if k > 0 else None),
            (f"Pass@{k}" if k > 1 else "Pass@k", f"pass@{k}" if k > 1 else None)]


def suite_average(by_dataset: Mapping[str, Mapping[str, float]], metric: str | None,
                  suite: Sequence[tuple[str, str]] = PAPER_SUITE) -> float | None:
    """The unweighted mean of `metric` over the suite's benchmarks, as the paper averages (AIME's 30 problems
    weigh as much as MATH-500's 500); None when any benchmark lacks it (a partial mean is not comparable)."""
    if metric is None:
        return None
    values = [by_dataset.get(dataset_name(path), {}).get(metric) for _, path in suite]
    return None if any(v is None for v in values) else sum(values) / len(values)


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.2f}"


def suite_cells(rows: Mapping[str, Mapping[str, Mapping[str, float]]], k: int,
                suite: Sequence[tuple[str, str]] = PAPER_SUITE) -> list[tuple[str, dict[str, list[str]]]]:
    """(column group heading, label -> its cells) for each benchmark of the suite, then the Average: the
    table's content before layout. `rows`: label -> dataset store name -> metric -> value in [0, 1]."""
    metrics = [key for _, key in table_metrics(k)]
    groups = [(heading, {label: [_percent(by_ds.get(dataset_name(path), {}).get(key) if key else None)
                                 for key in metrics] for label, by_ds in rows.items()})
              for heading, path in suite]
    groups.append((AVERAGE, {label: [_percent(suite_average(by_ds, key, suite)) for key in metrics]
                             for label, by_ds in rows.items()}))
    return groups


def format_suite_table(rows: Mapping[str, Mapping[str, Mapping[str, float]]], k: int, temperature: float,
                       suite: Sequence[tuple[str, str]] = PAPER_SUITE, groups_per_block: int = 3) -> str:
    """The paper's Table 1 layout: one line per method (`rows`: label -> dataset store name -> metric ->
    value in [0, 1]), accuracy in percent with two decimals; per benchmark Pass@1 / Avg@k / Pass@k, then
    their Average over the benchmarks. As in the paper (whose page is too narrow for all 18 columns) the
    six column groups come in blocks of three (AIME 2024 / AIME 2025 / AMC 2023, then MATH 500 /
    OlympiadBench / Average), each under a two-line header. A metric that was not computed shows as '-',
    and so does its Average."""
    headings = [h for h, _ in table_metrics(k)]
    groups = suite_cells(rows, k, suite)
    label_w = max([len("Method")] + [len(label) for label in rows])
    cell_w = max(7, *(len(h) for h in headings))
    group_w = max(len(headings) * (cell_w + 1) - 1, *(len(h) for h, _ in groups))

    def group_text(cells: list[str]) -> str:
        return " ".join(c.rjust(cell_w) for c in cells).rjust(group_w)

    sampled = (f"Avg@{k} / Pass@{k} from {k} sample{'s' if k > 1 else ''} at T={temperature:g}" if k > 0
               else "no sampled metrics (eval.k=0)")
    lines = [f"Table 1 layout (MEL paper): accuracy (%); Pass@1 greedy, {sampled}"]
    for start in range(0, len(groups), groups_per_block):
        block = groups[start:start + groups_per_block]
        top = [" " * label_w] + [heading.center(group_w) for heading, _ in block]
        sub = ["Method".ljust(label_w)] + [group_text(headings) for _ in block]
        lines += ["", " | ".join(top).rstrip(), " | ".join(sub), "-+-".join("-" * len(c) for c in sub)]
        lines += [" | ".join([label.ljust(label_w)] + [group_text(cells[label]) for _, cells in block])
                  for label in rows]
    return "\n".join(lines)
