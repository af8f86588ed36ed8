"""Request routers for the model deployment, chosen with `serve.router` / `--router`.

    pow2               Serve's default: probe two random replicas, take the shorter queue
    round_robin        Ray's RoundRobinRouter: replicas in turn (even spread)
    consistent_hash    Ray's ConsistentHashRouter on the session key (same key -> same replica);
                       the ingress sets it from `x-session-id`, else the client's IP address
    least_connections  ours, below: the replica with the fewest requests in flight from this
                       ingress (an idle replica is preferred)
"""

from __future__ import annotations

import random
import time
from collections import defaultdict

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

__all__ = ["LeastConnectionsRouter", "ROUTER_CLASSES"]

ROUTER_CLASSES = {
    "pow2": None,  # Serve's default router
    "round_robin": "ray.serve.experimental.round_robin_router:RoundRobinRouter",
    "consistent_hash": "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter",
    "least_connections": "mlsd_ray.serve.routers:LeastConnectionsRouter",
}


class LeastConnectionsRouter(FIFOMixin, RequestRouter):
    """Rank replicas by requests this router has in flight on each, fewest first.

    Counts come from the router's own lifecycle hooks (sent +1, completed -1), so they are exact
    for the traffic of this handle without probing. Between choosing a replica and sending to it
    Serve may await a queue-length probe, and other requests are routed meanwhile: the first
    choice therefore holds a tentative +1 until the send (or for at most TENTATIVE_S), so a burst
    of simultaneous requests spreads instead of all seeing the same counts. Ties are shuffled.
    Each rank is one replica: if it is full, Serve tries the next.
    """

    TENTATIVE_S = 1.0

    def initialize_state(self, **kwargs) -> None:
        self._in_flight: dict[ReplicaID, int] = defaultdict(int)
        self._tentative: dict[ReplicaID, list[float]] = defaultdict(list)

    def load(self, replica_id: ReplicaID) -> int:
        """Requests in flight on the replica plus recent choices not yet sent."""
        now = time.monotonic()
        fresh = [t for t in self._tentative.get(replica_id, ()) if now - t < self.TENTATIVE_S]
        self._tentative[replica_id] = fresh
        return self._in_flight.get(replica_id, 0) + len(fresh)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: back off, retry
        shuffled = random.sample(candidate_replicas, len(candidate_replicas))
        ordered = sorted(shuffled, key=lambda r: self.load(r.replica_id))
        self._tentative[ordered[0].replica_id].append(time.monotonic())
        return [[replica] for replica in ordered]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        # Serve calls this for every request sent (on_request_routed only fires with strict
        # max_ongoing_requests), and on_request_completed exactly once for each.
        super().on_send_request(replica_id)
        self._in_flight[replica_id] += 1
        if self._tentative.get(replica_id):
            self._tentative[replica_id].pop(0)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        count = self._in_flight.get(replica_id, 0) - 1
        if count > 0:
            self._in_flight[replica_id] = count
        else:
            self._in_flight.pop(replica_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._in_flight.pop(replica_id, None)
        self._tentative.pop(replica_id, None)
