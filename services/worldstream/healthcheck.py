"""`python -m worldstream.healthcheck HOST:PORT`: exit 0 iff the server's grpc.health.v1 check says SERVING
(container health checks, and the local launcher's wait for models to load)."""
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def serving_status(address: str, timeout: float = 3.0) -> str:
    """The overall health status name (SERVING, NOT_SERVING, ...) or the gRPC error code name."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    address = (argv or sys.argv[1:] or ["127.0.0.1:50051"])[0]
    status = serving_status(address)
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
