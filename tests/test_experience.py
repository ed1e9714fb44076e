from mel_core.algorithm import pairing, replay_filter


def test_pairs_only_from_mixed_groups_and_seeded():
    groups = {"p1": [("a", 1.0), ("b", 0.0), ("c", 0.0)], "p2": [("d", 1.0), ("e", 1.0)], "p3": [("f", 0.0), ("g", 0.0)]}
    pairs = pairing.make_pairs(groups, 1, seed=7)
    assert len(pairs) == 1 and pairs[0].prompt_id == "p1" and pairs[0].correct_rollout_id == "a"
    assert pairs == pairing.make_pairs(groups, 1, seed=7)
    assert len(pairing.make_pairs(groups, 5, seed=7)) == 2  # only 2 distinct (correct, incorrect) combinations
    assert len(pairing.make_pairs(groups, 1, seed=7, strategy="all")) == 2
    chosen = {pairing.make_pairs(groups, 1, seed=s)[0].incorrect_rollout_id for s in range(20)}
    assert chosen == {"b", "c"}  # the seed really picks among the incorrect rollouts


def test_acceptance_and_retention():
    assert replay_filter.accept([1.0], 1) and not replay_filter.accept([0.0], 1)
    assert replay_filter.accept([1.0, 0.0, 1.0], 2) and not replay_filter.accept([1.0, 0.0, 0.0], 2)
    assert replay_filter.retention_ratio(1, 4) == 0.25 and replay_filter.retention_ratio(0, 0) == 0.0


def test_disjoint_pairing_never_reuses_a_rollout():
    groups = {"p": [("c1", 1.0), ("c2", 1.0), ("w1", 0.0), ("w2", 0.0), ("w3", 0.0)]}
    pairs = pairing.make_pairs(groups, 0, seed=3, strategy="disjoint")
    used = [p.correct_rollout_id for p in pairs] + [p.incorrect_rollout_id for p in pairs]
    assert len(pairs) == 2 and len(used) == len(set(used))
    assert len(pairing.make_pairs(groups, 1, seed=3, strategy="disjoint")) == 1
