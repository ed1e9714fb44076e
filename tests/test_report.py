"""`mel report` on a real micro campaign (2 steps, 8 prompts, a micro model whose words are scripted —
tests/scripted.py — so every section has something to show, under Prefect):
the markdown's numbers are the store's, the PNGs exist, evaluations appear when recorded, and the
heuristic library is filled by the abstract stage and published as a Prefect artifact."""

import json
import re
import shutil

import duckdb
import pytest

from mel_app.cli import main as mel
from mel_core import config as C
from mel_core.ids import make_id
from mel_core.store import run_reads
from mel_core.store.reader import StoreReader
from mel_core.store.schema import PRIMARY_KEYS, TABLES
from mel_core.store.writer import Store
from mel_core.study import report
from tests.scripted import Script, scripted_runtimes

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, prefect_harness, micro_model):
    from flows.campaign import campaign

    root = tmp_path_factory.mktemp("runs")
    cfg = C.load("configs/tiny.yaml", ["run.name=report-micro", f"run.root_dir={root}", "run.steps=2",
                                       f"model.name_or_path={micro_model}", "sampling.prompts_per_step=8",
                                       "sampling.group_size=4"])
    # some replays fail: the library has accepted and rejected heuristics to count
    with scripted_runtimes(Script(replay_solves=lambda q: sum(map(ord, q)) % 3 != 0)):
        result = campaign(C.to_dict(cfg))
    return cfg, result, Store(result["db"])


def _section(md: str, title: str) -> str:
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _rows(section: str) -> list[list[str]]:
    """The body rows of the first markdown table in a section, as cells."""
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines[2:]]


def test_the_abstract_stage_put_every_heuristic_in_a_cluster(micro_run):
    _, result, store = micro_run
    run_id = result["run_id"]
    n = store.query("SELECT count(*) AS n, count(cluster_id) AS clustered FROM heuristics WHERE run_id = ?", [run_id])[0]
    assert n["n"] > 0 and n["clustered"] == n["n"]  # before any report: clustering is part of the step
    lineage = store.query("SELECT count(*) AS n FROM heuristic_lineage WHERE cluster_id IS NULL AND run_id = ?", [run_id])
    assert lineage[0]["n"] == 0
    # the view's counts against a hand count over the raw tables
    hand = {r["cluster_id"]: (r["produced"], r["accepted"], r["internalized"]) for r in store.query(
        "SELECT cluster_id, count(*) AS produced, count(*) FILTER (WHERE accepted) AS accepted, "
        "count(*) FILTER (WHERE heuristic_id IN (SELECT heuristic_id FROM internalized)) AS internalized "
        "FROM heuristics WHERE run_id = ? GROUP BY cluster_id", [run_id])}
    view = {r["cluster_id"]: (r["produced"], r["accepted"], r["internalized"]) for r in store.query(
        "SELECT * FROM heuristic_clusters WHERE run_id = ?", [run_id])}
    assert view == hand


def test_report_numbers_are_the_stores(micro_run):
    cfg, result, store = micro_run
    run_id = result["run_id"]
    path = report.write_report(report.resolve_run(result["run_dir"]))
    assert path == report.Path(result["run_dir"]) / "report" / "report.md"
    md = path.read_text()

    for name in ("reward_mean", "mixed_fraction", "retention_ratio", "stage_times"):
        png = path.parent / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 2000, name
        assert f"]({name}.png)" in md

    metrics = {(r["step"], r["name"]): r["value"] for r in store.query(
        "SELECT step, name, value FROM metrics WHERE run_id = ?", [run_id])}
    rows = _rows(_section(md, "Training curves"))
    assert [int(r[0]) for r in rows] == [1, 2]
    for r in rows:
        step = int(r[0])
        m = lambda name: metrics.get((step, name))
        assert r[1] == report.fmt(m("reward_mean"))
        # counted from the rollouts by the report, written by the pair stage: the two must agree
        assert r[2] == f"{int(m('mixed_groups'))}/{int(m('groups'))}" and int(m("groups")) == 8
        assert r[3] == report.fmt(m("mixed_groups") / m("groups"))
        assert (r[4], r[6], r[7]) == (report.fmt(m("analyses")), report.fmt(m("accepted")), report.fmt(m("retention_ratio")))
        update = store.query("SELECT nll_loss, num_nll_sequences FROM updates WHERE run_id = ? AND step = ?", [run_id, step])[0]
        assert r[8] == (report.fmt(update["nll_loss"]) if update["num_nll_sequences"] else "-")
        secs = store.query("SELECT sum(seconds) AS s FROM stage_runs WHERE run_id = ? AND step = ? AND status = 'completed'",
                           [run_id, step])[0]["s"]
        assert r[9] == report.fmt(secs, 1)

    stage_rows = {r[0]: r for r in _rows(_section(md, "Time per stage"))}
    assert list(stage_rows) == ["sample", "verify", "pair", "diagnose", "abstract", "replay", "update"]
    sample_s = store.query("SELECT sum(seconds) AS s FROM stage_runs WHERE run_id = ? AND stage = 'sample' "
                           "AND status = 'completed'", [run_id])[0]["s"]
    assert stage_rows["sample"][1] == report.fmt(sample_s, 1)

    assert "No evaluations recorded" in _section(md, "Held-out accuracy")
    assert not (path.parent / "heldout_accuracy.png").exists()

    lib = _section(md, "Heuristic library")
    counts = store.query("SELECT count(*) AS n, count(DISTINCT cluster_id) AS k, count(*) FILTER (WHERE accepted) AS a "
                         "FROM heuristics WHERE run_id = ?", [run_id])[0]
    assert f"{counts['n']} heuristics in {counts['k']} clusters" in lib and f"{counts['a']} accepted" in lib
    clusters = {r["cluster_id"]: r for r in store.query("SELECT * FROM heuristic_clusters WHERE run_id = ?", [run_id])}
    table = _rows(lib)
    assert len(table) == min(10, len(clusters))
    for cells in table:
        c = clusters[cells[0].strip("`")]
        assert cells[1:4] == [str(c["produced"]), str(c["accepted"]), str(c["internalized"])]
        assert cells[6].strip("`").replace("\\|", "|") == " ".join(c["representative"].split())
    assert [int(r[2]) for r in table] == sorted((int(r[2]) for r in table), reverse=True)  # most accepted first


