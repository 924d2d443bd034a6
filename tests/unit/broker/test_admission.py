"""GroupRules: what a group and a weight announcement must be to be accepted, checked without a model."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editrl.broker.admission import GroupRules, Refused, png_size
from editrl.common import wire
from editrl.common.images import to_png

PNG = to_png(Image.new("RGB", (16, 12), (10, 20, 30)))
RULES = GroupRules(max_group_size=4, family="flow", max_text_chars=100, min_image_side=8, max_image_side=64)


def _group(**changes):
    g = wire.RolloutGroup(
        request_id="r", group_id="g", lease_id="l", task_id="t", actor_id="a", policy_version=2, instruction="red",
        task_type="color", source_png=PNG, edit_pngs=[PNG, PNG], family="flow",
        traj={"latents": np.zeros((2, 3, 4), np.float32)}, log_probs=np.zeros((2, 2), np.float32), cond={},
        params={"sde": "sde"},
    )  # fmt: skip
    return dataclasses.replace(g, **changes)


def _reason(g, latest=2):
    with pytest.raises(Refused) as exc:
        RULES.check_group(g, latest)
    return exc.value.reason


def test_png_size_reads_the_header_only():
    assert png_size(PNG) == (16, 12)
    assert png_size(PNG[:40]) == (16, 12)  # truncated after the header: the size is still known, nothing decoded
    for bad in (b"", b"GIF89a" + b"\0" * 30, PNG[:20], b"\x89PNG\r\n\x1a\n" + b"\0\0\0\x0dIDAT" + b"\0" * 20):
        with pytest.raises(Refused, match="not_png"):
            png_size(bad)


def test_a_sane_group_passes():
    RULES.check_group(_group(), latest_version=2)
    RULES.check_group(_group(edit_pngs=[PNG], log_probs=np.zeros((1, 2), np.float32),
                             traj={"latents": np.zeros((1, 3), np.float32)}), latest_version=2)  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"edit_pngs": []}, "bad_group_size"),
        ({"edit_pngs": [PNG] * 5}, "bad_group_size"),
        ({"policy_version": 3}, "version_not_published"),
        ({"policy_version": 10**12}, "version_not_published"),
        ({"policy_version": -1}, "version_not_published"),
        ({"family": "ar"}, "wrong_family"),
        ({"instruction": "x" * 101}, "text_too_long"),
        ({"task_type": "x" * 101}, "text_too_long"),
        ({"params": {"note": "x" * 101}}, "text_too_long"),
        ({"edit_pngs": [PNG, b"not an image"]}, "not_png"),
        ({"source_png": b""}, "not_png"),
        ({"edit_pngs": [PNG, to_png(Image.new("RGB", (4, 16)))]}, "image_size"),
        ({"source_png": to_png(Image.new("L", (65, 16)))}, "image_size"),
        ({"log_probs": np.zeros((3, 2), np.float32)}, "bad_log_probs"),
        ({"log_probs": np.zeros(2, np.float32)}, "bad_log_probs"),
        ({"traj": {"latents": np.zeros((3, 3), np.float32)}}, "bad_traj"),
    ],
)
def test_nonsense_is_refused_with_a_reason(changes, reason):
    assert _reason(_group(**changes)) == reason


def test_unset_limits_are_not_checked():
    GroupRules().check_group(_group(family="ar", edit_pngs=[PNG] * 9, log_probs=np.zeros((9, 1), np.float32),
                                    traj={}), latest_version=2)  # fmt: skip


def test_published_weights_move_forward_one_version_inside_the_run(tmp_path):
    rules = GroupRules(weights_dir=tmp_path / "weights", stream_endpoint="tcp://127.0.0.1:0")
    ok = wire.WeightsInfo(3, str(tmp_path / "weights" / "v000003"), "abc", "lora")
    rules.check_publish(ok, latest_version=2)
    rules.check_publish(dataclasses.replace(ok, uri="stream://127.0.0.1:41234"), latest_version=2)
    bad = [
        (dataclasses.replace(ok, version=10**6), "version_not_next"),
        (dataclasses.replace(ok, version=2), "version_not_next"),
        (dataclasses.replace(ok, uri="/etc/passwd"), "weights_uri"),
        (dataclasses.replace(ok, uri=str(tmp_path / "weights" / ".." / "elsewhere")), "weights_uri"),
        (dataclasses.replace(ok, uri=""), "weights_uri"),
        (dataclasses.replace(ok, uri="stream://10.0.0.9:41234"), "weights_uri"),
        (dataclasses.replace(ok, kind="pickle"), "bad_weights_kind"),
    ]
    for info, reason in bad:
        with pytest.raises(Refused) as exc:
            rules.check_publish(info, latest_version=2)
        assert exc.value.reason == reason, info
    fixed_port = GroupRules(weights_dir=Path("/x"), stream_endpoint="tcp://127.0.0.1:5000")
    with pytest.raises(Refused, match="weights_uri"):
        fixed_port.check_publish(dataclasses.replace(ok, uri="stream://127.0.0.1:5001"), latest_version=2)
    with pytest.raises(Refused, match="weights_uri"):  # file transport topology: no stream uri at all
        GroupRules(weights_dir=tmp_path).check_publish(dataclasses.replace(ok, uri="stream://127.0.0.1:1"), 2)
