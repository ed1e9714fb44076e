"""The heuristic library: near-duplicate heuristics grouped into clusters, counted over a campaign.

A heuristic is a vector of hashed features of its normalised text (deterministic on any machine; no model), and
joins the cluster whose founder vector is nearest if the cosine reaches ``library.similarity_threshold``, else founds
one (leader clustering in (step, heuristic_id) order: assignments are final). It runs inside ``abstract``'s
transaction; the ``heuristic_clusters`` view counts produced / accepted / internalized per cluster. Why text features
and not hidden states, and what they cost: docs/DESIGN.md, "The heuristic library".
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np
import pyarrow as pa

from mel_core.ids import make_id
from mel_core.store.writer import Writer

FEATURE_VERSION = "text-words+char3-v1"  # bump when features() changes: stored clusters are then rebuilt
BLOCK_DIM = 256  # hashed dimensions per feature family (words, character trigrams)
FEATURE_DIM = 2 * BLOCK_DIM  # the store's FLOAT[512] column (mel_core.store.schema.TABLES["library_clusters"])

# Words every If/Then rule shares: counting them would make any two rules look alike. Negations
# ("not", "no", "never") and operators stay: they change what a rule says.
_TEMPLATE_WORDS = frozenset(
    "a an the if then when whenever once so that this these those it its is are be been being was were "
    "of to in on at by for with as and or from into than there their them they you your i my me we our "
    "should must always".split())
_TOKEN = re.compile(r"[a-z0-9]+|[*+\-/=<>^%]")


def _stem(word: str) -> str:
    """A light suffix stemmer so that inflections meet: carries/carried/carry -> carry, passes/passed ->
    pass, comes/coming/come -> com, ones/one -> on, tens/ten -> ten (a key, not a word)."""
    if word.endswith(("ies", "ied")) and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith(("sses", "xes", "zes", "ches", "shes")):
        word = word[:-2]
    elif word.endswith("ing") and len(word) >= 6:
        word = word[:-3]
    elif word.endswith("ed") and len(word) >= 5:
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) >= 3:
        word = word[:-1]
    return word[:-1] if word.endswith("e") and len(word) >= 3 else word


def content_words(text: str) -> list[str]:
    """Lower-cased, stemmed content words and operator symbols of a heuristic, in order."""
    tokens = _TOKEN.findall(unicodedata.normalize("NFKC", text or "").lower())
    return [_stem(t) for t in tokens if t not in _TEMPLATE_WORDS]


def _hashed(feats: list[str]) -> np.ndarray:
    """Signed feature hashing into BLOCK_DIM floats, L2-normalised (a zero vector if there are no features)."""
    v = np.zeros(BLOCK_DIM, dtype=np.float64)
    for f in feats:
        h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
        v[h % BLOCK_DIM] += 1.0 if (h >> 32) & 1 else -1.0
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def features(text: str) -> np.ndarray:
    """[FEATURE_DIM] float32, unit norm: words and their character trigrams, half the weight each."""
    words = content_words(text)
    trigrams = [g for w in words for g in (lambda p: [p[i:i + 3] for i in range(max(1, len(p) - 2))])(f"<{w}>")]
    v = np.concatenate([_hashed(words), _hashed(trigrams)]) * np.sqrt(0.5)
    return v.astype(np.float32)


def similarity(a: str, b: str) -> float:
    """Cosine of two heuristics' feature vectors (1.0 for texts that differ only in template words/case)."""
    return float(features(a) @ features(b))


def signature(threshold: float) -> str:
    """What a clustering was made with; stored per cluster, part of its id."""
    return f"{FEATURE_VERSION}@{threshold:.4f}"


def _fixed_size_list(vectors: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), FEATURE_DIM)


