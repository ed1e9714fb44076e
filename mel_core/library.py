"""The heuristic library: near-duplicate heuristics grouped into clusters, counted over a campaign.

Every heuristic a step writes (``heuristics``, produced by ``abstract``) gets a ``cluster_id``; the view
``heuristic_clusters`` (mel_core.store) counts per cluster how often the rule was produced, accepted by
replay and internalized by an update, with a representative text. Clusters are per run.

**Representation: text similarity, not the policy's hidden states.** A heuristic becomes a fixed,
corpus-independent vector of hashed features of its normalised text (lower-cased content words with
template words such as "if", "then", "the" dropped and a light suffix stemmer, plus character
trigrams of those words, each half L2-normalised, :data:`FEATURE_DIM` floats); two heuristics are near
duplicates when the cosine of their vectors is at least ``library.similarity_threshold``. Why:

- *Deterministic and stable.* The features depend on the string alone (blake2b hashing, no IDF, no
  model, no float reductions on an accelerator), so the same text gives bit-identical vectors on any
  machine, at any step, in any process; cluster ids never move when a campaign is resumed or re-run.
  Hidden states belong to a policy that changes every step: vectors from step 3 and step 300 live in
  different spaces, so incremental clustering would compare incomparable vectors unless every text were
  re-embedded with one fixed checkpoint — which for a 14B policy means loading it in `mel report`.
- *What the policies write.* The tiny model emits near-identical rule strings (the demo's 49
  heuristics are 8 distinct strings; the variants are truncations such as "..., then do the second
  says."), which text features handle exactly (at 0.7 the demo's 8 strings form 7 clusters: the
  truncation "..., then keep the tens." joins "..., then keep the minus sign on the result.", 0.78).
  Real models paraphrase; lexical paraphrases (reordered clauses, "When X, Y" for "If X, then Y",
  inflections, articles) land at cosine 0.75-1.0 with these features, distinct rules at <= 0.4, and
  rules sharing a condition but prescribing another action at 0.63-0.68 (the cases are in
  tests/test_library.py; the threshold sits between the last two groups). A paraphrase with no shared content words
  ("passes a ten" / "sum exceeds nine") is missed; the hidden states of a base LM would not reliably
  catch it either: mean-pooled or last-token states of a model not trained for sentence similarity are
  weak similarity measures (SBERT, Reimers & Gurevych 2019), and the 1M-parameter policy never saw
  paraphrases at all. A real sentence-embedding model would, but cannot be downloaded here; it would
  replace :func:`features` (the vectors are stored as FLOAT[n], the search is a dot product).
- *Cheap.* Featurising a step's heuristics takes milliseconds; the nearest-founder search is one numpy
  matrix product (400 new heuristics x 20k clusters: 0.7 s on 2 shared cores, where DuckDB's
  ``array_cosine_similarity`` cross join took 12.6 s; x 2k clusters: 0.07 s vs 1.2 s). The founder
  vectors live in DuckDB (``library_clusters.features FLOAT[512]``) so SQL can use them too.

**Clustering: leader clustering in a fixed order.** New heuristics are taken in (step, heuristic_id)
order; each joins the existing cluster whose *founder* vector is most similar (ties: the earlier
cluster) if that cosine reaches the threshold, and otherwise founds a new cluster with id
``make_id("cluster", signature, founder heuristic id)``. Founder vectors never change, so an
assignment once made is final: re-running assigns nothing, assigning steps one by one equals assigning
them all at once, and a cluster cannot drift by chaining (a member similar only to another member does
not join). The signature (feature version + threshold) is stored with each cluster; when the run's
threshold changes, the run is re-clustered from scratch under new ids.

**When it runs: inside ``abstract``'s own transaction** (mel_core.stages.abstract), the moment the texts
exist — a cluster id depends on the text alone, and the accepted / internalized counts are joins in the
view, so they are current as replay and update write their rows, and no later stage has to touch the
library. ``mel report`` calls :func:`assign_clusters` as well, which fills in files written before the
library existed (and steps whose abstract was cached across a threshold change) and is a no-op otherwise.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np
import pyarrow as pa

from mel_core.store import Writer, make_id

FEATURE_VERSION = "text-words+char3-v1"  # bump when features() changes: stored clusters are then rebuilt
BLOCK_DIM = 256  # hashed dimensions per feature family (words, character trigrams)
FEATURE_DIM = 2 * BLOCK_DIM  # the store's FLOAT[512] column (mel_core.store.TABLES["library_clusters"])

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
