#!/usr/bin/env python
"""Store benchmark: ingest throughput and `heuristic_lineage` latency at a realistic corpus size.

    .venv/bin/python benchmarks/store.py                       # 1M rollouts / 100k heuristics (~3 min on 2 cores)
    .venv/bin/python benchmarks/store.py --quick               # 50k rollouts / 5k heuristics (smoke run)
    .venv/bin/python benchmarks/store.py --rollouts 200000 --heuristics 20000 --no-doc

In a temporary directory it builds a corpus through the real :class:`mel_core.store.writer.Store` API, shaped
like what `mel run` writes with the paper's settings (B=128 prompts x G=8 rollouts per step, one pair
per mixed group, 4 of 5 groups mixed): runs, steps, prompts, rollouts, pairs, analyses, heuristics,
replays, checkpoints, updates, internalized and metrics rows, ids from :func:`make_id`, foreign keys
consistent so that `heuristic_lineage` joins every heuristic to exactly one row. Rollouts carry
300-800 characters of synthetic solution text and len/5 token ids (60-160 ints, mean ~110);
analyses a 1.2-1.8 kB prompt, a 300-800 char answer and its token ids.

Phases (only the store calls are timed, never the synthetic-row generation):

1. bulk: all steps but the last 2K, written `--chunk-steps` steps per `Store.transaction()` (one
   `Writer.insert` per table) — the "one large batch" figure;
2. pipeline: K steps (`--step-window`, first one a warm-up) written exactly as the stages write them —
   one `Store.transaction()` per stage per step (sample: steps+prompts+1024 rollouts; pair; diagnose;
   abstract; replay; update), each opening and closing the file — on top of the ~full corpus. The
   transaction that completes a 122,880-row row group takes seconds; it is weighted to its long-run
   frequency (once per 120 steps) in the rates;
3. held connection: the last K steps, the same transactions on one connection kept open (what a
   writer that keeps the file open would pay) — separates per-connection cost from insert cost;
4. breakdown: Arrow conversion, INSERT OR IGNORE vs. anti-join vs. plain INSERT vs. no PRIMARY KEY,
   narrow rows for reference, the fixed cost of a write transaction and of loading the PK index;
5. lineage: `SELECT * FROM heuristic_lineage WHERE heuristic_id = ?` for random ids, each through a
   fresh `Store.query` (as `mel lineage` does, so it includes opening the file) and on one persistent
   read-only connection; planning time; `checkpoint_heuristics` for one checkpoint; the whole
   `mel lineage ID` command in a new process.

It prints its figures, updates the `## store.py` section of docs/BENCHMARKS.md (unless --no-doc) and
ends with one `name: value` line per headline metric, the main one (lineage p50) last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._doc import DOC, load_average, machine, update_doc  # noqa: E402
from mel_core.ids import make_id
from mel_core.store.reader import StoreReader
from mel_core.store.schema import TABLES
from mel_core.store.writer import Store, Writer, release_connections

G = 8  # rollouts per prompt (group size)
B = 128  # prompts per step
MIXED_EVERY = 5  # 4 of every 5 groups are mixed -> one pair each (pairs_per_group: 1)
ACCEPT_EVERY = 5  # 3 of every 5 heuristics are accepted (and internalized)
VOCAB = 151_000  # Qwen-sized vocabulary for synthetic token ids

ROW_GROUP_ROWS = 122_880  # DuckDB's row group size
STEPS_PER_ROW_GROUP = ROW_GROUP_ROWS // (B * G)  # one rollouts row group filled every 120 steps

GOAL_INGEST_ROWS_PER_S = 1_000_000
GOAL_LINEAGE_MS = 20.0
LINEAGE_SQL = "SELECT * FROM heuristic_lineage WHERE heuristic_id = ?"  # what `mel lineage` runs
HEADLINE_ORDER = ("store_ingest_batch_rows_per_s", "store_ingest_held_rows_per_s", "store_ingest_rollouts_per_s",
                  "store_ingest_rows_per_s", "store_lineage_persistent_ms_p50", "store_lineage_ms_p95",
                  "store_lineage_ms_p50")


# ------------------------------------------------------------------------------------ synthetic corpus


class TextSource:
    """Cheap realistic-looking text: slices of one pre-generated arithmetic-solution corpus."""

    WORDS = ["Step", "First,", "then", "we", "add", "subtract", "multiply", "so", "the", "result", "is", "Let",
             "x", "=", "+", "-", "*", "/", "Therefore", "carry", "the", "remainder", "check:", "which", "gives",
             "Answer:", "\n", "because", "equals", "and", "of", "total"]

    def __init__(self, rng: random.Random, np_rng: np.random.Generator, size: int = 1 << 21):
        parts, n = [], 0
        while n < size:
            w = rng.choice(self.WORDS) if rng.random() < 0.7 else str(rng.randint(0, 999))
            parts.append(w)
            n += len(w) + 1
        self.corpus = " ".join(parts)
        self.np_rng = np_rng

    def texts(self, k: int, lo: int, hi: int) -> list[str]:
        lens = self.np_rng.integers(lo, hi + 1, k)
        offs = self.np_rng.integers(0, len(self.corpus) - hi - 1, k)
        c = self.corpus
        return [c[o:o + n] for o, n in zip(offs.tolist(), lens.tolist())]


class Corpus:
    """Generates the rows of each step, stage by stage, with consistent ids and foreign keys."""

    def __init__(self, rollouts: int, heuristics: int, seed: int = 0):
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.src = TextSource(self.rng, self.np_rng)
        self.tok_pool = self.np_rng.integers(0, VOCAB, 1 << 20).tolist()  # token ids are slices of this
        self.num_prompts = max(1, rollouts // G)
        self.num_steps = math.ceil(self.num_prompts / B)
        self.num_heuristics = heuristics
        self.run_id = make_id("run", "bench", seed)
        self.base_ckpt = make_id("ckpt", "base", "bench", seed)
        self.heuristic_ids: list[str] = []
        self.now = dt.datetime(2026, 1, 1)

    def _tokens(self, texts: list[str]) -> list[list[int]]:
        offs = self.np_rng.integers(0, len(self.tok_pool) - 200, len(texts)).tolist()
        pool = self.tok_pool
        return [pool[o:o + max(1, len(t) // 5)] for o, t in zip(offs, texts)]

    def header(self) -> dict[str, list[dict]]:
        return {"runs": [{"run_id": self.run_id, "name": "bench", "config_hash": make_id("cfg", "bench"),
                          "config_json": '{"sampling": {"group_size": 8, "prompts_per_step": 128}}',
                          "created_at": self.now}],
                "checkpoints": [{"checkpoint_id": self.base_ckpt, "run_id": self.run_id, "step": 0,
                                 "path": "/ckpt/base", "parent_checkpoint_id": None, "created_at": self.now}]}

    def _metrics(self, step: int, names: list[str]) -> list[dict]:
        return [{"run_id": self.run_id, "step": step, "name": n, "value": self.rng.random()} for n in names]

    def step(self, s: int, ckpt: str) -> tuple[list[tuple[str, dict[str, list[dict]]]], str]:
        """[(stage, {table: rows})] for step s — one transaction each, as the stages write — and the new ckpt."""
        rng, src, run = self.rng, self.src, self.run_id
        step = s + 1
        p0, p1 = s * B, min((s + 1) * B, self.num_prompts)
        n_p = p1 - p0
        questions = src.texts(n_p, 80, 300)
        texts = src.texts(n_p * G, 300, 800)
        toks = self._tokens(texts)
        prompts, rollouts = [], []
        for pos in range(n_p):
            problem = f"gsm8k-{(p0 + pos) % 7473}"
            q = questions[pos]
            prompt_id = make_id("prompt", run, step, pos, problem)
            prompts.append({"prompt_id": prompt_id, "run_id": run, "step": step, "position": pos,
                            "problem_id": problem, "question": q, "answer": str(rng.randint(0, 9999)),
                            "prompt_text": "Solve step by step.\n" + q + "\nPut the final answer after 'Answer:'."})
            for i in range(G):
                j = pos * G + i
                reward = 1.0 if i < G // 2 else 0.0
                rollouts.append({
                    "rollout_id": make_id("rollout", prompt_id, i, ckpt), "prompt_id": prompt_id, "run_id": run,
                    "step": step, "sample_index": i, "policy_version_id": ckpt, "text": texts[j],
                    "token_ids": toks[j], "num_tokens": len(toks[j]), "finish_reason": "stop", "reward": reward,
                    "extracted_answer": "42" if reward else "41", "verify_reason": "ok" if reward else "wrong"})
        sample = {"steps": [{"step_id": make_id("step", run, step), "run_id": run, "step": step,
                             "policy_version_id": ckpt, "seed": rng.getrandbits(62)}],
                  "prompts": prompts, "rollouts": rollouts, "metrics": self._metrics(step, ["reward_mean"])}

        pairs = []
        for pos, pr in enumerate(prompts):
            if (p0 + pos) % MIXED_EVERY == MIXED_EVERY - 1:
                continue
            grp = rollouts[pos * G:(pos + 1) * G]
            c, w = grp[rng.randrange(G // 2)]["rollout_id"], grp[G // 2 + rng.randrange(G // 2)]["rollout_id"]
            pairs.append({"pair_id": make_id("pair", pr["prompt_id"], c, w), "run_id": run, "step": step,
                          "prompt_id": pr["prompt_id"], "correct_rollout_id": c, "incorrect_rollout_id": w})

        n_a = len(pairs)
        raws, a_prompts, critiques = src.texts(n_a, 300, 800), src.texts(n_a, 1200, 1800), src.texts(n_a, 100, 300)
        a_toks = self._tokens(raws)
        analyses = [{
            "analysis_id": make_id("analysis", pa_["pair_id"], ckpt), "pair_id": pa_["pair_id"], "run_id": run,
            "step": step, "policy_version_id": ckpt, "prompt_text": a_prompts[k], "raw_text": raws[k],
            "token_ids": a_toks[k], "num_tokens": len(a_toks[k]), "bifurcation_step": 1 + k % 8,
            "critique": critiques[k], "parsed": True, "status": "accepted", "reject_reason": None}
            for k, pa_ in enumerate(pairs)]

        # This step's share of the heuristic budget, spread over its analyses (position = k-th of one).
        h_lo = s * self.num_heuristics // self.num_steps
        h_hi = (s + 1) * self.num_heuristics // self.num_steps
        heuristics = []
        if analyses:
            ifs, thens = src.texts(h_hi - h_lo, 60, 160), src.texts(h_hi - h_lo, 40, 120)
            for k in range(h_hi - h_lo):
                a = analyses[k % n_a]
                pos = k // n_a
                heuristics.append({"heuristic_id": make_id("heuristic", a["analysis_id"], pos),
                                   "analysis_id": a["analysis_id"], "run_id": run, "step": step, "position": pos,
                                   "text": f"If {ifs[k]}, then {thens[k]}", "accepted": (k % ACCEPT_EVERY) < 3})
        self.heuristic_ids += [h["heuristic_id"] for h in heuristics]

        r_prompts, r_texts = src.texts(n_a, 400, 900), src.texts(n_a, 300, 800)
        replays = [{"replay_id": make_id("replay", a["analysis_id"], 0), "analysis_id": a["analysis_id"],
                    "run_id": run, "step": step, "replay_index": 0, "prompt_text": r_prompts[k], "text": r_texts[k],
                    "reward": 1.0, "verify_reason": "ok"} for k, a in enumerate(analyses)]

        new_ckpt = make_id("ckpt", run, step, ckpt)
        update_id = make_id("update", run, step, ckpt)
        update = {
            "checkpoints": [{"checkpoint_id": new_ckpt, "run_id": run, "step": step, "path": f"/ckpt/step-{step:05d}",
                             "parent_checkpoint_id": ckpt, "created_at": self.now}],
            "updates": [{"update_id": update_id, "run_id": run, "step": step, "checkpoint_in": ckpt,
                         "checkpoint_out": new_ckpt, "loss": rng.random(), "rl_loss": rng.random(),
                         "nll_loss": rng.random(), "grad_norm": rng.random(), "num_sequences": len(rollouts),
                         "num_nll_sequences": n_a}],
            "internalized": [{"update_id": update_id, "analysis_id": h["analysis_id"],
                              "heuristic_id": h["heuristic_id"]} for h in heuristics if h["accepted"]],
            "metrics": self._metrics(step, ["loss", "rl_loss", "nll_loss", "grad_norm"])}
        stages = [("sample", sample),
                  ("pair", {"pairs": pairs, "metrics": self._metrics(step, ["mixed_groups", "groups", "pairs"])}),
                  ("diagnose", {"analyses": analyses, "metrics": self._metrics(step, ["analyses", "diagnosed"])}),
                  ("abstract", {"heuristics": heuristics, "metrics": self._metrics(step, ["candidates"])}),
                  ("replay", {"replays": replays, "metrics": self._metrics(step, ["accepted", "retention_ratio"])}),
                  ("update", update)]
        return stages, new_ckpt


# ------------------------------------------------------------------------------------ measurements


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def _ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


def _nrows(tables: dict[str, list[dict]]) -> int:
    return sum(len(r) for r in tables.values())


def _timed_inserts(w: Writer, tables: dict[str, list[dict]], per_table: dict[str, float]) -> None:
    for table, rows in tables.items():
        t0 = time.perf_counter()
        w.insert(table, rows)
        per_table[table] = per_table.get(table, 0.0) + time.perf_counter() - t0


def ingest_bulk(store: Store, corpus: Corpus, steps: range, chunk_steps: int, log) -> dict:
    """Phase 1: `chunk_steps` steps of every table per transaction (the one-large-batch path)."""
    t_store = gen = 0.0
    rows = 0
    per_table: dict[str, float] = {}
    rows_by_table: dict[str, int] = {}
    txn_s: list[float] = []
    header = corpus.header()
    ckpt = corpus.base_ckpt
    s_iter = iter(steps)
    first = True
    done = 0
    wall0 = time.perf_counter()
    while True:
        g0 = time.perf_counter()
        merged: dict[str, list[dict]] = {t: list(r) for t, r in header.items()} if first else {}
        n = 0
        for s in s_iter:
            stages, ckpt = corpus.step(s, ckpt)
            for _, tables in stages:
                for t, r in tables.items():
                    merged.setdefault(t, []).extend(r)
            n += 1
            if n == chunk_steps:
                break
        gen += time.perf_counter() - g0
        if not merged:
            break
        first = False
        t0 = time.perf_counter()
        with store.transaction() as w:
            _timed_inserts(w, merged, per_table)
        dt_ = time.perf_counter() - t0
        t_store += dt_
        txn_s.append(dt_)
        rows += _nrows(merged)
        for t, r in merged.items():
            rows_by_table[t] = rows_by_table.get(t, 0) + len(r)
        done += n
        log(f"  bulk: {done}/{len(steps)} steps, {rows:,} rows, store {t_store:.1f} s ({rows / t_store:,.0f} rows/s), "
            f"generation {gen:.1f} s, wall {time.perf_counter() - wall0:.1f} s")
        if n < chunk_steps:
            break
    return {"rows": rows, "seconds": t_store, "rows_per_s": rows / t_store if t_store else float("nan"),
            "transactions": len(txn_s), "rollout_rows": rows_by_table.get("rollouts", 0),
            "rollout_insert_seconds": per_table.get("rollouts", 0.0),
            "rollouts_per_s": rows_by_table.get("rollouts", 0) / per_table["rollouts"] if per_table.get("rollouts") else float("nan"),
            "per_table_rows_per_s": {t: rows_by_table[t] / per_table[t] for t in per_table if per_table[t] > 0},
            "generation_seconds": gen, "ckpt": ckpt}


def ingest_steps(store: Store, corpus: Corpus, steps: range, ckpt: str, held: bool, log, warmup: bool = False) -> dict:
    """Phases 2/3: one transaction per stage per step; `held` keeps one connection open across them.
    With `warmup`, the first step's transactions are timed apart and left out of the rates."""
    con = duckdb.connect(str(store.path)) if held else None
    t_store = t_sample = 0.0
    rows = rows_roll = 0
    stage_s: dict[str, float] = {}
    per_table: dict[str, float] = {}
    sample_txn: list[float] = []
    slowest = (0.0, "")
    warmup_s = 0.0
    txns: list[tuple[str, float]] = []
    for s in steps:
        stages, ckpt = corpus.step(s, ckpt)
        for stage, tables in stages:
            t0 = time.perf_counter()
            if held:
                con.execute("BEGIN TRANSACTION")
                _timed_inserts(Writer(con), tables, per_table)
                con.execute("COMMIT")
            else:
                with store.transaction() as w:
                    _timed_inserts(w, tables, per_table)
            dt_ = time.perf_counter() - t0
            if s == steps[0] and warmup:
                warmup_s += dt_  # the first step after the bulk load: reported, not counted
                continue
            slowest = max(slowest, (dt_, f"{stage} of step {s + 1}"))
            txns.append((stage, dt_))
            t_store += dt_
            rows += _nrows(tables)
            stage_s[stage] = stage_s.get(stage, 0.0) + dt_
            if stage == "sample":
                t_sample += dt_
                rows_roll += len(tables["rollouts"])
                sample_txn.append(dt_)
    close_s = 0.0
    if held:
        t0 = time.perf_counter()
        con.close()  # the checkpoint the held connection deferred is paid here
        close_s = time.perf_counter() - t0
        t_store += close_s
    kind = "held connection" if held else "pipeline (open/close per transaction)"
    n_steps = len(steps) - (1 if warmup else 0)
    # Row-group spikes: the transaction whose rows complete a 122,880-row row group pays for compressing it
    # (seconds, once per ~120 steps of rollouts); a short window over- or under-samples them, so they are
    # weighted by how often they occur in a long run.
    med = {st: statistics.median([d for s2, d in txns if s2 == st]) for st, _ in txns}
    spikes = [(st, d) for st, d in txns if d > max(1.0, 10 * med[st])]
    spike_s = sum(d for _, d in spikes)
    weight = min(1.0, n_steps / STEPS_PER_ROW_GROUP)
    amort_s = t_store - spike_s + weight * spike_s
    sample_spike_s = sum(d for st, d in spikes if st == "sample")
    amort_sample_s = t_sample - sample_spike_s + weight * sample_spike_s
    out = {"rows": rows, "seconds": t_store, "rows_per_s_window": rows / t_store, "steps": n_steps,
           "rows_per_s": rows / amort_s, "rollouts_per_s_window": rows_roll / t_sample,
           "spikes_ms": [round(1e3 * d) for _, d in spikes], "amortized_seconds": amort_s,
           "transactions": 6 * n_steps, "warmup_step_ms": 1e3 * warmup_s, "slowest_txn_ms": 1e3 * slowest[0],
           "slowest_txn": slowest[1], "rollout_rows": rows_roll, "sample_seconds": t_sample,
           "rollouts_per_s": rows_roll / amort_sample_s, "sample_txn_ms_p50": _ms(sample_txn),
           "sample_txn_ms_p95": 1e3 * _pct(sample_txn, 0.95), "txn_ms_mean": 1e3 * amort_s / (6 * n_steps),
           "stage_seconds": stage_s, "stage_ms_p50": {k: 1e3 * v for k, v in med.items()},
           "close_seconds": close_s, "ckpt": ckpt}
    log(f"  {kind}: {n_steps} steps, {rows:,} rows in {t_store:.2f} s = {out['rows_per_s_window']:,.0f} rows/s"
        f" ({out['rows_per_s']:,.0f} with row-group spikes {out['spikes_ms']} ms weighted to 1 per "
        f"{STEPS_PER_ROW_GROUP} steps); "
        f"sample transaction p50 {out['sample_txn_ms_p50']:.0f} ms ({out['rollouts_per_s']:,.0f} rollouts/s); "
        f"mean transaction {out['txn_ms_mean']:.1f} ms; slowest {out['slowest_txn_ms']:.0f} ms ({out['slowest_txn']})"
        + (f"; warm-up step (not counted) {out['warmup_step_ms']:.0f} ms" if warmup else ""))
    return out


