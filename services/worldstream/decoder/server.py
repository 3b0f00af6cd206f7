"""The decoder service: `worldstream.v1.WorldSessionService` over the engine's DecoderModels, fed by the encoder service."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from ..engine.generator import DecoderModels
from ..serving.aio import run_call
from ..serving.logs import log_event
from ..serving.metrics import ServiceMetrics
from worldstream.v1 import session_pb2, session_pb2_grpc
from .sessions import SessionManager

log = logging.getLogger("worldstream.decoder")

SERVICE_NAME = session_pb2.DESCRIPTOR.services_by_name["WorldSessionService"].full_name


class WorldSessionService(session_pb2_grpc.WorldSessionServiceServicer):
    def __init__(self, cfg, manager: SessionManager, metrics: ServiceMetrics, warmup_blocks: int | None = None):
        self.cfg = cfg
        self.manager = manager
        self.metrics = metrics
        self.warmup_blocks = warmup_blocks

    async def load(self) -> None:
        """Build and warm up the models off the event loop (the health service reports NOT_SERVING meanwhile)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        models = await loop.run_in_executor(None, DecoderModels.build, self.cfg)
        await loop.run_in_executor(None, models.warm_up, self.warmup_blocks, self.manager.max_sessions)
        self.manager.models = models
        log_event(log, "models loaded", mode=models.mode, device=str(models.device), max_blocks=models.max_blocks,
                  warmup_blocks=self.warmup_blocks, seconds=round(time.perf_counter() - started, 3))

    async def Session(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        # The requests are read from the context (serving.aio.Requests), not from `request_iterator`.
        await run_call(self.manager.stream(context), context, self.metrics, log, "Session")


def add_to_server(service: WorldSessionService, server: grpc.aio.Server) -> None:
    """Register the service with its requests left serialized: the session checks each one's size against the
    limit of its kind before parsing it (decoder.requests); the generated registration parses whatever comes."""
    handler = grpc.stream_stream_rpc_method_handler(
        service.Session, request_deserializer=None,
        response_serializer=session_pb2.SessionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Session": handler}),))
