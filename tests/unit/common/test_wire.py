"""The wire decoder accepts exactly what the encoder produces and rejects everything else with a reason."""

import msgpack
import numpy as np
import pytest

from editrl.common import codec, wire


def _group(**over):
    fields = dict(
        request_id="r1", group_id="g1", lease_id="l1", task_id="t1", actor_id="actor-0", policy_version=3,
        instruction="make it red", task_type="color_alter", source_png=b"\x89PNGsrc", edit_pngs=[b"e0", b"e1"],
        family="flow", traj={"latents": np.arange(2 * 5 * 4 * 3, dtype=np.float32).reshape(2, 5, 4, 3)},
        log_probs=np.zeros((2, 4), np.float32),
        cond={"prompt_embeds": np.ones((7, 8), np.float32), "sigmas": np.linspace(1, 0, 5, dtype=np.float32)},
        params={"noise_level": 0.7, "guidance": 2.5, "sde_type": "sde", "start": 0, "height": 64, "width": 64},
    )  # fmt: skip
    fields.update(over)
    return wire.RolloutGroup(**fields)


def _frames(msg):
    return [bytes(f) for f in codec.encode(msg)]


def test_round_trip_preserves_every_field():
    msg = _group()
    out = codec.decode(_frames(msg))
    assert out.group_id == "g1" and out.policy_version == 3 and out.edit_pngs == [b"e0", b"e1"]
    np.testing.assert_array_equal(out.traj["latents"], msg.traj["latents"])
    assert out.traj["latents"].dtype == np.float32 and out.cond["prompt_embeds"].shape == (7, 8)
    assert out.family == "flow" and out.params == msg.params


def test_record_round_trip():
    frames = codec.encode(_group())
    out = codec.decode(codec.decode_record(codec.encode_record(frames)))
    assert out.cond["sigmas"][0] == 1.0


def _meta(frames):
    return msgpack.unpackb(frames[0], raw=False)


def _with_meta(frames, meta):
    return [msgpack.packb(meta, use_bin_type=True), *frames[1:]]


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda f: f[:-1], "bad_frame_ref"),  # truncated: a referenced frame is missing
        (lambda f: [f[0][:-3], *f[1:]], "bad_msgpack"),  # truncated metadata
        (lambda f: [b"\xc1garbage", *f[1:]], "bad_msgpack"),
        (lambda f: [*f, b"extra"], "frame_count"),
        (lambda f: [], "empty"),
    ],
)
def test_rejects_truncated_and_garbage(mutate, reason):
    with pytest.raises(wire.WireError) as exc:
        codec.decode(mutate(_frames(_group())))
    assert exc.value.reason == reason


def test_rejects_unknown_and_missing_fields_and_wrong_types():
    frames = _frames(_group())
    meta = _meta(frames)
    meta["fields"]["surprise"] = 1
    with pytest.raises(wire.WireError, match="unknown_field"):
        codec.decode(_with_meta(frames, meta))
    meta = _meta(frames)
    del meta["fields"]["family"]
    with pytest.raises(wire.WireError, match="missing_field"):
        codec.decode(_with_meta(frames, meta))
    meta = _meta(frames)
    meta["fields"]["family"] = 64
    with pytest.raises(wire.WireError, match="wrong_type"):
        codec.decode(_with_meta(frames, meta))
    meta = _meta(frames)
    meta["fields"]["params"]["noise_level"] = float("nan")
    with pytest.raises(wire.WireError, match="non_finite"):
        codec.decode(_with_meta(frames, meta))


def test_rejects_shape_mismatch_bad_dtype_and_version():
    frames = _frames(_group())
    meta = _meta(frames)
    meta["fields"]["traj"]["latents"]["shape"] = [2, 5, 4, 4]
    with pytest.raises(wire.WireError, match="shape_mismatch"):
        codec.decode(_with_meta(frames, meta))
    meta = _meta(frames)
    meta["fields"]["traj"]["latents"]["dtype"] = "object"
    with pytest.raises(wire.WireError, match="bad_dtype"):
        codec.decode(_with_meta(frames, meta))
    meta = _meta(frames)
    meta["proto"] = wire.PROTOCOL_VERSION + 1
    with pytest.raises(wire.WireError, match="bad_protocol_version"):
        codec.decode(_with_meta(frames, meta))


def test_rejects_non_finite_arrays_and_ext_types():
    bad = _group(log_probs=np.array([[np.inf, 0, 0, 0], [0, 0, 0, 0]], np.float32))
    with pytest.raises(wire.WireError, match="non_finite"):
        codec.decode(_frames(bad))
    ext = msgpack.packb({"proto": 1, "type": "Heartbeat", "fields": {"worker_id": msgpack.ExtType(1, b"x")}})
    with pytest.raises(wire.WireError, match="ext_type"):
        codec.decode([ext])


def test_rejects_oversized_frames():
    frames = _frames(wire.Heartbeat("w"))
    with pytest.raises(wire.WireError, match="meta_too_large"):
        codec.decode([b"\x00" * (wire.MAX_META_BYTES + 1)])
    big = memoryview(bytearray(wire.MAX_FRAME_BYTES + 1))
    with pytest.raises(wire.WireError, match="frame_too_large"):
        codec.decode([frames[0], big])


def test_unknown_type_rejected():
    meta = msgpack.packb({"proto": wire.PROTOCOL_VERSION, "type": "Pickle", "fields": {}})
    with pytest.raises(wire.WireError, match="unknown_type"):
        codec.decode([meta])


def test_batch_gold_is_left_out_when_unused_and_checked_when_sent():
    """A field with a default (Batch.gold) is absent from the metadata when it holds the default, so an older peer
    gets the same bytes; an absent one decodes to the default; a sent one must match the rewards edit for edit."""
    plain = wire.Batch("r1", [b"g0", b"g1"], [[1.0, 2.0], [3.0, 4.0]], 0)
    frames = _frames(plain)
    assert "gold" not in _meta(frames)["fields"] and codec.decode(frames).gold == []
    gold = [[7.5, None], [None, None]]
    sent = codec.decode(_frames(wire.Batch("r1", [b"g0", b"g1"], [[1.0, 2.0], [3.0, 4.0]], 0, gold)))
    assert sent.gold == gold and sent.rewards == [[1.0, 2.0], [3.0, 4.0]]
    meta = _meta(_frames(wire.Batch("r1", [b"g0", b"g1"], [[1.0, 2.0], [3.0, 4.0]], 0, gold)))
    meta["fields"]["gold"] = [[7.5, None]]
    with pytest.raises(wire.WireError, match="bad_batch"):
        codec.decode(_with_meta(frames, meta))
    meta["fields"]["gold"] = [[float("nan"), None], [None, None]]
    with pytest.raises(wire.WireError, match="non_finite"):
        codec.decode(_with_meta(frames, meta))
    meta["fields"]["gold"] = [["high", None], [None, None]]
    with pytest.raises(wire.WireError, match="wrong_type"):
        codec.decode(_with_meta(frames, meta))
    meta = _meta(frames)
    del meta["fields"]["rewards"]  # the fields without a default stay required
    with pytest.raises(wire.WireError, match="missing_field"):
        codec.decode(_with_meta(frames, meta))


def test_gold_scores_reads_the_reserved_sub_score_and_nothing_else():
    subs = [{"gold": 6.0, "SC": 1.0}, {"SC": 2.0}, {"gold": True}, {"gold": float("inf")}]
    assert wire.gold_scores(subs, 4) == [6.0, None, None, None]
    assert wire.gold_scores(None, 2) == [None, None] and wire.gold_scores([{"gold": 1.0}], 2) == [None, None]
