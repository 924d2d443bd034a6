"""The broker's task leases: which actor holds which task, until when, and whether a group may claim one.

A lease is granted (made durable by the turn's commit before it is sent), then closed — by the group it produced
("used:<group_id>"), a ``SkipTask`` ("skipped"), a refused group ("rejected:<reason>") or its re-issue after it
expired ("expired"). Closed leases stay in LMDB (:meth:`ReplayStore.get_lease`), so a late group of an honest but
slow actor is still recognised as one of ours, and a group naming a lease the broker never issued, another actor's,
another task's or one already used by a different group is refused (:meth:`LeaseBook.claim`).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

from editrl.broker.admission import Refused
from editrl.broker.store import ReplayStore
from editrl.common import wire
from editrl.common.net import new_id
from editrl.common.tasks import Task

MAX_REMEMBERED_REQUESTS = 10_000


@dataclass
class Grant:
    """A lease decided this turn, made durable by the turn's commit before it is sent."""

    identity: bytes
    request: wire.LeaseRequest
    lease_id: str
    task_index: int
    replaces: str  # the expired lease whose task this re-issues ("" for a fresh task)


@dataclass
class LeaseEntry:
    task_index: int
    actor_id: str
    deadline: float


class LeaseBook:
    def __init__(self, store: ReplayStore, tasks: list[Task], lease_timeout_s: float, log: Any, gauges: Any) -> None:
        self.store, self.tasks, self.lease_timeout_s, self.log, self.gauges = store, tasks, lease_timeout_s, log, gauges
        now = time.monotonic()
        self.open: dict[str, LeaseEntry] = {
            lid: LeaseEntry(info["task_index"], info["actor_id"], now + lease_timeout_s)
            for lid, info in store.leases().items()
        }
        self.requests: collections.OrderedDict[str, str] = collections.OrderedDict(
            (info["request_id"], lid) for lid, info in store.leases().items() if "request_id" in info
        )  # request_id → lease_id, so a resent LeaseRequest gets its lease again
        self.retry_tasks: collections.deque[tuple[str, int]] = collections.deque()  # (expired lease id, task index)
        self.cursor: int = store.get_meta("task_cursor", 0)  # advanced when leases are planned
        self.committed_cursor: int = self.cursor  # as in LMDB

    def __len__(self) -> int:
        return len(self.open)

    def resent(self, request: wire.LeaseRequest) -> tuple[str, int] | None:
        """(lease_id, task_index) if ``request`` is a resend of one already granted and still open."""
        lease_id = self.requests.get(request.request_id)
        if lease_id in self.open:
            return lease_id, self.open[lease_id].task_index
        return None

    def plan(self, requests: list[tuple[bytes, wire.LeaseRequest]]) -> list[Grant]:
        """One grant per admitted lease request: tasks of expired leases first, then the task cursor."""
        grants = []
        for identity, req in requests:
            if self.retry_tasks:
                replaces, index = self.retry_tasks.popleft()
            else:
                replaces, index = "", self.cursor % len(self.tasks)
                self.cursor += 1
            grants.append(Grant(identity, req, new_id(), index, replaces))
        return grants

    def grant(self, grant: Grant) -> None:
        self.open[grant.lease_id] = LeaseEntry(
            grant.task_index, grant.request.actor_id, time.monotonic() + self.lease_timeout_s
        )
        self.requests[grant.request.request_id] = grant.lease_id
        while len(self.requests) > MAX_REMEMBERED_REQUESTS:  # bounded LRU of answered lease requests
            self.requests.popitem(last=False)

    def rollback(self, grants: list[Grant]) -> None:
        """The turn that planned ``grants`` did not commit: the cursor and the re-issued tasks go back."""
        self.cursor = self.committed_cursor
        self.retry_tasks.extendleft((g.replaces, g.task_index) for g in reversed(grants) if g.replaces)

    def claim(self, g: wire.RolloutGroup, claimed: dict[str, str]) -> None:
        """Raise :class:`Refused` unless ``g`` names a lease this broker issued to ``g.actor_id`` for ``g.task_id``
        and no other group has used. ``claimed``: lease_id → group_id of the groups admitted earlier this turn."""
        entry = self.open.get(g.lease_id)
        if entry is not None:
            owner, index, closed = entry.actor_id, entry.task_index, None
        else:
            info = self.store.get_lease(g.lease_id)
            if info is None:
                raise Refused("unknown_lease", f"lease {g.lease_id!r} was never issued")
            owner, index, closed = info["actor_id"], info["task_index"], info.get("closed")
        if owner != g.actor_id:
            raise Refused("lease_of_another_actor", f"lease {g.lease_id} was issued to {owner}, not {g.actor_id}")
        if self.tasks[index].task_id != g.task_id:
            raise Refused("lease_of_another_task", f"lease {g.lease_id} is for task {self.tasks[index].task_id}")
        other = claimed.get(g.lease_id)
        if (closed is not None and closed != "expired") or (other is not None and other != g.group_id):
            raise Refused("lease_closed", f"lease {g.lease_id}: {closed or 'used:' + str(other)}")
        claimed[g.lease_id] = g.group_id

    def closed_by_group(self, lease_id: str) -> None:
        """The group of ``lease_id`` is stored (or refused): forget it, and do not re-issue its task if it expired."""
        self.open.pop(lease_id, None)
        if any(lid == lease_id for lid, _ in self.retry_tasks):
            self.retry_tasks = collections.deque(x for x in self.retry_tasks if x[0] != lease_id)

    def expire(self) -> None:
        now = time.monotonic()
        for lease_id, lease in list(self.open.items()):
            if lease.deadline < now:
                del self.open[lease_id]
                self.retry_tasks.append((lease_id, lease.task_index))  # closed in LMDB when re-granted
                self.gauges["leases_expired"] += 1
                self.log.warning("lease_expired", lease_id=lease_id, actor_id=lease.actor_id)

    def message(self, request: wire.LeaseRequest, lease_id: str, index: int, weights: dict[str, Any]) -> wire.Lease:
        task = self.tasks[index]
        return wire.Lease(
            request_id=request.request_id, lease_id=lease_id, task_id=task.task_id, instruction=task.instruction,
            task_type=task.task_type, input_images=list(task.input_images), weights=weights,
        )  # fmt: skip
