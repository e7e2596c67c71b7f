"""The channels a service opens to another: the inference service's to the registry, the jobs service's and its
workers' to the registry and the inference service. One set of options for all of them."""

from __future__ import annotations

import grpc
import grpc.aio

from modelforge_server.app import LARGE_FRAMES

__all__ = ["service_channel"]


def service_channel(
    address: str, *, max_message_bytes: int, keepalive_seconds: float = 10.0, own_connection: bool = False
) -> grpc.aio.Channel:
    """A channel to the service at `address`; with `own_connection`, on a TCP connection of its own (gRPC shares
    one among the channels to an address with the same options), for callers that spread their calls over several
    connections to replicas sharing a port.

    - Keepalive: a call or a stream on a service that went silent (its host gone, a network cut) fails within
      seconds: a ping after `keepalive_seconds` of quiet, given up on half as long after (the services take pings
      that often, see ``app.keepalive``). gRPC's own wait for the answer is its ping timeout (a minute), and a
      client stops pinging a quiet stream after two pings unless told otherwise, so both are set.
    - Reconnection within two seconds of a restarted service, not gRPC's backoff of up to two minutes.
    - Messages of up to `max_message_bytes` both ways, in HTTP/2's largest frames.
    """
    answer = round(keepalive_seconds / 2 * 1000)
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.keepalive_time_ms", round(keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", answer),
            ("grpc.http2.ping_timeout_ms", answer),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            LARGE_FRAMES,
            *([("grpc.use_local_subchannel_pool", 1)] if own_connection else []),
        ],
    )