def test_report_shows_recorded_evaluations_and_tolerates_a_missing_table(micro_run, tmp_path):
    _, result, _ = micro_run
    db = tmp_path / "mel.duckdb"
    shutil.copy(result["db"], db)
    store = Store(db)
    ckpts = store.query("SELECT checkpoint_id, step FROM checkpoints WHERE run_id = ? ORDER BY step", [result["run_id"]])
    if "evals" not in TABLES:  # the evaluation flow's table, as it is specified (issue 5)
        store.execute("CREATE TABLE evals (run_id VARCHAR, checkpoint_id VARCHAR, step INTEGER, dataset VARCHAR, "
                      "metric VARCHAR, k INTEGER, temperature DOUBLE, value DOUBLE)")
    values = {0: 0.25, 1: 0.3125, 2: 0.375}
    rows = []
    for c in ckpts:
        for metric, k, temp, v in (("pass@1", 1, 0.0, values[c["step"]]), ("avg@8", 8, 0.6, values[c["step"]] / 2)):
            row = {"run_id": result["run_id"], "checkpoint_id": c["checkpoint_id"], "step": c["step"],
                   "dataset": "synthetic", "metric": metric, "k": k, "temperature": temp, "value": v}
            for key in PRIMARY_KEYS.get("evals", {}):
                row.setdefault(key, make_id("eval", c["checkpoint_id"], metric))
            rows.append(row)
    with store.transaction() as w:
        for row in rows:
            cols = ", ".join(row)
            w.execute(f"INSERT INTO evals ({cols}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    store.publish()  # reports read what was published

    path = report.write_report(report.RunRef(db), out_dir=tmp_path / "out")
    held = _section(path.read_text(), "Held-out accuracy")
    got = {(int(r[0]), r[2]): r[5] for r in _rows(held)}
    assert got == {(s, m): report.fmt(v if m == "pass@1" else v / 2) for s, v in values.items() for m in ("pass@1", "avg@8")}
    assert (tmp_path / "out" / "heldout_accuracy.png").read_bytes()[:8] == PNG_MAGIC

    older = tmp_path / "older.duckdb"  # a store written before evaluation existed: no evals table, no snapshot
    shutil.copy(result["db"], older)
    con = duckdb.connect(str(older))
    con.execute("DROP TABLE evals")
    con.close()
    with StoreReader(older) as reader:
        assert run_reads.evaluation_curves(reader, result["run_id"]) == []


def test_mel_report_finds_a_run_by_name_id_dir_or_file(micro_run, tmp_path, capsys):
    cfg, result, _ = micro_run
    root = cfg.run.root_dir
    by_dir = report.resolve_run(result["run_dir"])
    assert report.resolve_run("report-micro", root).db == by_dir.db == report.resolve_run(result["db"]).db
    assert report.resolve_run(result["run_id"], root) == report.RunRef(by_dir.db, run_id=result["run_id"])
    with pytest.raises(report.ReportError, match="no run 'nope'"):
        report.resolve_run("nope", root)
    assert mel(["report", result["run_id"], "--root", root, "--out", str(tmp_path / "cli"), "--top", "2"]) == 0
    assert (tmp_path / "cli" / "report.md").exists() and "report written" in capsys.readouterr().out
    assert mel(["report", "nope", "--root", root]) == 1


def test_each_step_publishes_the_library_as_a_prefect_artifact(micro_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, result, store = micro_run
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mel-report-micro-heuristic-library"])))
    assert len(arts) == 2  # one per step, under one key
    latest = max(arts, key=lambda a: a.created)
    top = store.query("SELECT cluster_id, representative, produced, accepted, internalized FROM heuristic_clusters "
                      "WHERE run_id = ? ORDER BY accepted DESC, produced DESC, first_step, cluster_id", [result["run_id"]])
    table = json.loads(latest.data)
    assert [{k: r[k] for k in top[0]} for r in table] == top[:10]  # after the last step: the library as it is now
