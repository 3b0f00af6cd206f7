"""grpc.health.v1: the servers' side (status per service name, server reflection, readiness that follows a
dependency) and the check a client makes (`worldstream health`, the launcher's wait for start-up).

The overall status ("") is liveness: SERVING once the models are loaded, until shutdown. A service's own name
is readiness: SERVING only while it can also serve calls, which for the decoder means reaching its encoder. So an
encoder outage takes decoders out of load balancing without getting them restarted."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from .logs import log_event
from .security import ChannelTLS, open_channel

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def add_health_and_reflection(server: grpc.aio.Server, service_names: Sequence[str]
                                    ) -> health_aio.HealthServicer:
    """Register grpc.health.v1 (NOT_SERVING until `set_serving`) and server reflection of exactly these
    services."""
    health = health_aio.HealthServicer()
    await set_serving(health, service_names, False)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflected = (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(reflected, server, pool=descriptor_pool_of(reflected))
    return health


def descriptor_pool_of(service_names: Sequence[str]) -> descriptor_pool.DescriptorPool:
    """A descriptor pool holding the files of `service_names` and their imports, and nothing else. Reflection
    over the process's default pool would describe every API the process has imported: the decoder's would
    expose the internal encoder API, which the decoder imports to call it."""
    default, pool, added = descriptor_pool.Default(), descriptor_pool.DescriptorPool(), set()

    def add(file) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for name in service_names:
        add(default.FindServiceByName(name).file)
    return pool


async def set_serving(health: health_aio.HealthServicer, service_names: Sequence[str], serving: bool,
                      overall: bool = True) -> None:
    """Set the status of every service name, and with `overall` the overall status ("") too."""
    for name in ("", *service_names) if overall else service_names:
        await health.set(name, SERVING if serving else NOT_SERVING)


async def follow_dependency(health: health_aio.HealthServicer, service_names: Sequence[str],
                            ready: Callable[[], Awaitable[bool]], interval: float, dependency: str,
                            logger: logging.Logger) -> None:
    """Report the service names SERVING only while `ready()` says the dependency is: checked now and every
    `interval` seconds until cancelled. Changes are logged; the overall status is left alone."""
    serving: bool | None = None
    while True:
        try:
            now = await ready()
        except Exception:  # a bug in the check must not freeze the reported status
            logger.exception("readiness check crashed", extra={"fields": {"dependency": dependency}})
            now = False
        if now != serving:
            await set_serving(health, service_names, now, overall=False)
            log_event(logger, "serving" if now else f"not serving: {dependency} is not ready",
                      logging.INFO if now else logging.WARNING, dependency=dependency)
            serving = now
        await asyncio.sleep(interval)


def serving_status(address: str, timeout: float = 3.0, tls: ChannelTLS | None = None, service: str = "") -> str:
    """The health status name (SERVING, NOT_SERVING, ...) of `service` at `address` ("" = the overall status,
    i.e. liveness) or the gRPC error code name when it does not answer. `tls`: how to reach a TLS server."""
    with open_channel(address, tls, aio=False) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