def ingest_breakdown(tmp: Path, big_db: Path, corpus: Corpus, n_rollouts: int, log) -> dict:
    """Phase 4: where a rollout insert's time goes."""
    out: dict[str, float] = {}
    # Rows for the micro-benchmarks, from a corpus of their own (ids never collide with the big file's).
    side = Corpus(n_rollouts, max(1, n_rollouts // 10), seed=12345)
    rows: list[dict] = []
    ck = side.base_ckpt
    for s in range(side.num_steps):
        stages, ck = side.step(s, ck)
        rows += stages[0][1]["rollouts"]
    rows = rows[:n_rollouts]
    n = len(rows)
    t0 = time.perf_counter()
    arrow = pa.Table.from_pylist(rows)  # what Writer.insert does first
    out["arrow_convert_rows_per_s"] = n / (time.perf_counter() - t0)
    out["micro_rows"] = n

    ddl_pk = TABLES["rollouts"]
    ddl_nopk = ddl_pk.replace("rollout_id VARCHAR PRIMARY KEY", "rollout_id VARCHAR")
    variants = {
        "or_ignore": (ddl_pk, "INSERT OR IGNORE INTO t BY NAME SELECT * FROM _rows"),
        "anti_join": (ddl_pk, "INSERT INTO t BY NAME SELECT r.* FROM _rows r ANTI JOIN t USING (rollout_id)"),
        "insert_pk": (ddl_pk, "INSERT INTO t BY NAME SELECT * FROM _rows"),
        "insert_nopk": (ddl_nopk, "INSERT INTO t BY NAME SELECT * FROM _rows"),
    }

    def sql_rate(db: str, ddl: str, sql: str, tbl: pa.Table) -> float:
        if db != ":memory:":
            for f in (Path(db), Path(db + ".wal")):
                f.unlink(missing_ok=True)
        con = duckdb.connect(db)
        con.execute(f"CREATE TABLE t ({ddl})")
        con.register("_rows", tbl)
        t0 = time.perf_counter()
        con.execute("BEGIN TRANSACTION")
        con.execute(sql)
        con.execute("COMMIT")
        dt_ = time.perf_counter() - t0
        con.close()
        return tbl.num_rows / dt_

    db = str(tmp / "breakdown.duckdb")
    for name, (ddl, sql) in variants.items():
        out[f"sql_{name}_rows_per_s"] = sql_rate(db, ddl, sql, arrow)
    out["sql_insert_nopk_memory_rows_per_s"] = sql_rate(":memory:", ddl_nopk, variants["insert_nopk"][1], arrow)
    # Narrow rows for reference (metrics-shaped: 4 columns).
    m = 1_000_000 if n >= 16_384 else 100_000
    narrow = pa.table({"run_id": pa.array(["run_x"] * m), "step": pa.array(np.arange(m) // 50, pa.int32()),
                       "name": pa.array([f"m{i % 50}" for i in range(m)]),
                       "value": pa.array(np.random.default_rng(0).random(m))})
    out["narrow_rows"] = m
    out["narrow_or_ignore_pk_rows_per_s"] = sql_rate(db, TABLES["metrics"], variants["or_ignore"][1], narrow)
    out["narrow_insert_nopk_memory_rows_per_s"] = sql_rate(
        ":memory:", "run_id VARCHAR, step INTEGER, name VARCHAR, value DOUBLE", variants["insert_nopk"][1], narrow)
    for f in (Path(db), Path(db + ".wal")):
        f.unlink(missing_ok=True)

    # Fixed costs on the full corpus file: opening it, an empty write transaction, and the PRIMARY KEY index
    # pages a step's insert touches (loaded from disk by every new connection).
    store = Store(big_db)
    step = arrow.slice(0, min(B * G, n))
    opens, empties, cold, warm = [], [], [], []
    for _ in range(5):
        release_connections()  # a raw read-only open cannot share the file with the store's read-write one
        t0 = time.perf_counter()
        duckdb.connect(str(big_db), read_only=True).close()
        opens.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with store.transaction():
            pass
        empties.append(time.perf_counter() - t0)
        con = duckdb.connect(str(big_db))
        con.register("_rows", step)
        for xs in (cold, warm):
            con.execute("BEGIN TRANSACTION")
            t0 = time.perf_counter()
            con.execute("INSERT INTO rollouts BY NAME SELECT * FROM _rows")
            xs.append(time.perf_counter() - t0)
            con.execute("ROLLBACK")
        con.close()
    out["open_ro_ms"] = _ms(opens)
    out["empty_write_txn_ms"] = _ms(empties)
    out["step_insert_rows"] = step.num_rows
    out["step_insert_cold_ms"] = _ms(cold)
    out["step_insert_warm_ms"] = _ms(warm)
    log("  breakdown: " + ", ".join(f"{k}={v:,.1f}" for k, v in out.items()))
    return out


def _planning_split(con: duckdb.DuckDBPyConnection, ids: list[str], prof: Path) -> dict:
    """DuckDB's own profile of the lineage query: how much of it is binding/optimizing vs. running."""
    plan, total = [], []
    try:
        con.execute("PRAGMA enable_profiling = 'json'")
        con.execute(f"PRAGMA profiling_output = '{prof}'")
        con.execute("SET profiling_mode = 'detailed'")
        for hid in ids:
            con.execute(LINEAGE_SQL, [hid]).fetchall()
            d = json.loads(prof.read_text())
            plan.append(sum(d[k]["total_time"] for k in ("planner", "optimizer", "physical_planner")))
            total.append(d["query"]["total_time"])
        con.execute("PRAGMA disable_profiling")
    except (duckdb.Error, OSError, KeyError, ValueError, TypeError):
        return {"plan_only_ms_p50": float("nan"), "profiled_total_ms_p50": float("nan")}
    return {"plan_only_ms_p50": _ms(plan), "profiled_total_ms_p50": _ms(total)}


def lineage_latency(path: Path, heuristic_ids: list[str], n: int, seed: int, log, cli_runs: int = 5) -> dict:
    """Phase 5."""
    rng = random.Random(seed)
    ids = [rng.choice(heuristic_ids) for _ in range(n)]
    t0 = time.perf_counter()
    Store(path).publish()  # what the writer does after every stage: readers read this snapshot
    publish_ms = 1e3 * (time.perf_counter() - t0)
    release_connections()  # this process wrote the file: hand its connection back, to read as another process does
    rows_seen = set()
    per_call = []
    for hid in ids:  # a fresh reader per lookup, as `mel lineage` does (opens the snapshot read-only, locked down)
        t0 = time.perf_counter()
        with StoreReader(path) as reader:
            rows = reader.query(LINEAGE_SQL, [hid])
        per_call.append(time.perf_counter() - t0)
        rows_seen.add(len(rows))
    out = {"lookups": n, "store_query_ms_p50": _ms(per_call), "store_query_ms_p95": 1e3 * _pct(per_call, 0.95),
           "publish_ms": publish_ms, "publish_file_mb": path.stat().st_size / 2**20}
    release_connections()
    for label, cfg in (("persistent", {}), ("persistent_1thread", {"threads": 1})):
        con = duckdb.connect(str(path), read_only=True, config=cfg)
        con.execute(LINEAGE_SQL, [ids[0]]).fetchall()  # warm: catalog and the indexes the plan uses
        xs = []
        for hid in ids:
            t0 = time.perf_counter()
            rows = con.execute(LINEAGE_SQL, [hid]).fetchall()
            xs.append(time.perf_counter() - t0)
            rows_seen.add(len(rows))
        out[f"{label}_ms_p50"], out[f"{label}_ms_p95"] = _ms(xs), 1e3 * _pct(xs, 0.95)
        if label == "persistent":
            out.update(_planning_split(con, ids[:30], path.parent / "lineage_profile.json"))
            cks = [r[0] for r in con.execute("SELECT checkpoint_out FROM updates ORDER BY update_id LIMIT 50").fetchall()]
            ckq = []
            for c in cks:
                t0 = time.perf_counter()
                con.execute("SELECT * FROM checkpoint_heuristics WHERE checkpoint_id = ?", [c]).fetchall()
                ckq.append(time.perf_counter() - t0)
            out["checkpoint_heuristics_ms_p50"] = _ms(ckq) if ckq else float("nan")
        con.close()
    opens = []
    for _ in range(30):
        t0 = time.perf_counter()
        duckdb.connect(str(path), read_only=True).close()
        opens.append(time.perf_counter() - t0)
    out["open_ro_ms_p50"] = _ms(opens)
    out["rows_per_lookup"] = sorted(rows_seen)
    out["probe_id"] = ids[0]
    # The whole `mel lineage` command, Python start-up and imports included.
    cli = []
    for hid in ids[:cli_runs]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mel_app.cli", "lineage", "--db", str(path), hid],
                              cwd=REPO, capture_output=True, text=True)
        cli.append(time.perf_counter() - t0)
        if proc.returncode != 0 or hid not in proc.stdout:
            raise RuntimeError(f"mel lineage failed: {proc.stderr[-2000:]}")
    out["cli_ms_p50"] = _ms(cli) if cli else float("nan")
    log(f"  lineage over {n} ids: Store.query p50 {out['store_query_ms_p50']:.2f} ms, p95 {out['store_query_ms_p95']:.2f} ms;"
        f" persistent p50 {out['persistent_ms_p50']:.2f} ms, p95 {out['persistent_ms_p95']:.2f} ms"
        f" (1 thread: {out['persistent_1thread_ms_p50']:.2f} ms); planning {out['plan_only_ms_p50']:.2f} of"
        f" {out['profiled_total_ms_p50']:.2f} ms profiled;"
        f" open(read_only) {out['open_ro_ms_p50']:.2f} ms; whole `mel lineage` command {out['cli_ms_p50']:.0f} ms;"
        f" rows per lookup {out['rows_per_lookup']}")
    return out


# ------------------------------------------------------------------------------------ machine + doc


def doc_section(cmd: str, args, res: dict) -> str:
    bulk, pipe, held, br, lin, hd = (res["bulk"], res["pipeline"], res["held"], res["breakdown"], res["lineage"],
                                     res["headline"])
    ok_ingest = hd["store_ingest_rows_per_s"] >= GOAL_INGEST_ROWS_PER_S
    ok_ingest_batch = hd["store_ingest_batch_rows_per_s"] >= GOAL_INGEST_ROWS_PER_S
    ok_lineage = lin["store_query_ms_p50"] <= GOAL_LINEAGE_MS
    ok_lineage_persist = lin["persistent_ms_p50"] <= GOAL_LINEAGE_MS
    full = args.rollouts >= 1_000_000 and args.heuristics >= 100_000
    c = res["counts"]
    stage = ", ".join(f"{k} {v:.0f}" for k, v in pipe["stage_ms_p50"].items())
    pt = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(bulk["per_table_rows_per_s"].items(), key=lambda kv: kv[1])
                   if c.get(k, 0) >= 1000)
    yes = lambda ok: "**met**" if ok else "**missed**"
    lines = [
        "## store.py", "",
        "```bash", cmd, "```", "",
        f"- Machine: {machine(f'duckdb {duckdb.__version__}', f'pyarrow {pa.__version__}')}",
        f"- Date: {res['date']}; load average (1/5/15 min) at start {res['load_start']}, at end {res['load_end']}"
        " — other jobs shared these 2 cores, so absolute timings are pessimistic; compare ratios",
        f"- Corpus: {c['rollouts']:,} rollouts, {c['prompts']:,} prompts, {c['pairs']:,} pairs, {c['analyses']:,} "
        f"analyses, {c['heuristics']:,} heuristics, {c['replays']:,} replays, {c['updates']:,} updates/checkpoints, "
        f"{c['internalized']:,} internalized ({res['total_rows']:,} rows, {res['file_mb']:.0f} MB file). Rollouts: "
        "300-800 chars of text and 60-160 token ids each (≈1.2 kB per row in Arrow)." +
        ("" if full else " **Not the goal size** (1M rollouts / 100k heuristics): indicative only."),
        f"- Whole run: {res['wall_s']:.0f} s",
        "",
        "| ingest (rows/s, store calls only) | value |", "|---|---|",
        f"| one large batch: {args.chunk_steps} steps (~{args.chunk_steps * B * G:,} rollouts + their rows) per "
        f"`Store.transaction`, all tables | **{bulk['rows_per_s']:,.0f}** ({bulk['rows']:,} rows in {bulk['seconds']:.1f} s) |",
        f"| ... rollouts alone (`Writer.insert('rollouts', …)` calls inside those transactions) | {bulk['rollouts_per_s']:,.0f} |",
        f"| ... per table | {pt} |",
        f"| pipeline path: one `Store.transaction` per stage per step (6 per step, back to back: they share the process's connection), "
        f"{pipe['steps']} steps on top of the ~full corpus, all tables | **{pipe['rows_per_s']:,.0f}** "
        f"(mean {pipe['txn_ms_mean']:.0f} ms per transaction; {pipe['rows_per_s_window']:,.0f} over the window as "
        f"measured, see row-group spikes below) |",
        f"| ... sample transaction (1 step + 128 prompts + 1024 rollouts): rollouts/s, p50 / p95 ms | "
        f"{pipe['rollouts_per_s']:,.0f}; {pipe['sample_txn_ms_p50']:.0f} / {pipe['sample_txn_ms_p95']:.0f} ms |",
        f"| ... ms per stage transaction, p50 | {stage} |",
        f"| ... row-group spikes in the window (the close that completes a {ROW_GROUP_ROWS:,}-row row group of "
        f"rollouts takes seconds; once per {STEPS_PER_ROW_GROUP} steps, weighted so in the rates above); slowest "
        f"transaction | {', '.join(f'{x:,} ms' for x in pipe['spikes_ms']) or 'none'}; "
        f"{pipe['slowest_txn_ms']:.0f} ms ({pipe['slowest_txn']}) |",
        f"| ... first step after the bulk load (6 transactions; a warm-up, not counted above) | "
        f"{pipe['warmup_step_ms']:.0f} ms |",
        f"| same transactions on one held connection ({held['steps']} steps, incl. the final close) | "
        f"**{held['rows_per_s']:,.0f}** (mean {held['txn_ms_mean']:.1f} ms per transaction; sample p50 "
        f"{held['sample_txn_ms_p50']:.0f} ms, {held['rollouts_per_s']:,.0f} rollouts/s) |",
        "",
        f"| where the time goes ({br['micro_rows']:,} rollouts, pre-built Arrow table, one transaction) | value |",
        "|---|---|",
        f"| Python dicts → Arrow (`pa.Table.from_pylist`, as `Writer.insert` does) | {br['arrow_convert_rows_per_s']:,.0f} rows/s |",
        f"| INSERT OR IGNORE, PRIMARY KEY (what `Writer.insert` ran before this benchmark) | {br['sql_or_ignore_rows_per_s']:,.0f} rows/s |",
        f"| INSERT … ANTI JOIN t USING (key), PRIMARY KEY (same result) | {br['sql_anti_join_rows_per_s']:,.0f} rows/s |",
        f"| plain INSERT, PRIMARY KEY | {br['sql_insert_pk_rows_per_s']:,.0f} rows/s |",
        f"| plain INSERT, no PRIMARY KEY / same, in memory | {br['sql_insert_nopk_rows_per_s']:,.0f} / "
        f"{br['sql_insert_nopk_memory_rows_per_s']:,.0f} rows/s |",
        f"| narrow rows for reference ({br['narrow_rows']:,} metrics-shaped rows, 4 columns): OR IGNORE + PK on file / "
        f"plain INSERT in memory | {br['narrow_or_ignore_pk_rows_per_s']:,.0f} / {br['narrow_insert_nopk_memory_rows_per_s']:,.0f} rows/s |",
        f"| empty write transaction on the full file (open + BEGIN + COMMIT + close) | {br['empty_write_txn_ms']:.1f} ms |",
        f"| open + close read-only (a new DuckDB instance: built-in catalog set-up) | {br['open_ro_ms']:.1f} ms |",
        f"| {br['step_insert_rows']:,} rollouts, plain INSERT into the full file: first statement of a fresh "
        f"connection (loads the PRIMARY KEY index pages it touches) / same again on that connection | "
        f"{br['step_insert_cold_ms']:.0f} / {br['step_insert_warm_ms']:.0f} ms |",
        "",
        f"| lineage of one heuristic ({lin['lookups']} random ids) | p50 | p95 |", "|---|---|---|",
        f"| fresh `Store.query` per lookup (as `mel lineage`: opens the file) | **{lin['store_query_ms_p50']:.1f} ms** | "
        f"{lin['store_query_ms_p95']:.1f} ms |",
        f"| one persistent read-only connection | **{lin['persistent_ms_p50']:.1f} ms** | {lin['persistent_ms_p95']:.1f} ms |",
        f"| one persistent read-only connection, `threads=1` | {lin['persistent_1thread_ms_p50']:.1f} ms | "
        f"{lin['persistent_1thread_ms_p95']:.1f} ms |",
        f"| ... of which binding + optimizing (DuckDB's profiler; profiled total {lin['profiled_total_ms_p50']:.1f} ms) | "
        f"{lin['plan_only_ms_p50']:.1f} ms | |",
        f"| opening the file read-only (connect + close) | {lin['open_ro_ms_p50']:.1f} ms | |",
        f"| `checkpoint_heuristics` for one checkpoint, persistent connection | {lin['checkpoint_heuristics_ms_p50']:.1f} ms | |",
        f"| the whole `mel lineage ID` command (new Python process, imports, open, query, print) | "
        f"{lin['cli_ms_p50']:.0f} ms | |",
        "",
        "Goals (issue):",
        f"- ingest ≥ {GOAL_INGEST_ROWS_PER_S:,} rows/s: {yes(ok_ingest)} on the pipeline path "
        f"({hd['store_ingest_rows_per_s']:,.0f} rows/s), {yes(ok_ingest_batch)} in one large batch "
        f"({hd['store_ingest_batch_rows_per_s']:,.0f} rows/s).",
        f"- lineage ≤ {GOAL_LINEAGE_MS:.0f} ms for one heuristic: {yes(ok_lineage)} through `Store.query` "
        f"({lin['store_query_ms_p50']:.1f} ms p50), {yes(ok_lineage_persist)} on a persistent connection "
        f"({lin['persistent_ms_p50']:.1f} ms p50).",
    ]
    if res.get("notes"):
        lines += ["", *res["notes"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rollouts", type=int, default=1_000_000)
    ap.add_argument("--heuristics", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="50k rollouts / 5k heuristics (smoke run)")
    ap.add_argument("--lookups", type=int, default=200, help="random heuristic ids for the lineage latency")
    ap.add_argument("--chunk-steps", type=int, default=128, help="steps per transaction in the bulk phase")
    ap.add_argument("--step-window", type=int, default=16,
                    help="steps written the pipeline's way, and again on a held connection (K)")
    ap.add_argument("--micro-rows", type=int, default=32_768, help="rollouts in the breakdown micro-benchmarks")
    ap.add_argument("--cli-runs", type=int, default=5, help="timed runs of the whole `mel lineage` command")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="work in this directory (default: a temporary one)")
    ap.add_argument("--doc", type=Path, default=DOC, help="the BENCHMARKS.md to update")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.rollouts, args.heuristics = 50_000, 5_000
        args.micro_rows = min(args.micro_rows, 8_192)
    log = lambda msg: print(msg, flush=True)
    cmd = ".venv/bin/python benchmarks/store.py" + "".join(
        " " + a for a in (argv if argv is not None else sys.argv[1:]))
    load_start = load_average()

    with contextlib.ExitStack() as stack:
        tmp = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mel-store-bench-")))
        tmp.mkdir(parents=True, exist_ok=True)
        db = tmp / "corpus.duckdb"
        for f in (db, Path(str(db) + ".wal")):
            f.unlink(missing_ok=True)
        wall0 = time.perf_counter()
        corpus = Corpus(args.rollouts, args.heuristics, seed=args.seed)
        S = corpus.num_steps
        K = max(1, min(args.step_window, S // 4))
        log(f"store benchmark: {args.rollouts:,} rollouts, {args.heuristics:,} heuristics, {S} steps in {tmp}")
        store = Store(db)
        log(f"[1/5] bulk ingest: steps 1-{S - 2 * K}, {args.chunk_steps} steps per transaction")
        bulk = ingest_bulk(store, corpus, range(0, S - 2 * K), args.chunk_steps, log)
        log(f"[2/5] pipeline-path ingest: steps {S - 2 * K + 1}-{S - K}, one transaction per stage")
        pipe = ingest_steps(store, corpus, range(S - 2 * K, S - K), bulk["ckpt"], held=False, log=log, warmup=K > 1)
        log(f"[3/5] held-connection ingest: steps {S - K + 1}-{S}")
        held = ingest_steps(store, corpus, range(S - K, S), pipe["ckpt"], held=True, log=log)
        counts = store.counts()
        total_rows = sum(counts.values())
        log("  counts: " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if v))
        log(f"[4/5] where the ingest time goes ({args.micro_rows:,} rollouts)")
        breakdown = ingest_breakdown(tmp, db, corpus, args.micro_rows, log)
        log(f"[5/5] heuristic_lineage latency ({args.lookups} random heuristic ids)")
        lineage = lineage_latency(db, corpus.heuristic_ids, args.lookups, args.seed, log, args.cli_runs)
        file_mb = db.stat().st_size / 2**20
        wall = time.perf_counter() - wall0

    headline = {
        "store_ingest_batch_rows_per_s": bulk["rows_per_s"],
        "store_ingest_held_rows_per_s": held["rows_per_s"],
        "store_ingest_rollouts_per_s": pipe["rollouts_per_s"],
        "store_ingest_rows_per_s": pipe["rows_per_s"],
        "store_lineage_persistent_ms_p50": lineage["persistent_ms_p50"],
        "store_lineage_ms_p95": lineage["store_query_ms_p95"],
        "store_lineage_ms_p50": lineage["store_query_ms_p50"],
    }
    res = {"bulk": bulk, "pipeline": pipe, "held": held, "breakdown": breakdown, "lineage": lineage,
           "counts": counts, "total_rows": total_rows, "file_mb": file_mb, "wall_s": wall, "headline": headline,
           "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "load_start": load_start, "load_end": load_average(),
           "lineage_probe_id": lineage["probe_id"]}
    res["notes"] = notes(res)
    log(f"done in {wall:.0f} s; file {file_mb:.0f} MB; load average {res['load_start']} -> {res['load_end']}")
    if not args.no_doc:
        update_doc("store.py", doc_section(cmd, args, res), args.doc)
        log(f"updated {args.doc}")
    for k in HEADLINE_ORDER:
        print(f"{k}: {headline[k]:.4g}")
    return res


def notes(res: dict) -> list[str]:
    """Plain-language reading of the numbers for the doc, filled in from the measurements."""
    pipe, held, br, lin = res["pipeline"], res["held"], res["breakdown"], res["lineage"]
    rows_per_step = pipe["rows"] / pipe["steps"]
    per_step_pipe = pipe["amortized_seconds"] / pipe["steps"]
    per_step_held = held["amortized_seconds"] / held["steps"]
    pipe["txn_ms_mean"] - held["txn_ms_mean"]
    return [
        "Why the ingest goal is missed, and what would move it:",
        f"- **The rows are wide.** A rollout is ~1.2 kB (text + ~110 token ids). Even the cheapest possible insert of "
        f"a pre-built Arrow table of rollouts — plain INSERT, no PRIMARY KEY, in memory — runs at "
        f"{br['sql_insert_nopk_memory_rows_per_s']:,.0f} rows/s here, and turning the pipeline's dicts into Arrow alone "
        f"at {br['arrow_convert_rows_per_s']:,.0f} rows/s. Narrow 4-column rows reach "
        f"{br['narrow_insert_nopk_memory_rows_per_s']:,.0f} rows/s in memory without a key, "
        f"{br['narrow_or_ignore_pk_rows_per_s']:,.0f} rows/s into a file with OR IGNORE + PRIMARY KEY. "
        "1M rows/s is not reachable for this corpus on this machine by any insert strategy; per-step cost is "
        f"the useful yardstick: a step writes ~{rows_per_step:,.0f} rows, which costs {per_step_pipe:.2f} s on the "
        f"pipeline path and {per_step_held:.2f} s on a held connection.",
        f"- **Opening the file is what a transaction used to cost.** A new DuckDB instance costs "
        f"{br['empty_write_txn_ms']:.0f} ms (an empty write transaction: open + BEGIN + COMMIT + close, mostly built-in "
        f"catalog set-up) and a fresh connection reloads the PRIMARY KEY index pages its inserts touch "
        f"({br['step_insert_cold_ms']:.0f} ms instead of {br['step_insert_warm_ms']:.0f} ms for a step's rollouts). "
        "The store now keeps one read-write connection per file per process and closes it after 0.1 s unused, so "
        "a stage's burst of reads and writes (and the pipeline path here, whose transactions follow each other) "
        f"pays that once: mean transaction {pipe['txn_ms_mean']:.0f} ms, against {held['txn_ms_mean']:.0f} ms on "
        "a connection held by hand. What remains is the insert itself and the checkpoint of the new rows.",
        f"- **INSERT OR IGNORE is the slow insert.** DuckDB runs ON CONFLICT row by row: "
        f"{br['sql_or_ignore_rows_per_s']:,.0f} rows/s vs {br['sql_insert_pk_rows_per_s']:,.0f} for a plain INSERT into "
        f"the same PRIMARY KEY table, and {br['sql_anti_join_rows_per_s']:,.0f} for `INSERT … SELECT … ANTI JOIN t "
        "USING (key)`, which leaves the same rows. Changed alongside this benchmark: `Writer.insert` now takes the "
        "anti-join when the batch's keys are distinct, typed like the table's, and the batch is ≥ 0.1% of the table "
        "(below that, scanning the key column costs more than OR IGNORE's per-row work); otherwise it still runs "
        "INSERT OR IGNORE. New `Writer.insert_arrow(table, pa.Table)` skips the dict → Arrow step.",
        "",
        "Suggested next fix (not made):",
        "- Past ~10M rollouts, make the anti-join index-backed (e.g. `SET dynamic_or_filter_threshold` above the "
        "batch size turns the key lookup into an index scan: 14 ms instead of a 41 ms scan for 1024 keys at 1M, "
        "measured once by hand), "
        "or drop the PRIMARY KEY on `rollouts` and dedupe within the batch's (run_id, step), which every id already "
        "implies; either keeps per-step cost flat as the corpus grows.",
        "",
        "Lineage:",
        f"- On a persistent read-only connection the query takes {lin['persistent_ms_p50']:.1f} ms p50, of which "
        f"~{lin['plan_only_ms_p50']:.1f} ms is binding and optimizing the 9-join view (execution is index scans: "
        "every join probes the primary-key index with a dynamic filter).",
        f"- Through `Store.query` (what `mel lineage` does) it takes {lin['store_query_ms_p50']:.1f} ms p50: opening "
        f"the file read-only costs {lin['open_ro_ms_p50']:.1f} ms by itself (a new DuckDB instance) and the first "
        "query on a fresh connection loads the index pages it needs. For the CLI this is one open per process, "
        f"and the whole `mel lineage` command takes {lin['cli_ms_p50']:.0f} ms, mostly Python start-up and imports; "
        "a long-lived reader (notebook, UI, service) should keep one read-only connection"
        + (", which meets the goal." if lin["persistent_ms_p50"] <= GOAL_LINEAGE_MS else
           ", which comes closest (the goal is missed even there on this run)."),
    ]


if __name__ == "__main__":
    main()