def assign_clusters(w: Writer, run_id: str, threshold: float) -> dict:
    """Give every heuristic of `run_id` without a cluster one; idempotent, deterministic, incremental.

    Runs inside the caller's transaction. Returns {"assigned", "new_clusters", "clusters", "reclustered"}.
    """
    sig = signature(threshold)
    con = w.con
    stale = con.execute("SELECT count(*) FROM library_clusters WHERE run_id = ? AND method <> ?",
                        [run_id, sig]).fetchall()[0][0]
    if stale:  # made with another threshold or feature version: rebuild the run's library
        con.execute("DELETE FROM library_clusters WHERE run_id = ?", [run_id])
        con.execute("UPDATE heuristics SET cluster_id = NULL, cluster_similarity = NULL WHERE run_id = ?", [run_id])
    todo = con.execute("SELECT heuristic_id, step, text FROM heuristics WHERE run_id = ? AND cluster_id IS NULL "
                       "ORDER BY step, heuristic_id", [run_id]).fetchall()
    if not todo:
        n = con.execute("SELECT count(*) FROM library_clusters WHERE run_id = ?", [run_id]).fetchall()[0][0]
        return {"assigned": 0, "new_clusters": 0, "clusters": n, "reclustered": bool(stale)}
    # Through Arrow: 10x faster than fetchall's Python lists for 20k x 512 floats.
    existing = con.sql("SELECT cluster_id, features FROM library_clusters WHERE run_id = ? "
                       "ORDER BY step, founder_heuristic_id", params=[run_id]).to_arrow_table()
    founder_ids = existing.column("cluster_id").to_pylist()
    k0 = len(founder_ids)
    founders = np.zeros((k0 + len(todo), FEATURE_DIM), dtype=np.float32)  # room for the batch's new founders
    if k0:
        founders[:k0] = existing.column("features").combine_chunks().flatten().to_numpy().reshape(k0, FEATURE_DIM)
    new_vectors = np.stack([features(t) for _, _, t in todo])  # [n, FEATURE_DIM]
    sims_existing = new_vectors @ founders[:k0].T  # [n, K]: one product for the whole batch
    assignments, new_clusters = [], []
    for i, (hid, step, _) in enumerate(todo):
        k = len(founder_ids)
        sims = sims_existing[i]
        if k > k0:  # founders created earlier in this batch
            sims = np.concatenate([sims, founders[k0:k] @ new_vectors[i]])
        best = int(np.argmax(sims)) if k else -1  # argmax returns the first maximum: the earlier cluster
        if best >= 0 and sims[best] >= threshold:
            assignments.append({"heuristic_id": hid, "cluster_id": founder_ids[best],
                                "cluster_similarity": float(sims[best])})
            continue
        cid = make_id("cluster", sig, hid)
        founder_ids.append(cid)
        founders[k] = new_vectors[i]
        new_clusters.append({"cluster_id": cid, "run_id": run_id, "founder_heuristic_id": hid, "step": step,
                             "method": sig})
        assignments.append({"heuristic_id": hid, "cluster_id": cid, "cluster_similarity": 1.0})
    if new_clusters:
        vectors = founders[k0:len(founder_ids)]
        table = pa.Table.from_pylist(new_clusters).append_column("features", _fixed_size_list(vectors))
        w.insert_arrow("library_clusters", table)
    w.update("heuristics", "heuristic_id", assignments)
    return {"assigned": len(assignments), "new_clusters": len(new_clusters), "clusters": len(founder_ids),
            "reclustered": bool(stale)}


def run_threshold(config_json: str | None, default: float) -> float:
    """The similarity threshold a run was configured with (older runs' configs lack the section)."""
    import json

    try:
        return float(json.loads(config_json or "{}").get("library", {}).get("similarity_threshold", default))
    except (ValueError, TypeError, AttributeError):
        return default


def summary(store, run_id: str) -> dict:
    """Size of a run's library: heuristics and clusters, accepted and internalized ones."""
    return store.query(
        "SELECT coalesce(sum(produced), 0) AS heuristics, count(*) AS clusters, coalesce(sum(accepted), 0) AS accepted, "
        "count(*) FILTER (WHERE accepted > 0) AS accepted_clusters, coalesce(sum(internalized), 0) AS internalized "
        "FROM heuristic_clusters WHERE run_id = ?", [run_id])[0]


def top_clusters(store, run_id: str, limit: int = 10) -> list[dict]:
    """The run's clusters, most accepted first (then most produced, then the earliest)."""
    return store.query("SELECT * FROM heuristic_clusters WHERE run_id = ? ORDER BY accepted DESC, produced DESC, "
                       "first_step, cluster_id LIMIT ?", [run_id, limit])
