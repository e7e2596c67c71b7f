"""Container health probe for ModelForge processes; exits 0 when healthy, 1 otherwise.

python healthcheck.py grpc 127.0.0.1:50051 [service]   grpc.health.v1 Check; service "" is readiness,
                                                        "liveness" only asks whether the process answers
python healthcheck.py http http://127.0.0.1:9103/metrics   an HTTP 200 (jobs workers serve no gRPC)
"""

from __future__ import annotations

import sys
import urllib.request


def grpc_probe(target: str, service: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
        except grpc.RpcError as exc:
            print(f"{target} {service!r}: {exc.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
            return False
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"{target} {service!r}: {status}", file=sys.stderr)
    return serving


def http_probe(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return False


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "grpc":
        return 0 if grpc_probe(argv[1], argv[2] if len(argv) > 2 else "") else 1
    if len(argv) == 2 and argv[0] == "http":
        return 0 if http_probe(argv[1]) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
