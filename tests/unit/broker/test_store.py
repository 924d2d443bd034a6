"""ReplayStore on a real LMDB directory: idempotent inserts, state moves, staleness, capacity, durability."""

import pytest

from editrl.broker.store import ReplayStore


def _insert(store, gid, version=0):
    return store.insert_groups([(gid, f"record-{gid}".encode(), {"version": version, "task_id": "t"})])[0]


def test_insert_is_idempotent_and_durable_across_reopen(tmp_path):
    store = ReplayStore(tmp_path / "r", capacity=100)
    assert _insert(store, "a") is True
    assert _insert(store, "a") is False
    assert store.counters()["ingested"] == 1 and store.counters()["duplicate_groups"] == 1
    store.close()
    store = ReplayStore(tmp_path / "r", capacity=100)
    assert store.pending_ids() == ["a"]
    assert store.get_record("a") == b"record-a"


def test_scored_groups_are_taken_once_in_fifo_order_and_stale_ones_dropped(tmp_path):
    store = ReplayStore(tmp_path / "r", capacity=100)
    for i, version in enumerate([0, 2, 2, 3]):
        _insert(store, f"g{i}", version)
    assert store.mark_scored("g0", [1.0, 2.0], {}) and store.mark_scored("g1", [3.0, 4.0], {})
    assert store.mark_scored("g1", [9.0, 9.0], {}) is False  # late duplicate result
    store.mark_scored("g2", [5.0, 6.0], {})
    taken, stale = store.take_ready(max_groups=1, min_version=1)
    assert stale == 1 and [gid for gid, *_ in taken] == ["g1"] and taken[0][2] == [3.0, 4.0]
    taken, stale = store.take_ready(max_groups=5, min_version=1)
    assert [gid for gid, *_ in taken] == ["g2"] and stale == 0
    assert store.take_ready(5, 0) == ([], 0)
    c = store.counters()
    assert c["consumed"] == 2 and c["dropped_stale"] == 1 and c["scored"] == 3
    assert store.pending_ids() == ["g3"]


def test_unscorable_leaves_pending(tmp_path):
    store = ReplayStore(tmp_path / "r", capacity=10)
    _insert(store, "x")
    assert store.mark_unscorable("x", "judge unparseable")
    assert store.pending_ids() == [] and store.counters()["dropped_unscorable"] == 1
    assert store.mark_scored("x", [1.0], {}) is False


def test_capacity_evicts_oldest_non_pending(tmp_path):
    store = ReplayStore(tmp_path / "r", capacity=2)
    for gid in "abc":
        _insert(store, gid)
    assert store.counters()["evicted"] == 0  # all pending: never evicted
    store.mark_scored("a", [1.0], {})
    _insert(store, "d")
    assert store.get_record("a") is None and store.get_status("a")["state"] == "evicted"
    assert store.counters()["evicted_unconsumed"] == 1


def test_task_cursor_is_durable(tmp_path):
    store = ReplayStore(tmp_path / "r", capacity=10)
    assert [store.next_task(3) for _ in range(4)] == [(0, 0), (1, 0), (2, 0), (0, 1)]
    store.close()
    assert ReplayStore(tmp_path / "r", capacity=10).next_task(3) == (1, 1)


def test_map_full_grows_and_retries(tmp_path):
    store = ReplayStore(tmp_path / "r", capacity=1000, map_size_bytes=256 * 1024)
    big = b"x" * (200 * 1024)
    results = store.insert_groups([(f"g{i}", big, {"version": 0}) for i in range(8)])
    assert all(results) and store.counters()["ingested"] == 8
    assert store.env.info()["map_size"] > 256 * 1024


def test_rejects_bad_capacity(tmp_path):
    with pytest.raises(ValueError, match="capacity"):
        ReplayStore(tmp_path / "r", capacity=0)


def test_resend_of_an_evicted_group_is_still_a_duplicate(tmp_path):
    store = ReplayStore(tmp_path / "r", capacity=1)
    _insert(store, "a")
    store.mark_scored("a", [1.0], {})
    store.take_ready(1, 0)
    _insert(store, "b")  # evicts a's record
    assert store.get_record("a") is None
    assert _insert(store, "a") is False  # its status survives: never stored (or trained) twice


def test_learner_batches_are_replayed_after_a_resume_and_evicted_members_dropped(tmp_path):
    from editrl.broker.store import SampleSpec

    store = ReplayStore(tmp_path / "r", capacity=3)
    for gid in "abc":
        _insert(store, gid)
        store.mark_scored(gid, [1.0], {})
    first = store.commit_turn(samples=[SampleSpec(0, 1, 0, 2, 0)]).samples[0][0]
    assert [g for g, *_ in first] == ["a", "b"]
    again = store.commit_turn(samples=[SampleSpec(0, 1, 0, 2, 0)]).samples[0][0]
    assert [g for g, *_ in again] == ["a", "b"]  # the resumed learner gets the same groups for step 1
    assert store.counters()["consumed"] == 2 and store.counters()["reserved"] == 2
    _insert(store, "d")  # over capacity: evicts the oldest non-pending record, a
    replay = store.commit_turn(samples=[SampleSpec(0, 1, 0, 2, 0)]).samples[0][0]
    assert [g for g, *_ in replay] == ["b"]
    top_up = store.commit_turn(samples=[SampleSpec(0, 1, 1, 1, 0)]).samples[0][0]
    assert [g for g, *_ in top_up] == ["c"]  # topped up with a fresh group, no duplicate of b
    assert store.batch_assignment(0, 1) == ["b", "c"]
