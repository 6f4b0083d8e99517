"""The Port op ``resize``: the reply carries the record, a ``resized`` notice (no id) comes first,
hello/stats carry the slot count, and refs of moved sessions keep working."""

from __future__ import annotations

import pytest
from pb_portclient import running

from poolbridge._hashing import slot_for

pytestmark = pytest.mark.timeout(120)


def test_resize_op_moves_sessions_and_notifies() -> None:
    with running(workers=2) as s:
        assert s.hello["slots"] == 2
        moving = next(f"p-{i}" for i in range(1000) if slot_for(f"p-{i}", 2) != slot_for(f"p-{i}", 3))
        ref = s.ok("call", session=moving, fn="builtins.list", args=[[1, 2, 3]], ret="ref")
        req_id = s.send("resize", workers=3)
        notice = s.recv()
        assert notice == {"notice": "resized", "slots": 3, "old_slots": 2, "worker_pids": notice["worker_pids"]}
        assert "id" not in notice and len(notice["worker_pids"]) == 3
        reply = s.recv()
        assert reply["id"] == req_id and reply["status"] == "ok", reply
        value = reply["value"]
        assert value["workers"] == 3 and moving in value["moved"] and value["lost"] == {}
        assert s.ok("method", target=ref, name="__len__") == 3
        assert s.ok("stats")["workers"] == 3
        assert s.ok("slot_for", session=moving) == slot_for(moving, 3)


def test_resize_op_refuse_and_bad_requests() -> None:
    with running(workers=2) as s:
        moving = next(f"q-{i}" for i in range(1000) if slot_for(f"q-{i}", 2) != slot_for(f"q-{i}", 3))
        s.ok("stream_open", session=moving, fn="builtins.iter", args=[[1, 2, 3, 4]], batch=1)
        value = s.ok("resize", workers=3, on_unmovable="refuse")
        assert value["refused"] and value["workers"] == 2 and moving in value["lost"]
        assert s.ok("stats")["workers"] == 2
        assert s.error("resize", workers=0)["code"] == "bad_request"
        assert s.error("resize", workers=2, on_unmovable="maybe")["code"] == "bad_request"


def test_requests_during_a_resize_keep_their_order_and_values() -> None:
    with running(workers=2) as s:
        sessions = [f"r-{i}" for i in range(400)]
        refs = {}
        for sess in sessions:
            refs[sess] = s.ok("call", session=sess, fn="builtins.list", args=[[]], ret="ref")
        resize_id = s.send("resize", workers=3)
        sent = {}
        for k in range(3):
            for sess in sessions[:100]:
                sent[s.send("method", target=refs[sess], name="append", args=[k])] = sess
        replies = {}
        while len(replies) < len(sent) + 1:
            reply = s.recv()
            if "id" in reply:
                replies[reply["id"]] = reply
        assert replies[resize_id]["status"] == "ok" and replies[resize_id]["value"]["workers"] == 3
        bad = [replies[i] for i in sent if replies[i]["status"] != "ok"]
        assert not bad, bad[:2]
        for sess in sessions[:100]:
            assert s.ok("method", target=refs[sess], name="copy") == [0, 1, 2]
