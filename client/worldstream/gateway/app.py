"""The gateway's aiohttp application: the page and its static files, the tabs' WebSocket, session recordings,
`/health` and `/metrics`."""
from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worldstream.client.session import MAX_RECEIVE_BYTES
from worldstream.client.tls import ChannelTLS, open_channel
from worldstream.v1 import session_pb2, session_pb2_grpc
from .metrics import GatewayMetrics
from .recording import Recording
from .requests import MAX_START_VIDEO_BYTES
from .tab import Tab, deployment

log = logging.getLogger("worldstream.gateway")
STATIC = Path(__file__).resolve().parent / "static"
DEMOS = STATIC / "demos"
TRANSPORTS = ("jpeg", "webrtc")


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 8  # sessions (tabs playing) at once, whatever the decoder allows
    max_image_bytes: int = 8 << 20  # an uploaded conditioning image
    # A clip to continue. It is held three times while a start is parsed (base64, bytes, the request), then
    # dropped once sent; a few seconds of video are far smaller.
    max_video_bytes: int = 16 << 20
    input_rate: float = 60.0  # input messages per second per tab (the page sends at most ~25)
    input_burst: int = 30

    def __post_init__(self):
        if (self.max_sessions < 1 or self.max_image_bytes < 1 or self.max_video_bytes < 1 or self.input_rate <= 0
                or self.input_burst < 1):
            raise ValueError(f"limits must be positive, got {self}")
        if self.max_video_bytes > MAX_START_VIDEO_BYTES:
            raise ValueError(f"the clip limit must be at most {MAX_START_VIDEO_BYTES} bytes (the decoder refuses a "
                             f"start message over 32 MiB), got {self.max_video_bytes}")

    @property
    def max_message_bytes(self) -> int:
        """Largest WebSocket message: a start with the largest image or clip, base64-encoded, and two prompts."""
        return 4 * (-(-max(self.max_image_bytes, self.max_video_bytes) // 3)) + (256 << 10)


def webrtc_available() -> bool:
    try:
        import aiortc  # noqa: F401
    except ImportError:
        return False
    return True


class Gateway:
    """State shared by the tabs: the decoder channel (over TLS when `tls` is given), limits, metrics and finished
    recordings."""

    def __init__(self, decoder: str, limits: Limits = Limits(), default_transport: str = "jpeg",
                 jpeg_quality: int = 85, recordings_dir: Path | None = None, tls: ChannelTLS | None = None):
        self.decoder = decoder
        self.tls = tls
        if tls is not None:
            tls.credentials()  # files that cannot be read stop the gateway now, not once it serves
        self.limits = limits
        self.transports = [t for t in TRANSPORTS if t != "webrtc" or webrtc_available()]
        if default_transport not in self.transports:
            raise ValueError(f"transport {default_transport!r} is not available; choose one of {self.transports} "
                             "(webrtc needs aiortc: pip install 'worldstream-client[web]')")
        self.default_transport = default_transport
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg quality must be in [1, 100], got {jpeg_quality}")
        self.jpeg_quality = jpeg_quality
        self._recordings_tmp = None if recordings_dir else tempfile.TemporaryDirectory(prefix="worldstream-gateway-")
        self.recordings_dir = Path(recordings_dir or self._recordings_tmp.name)
        self.recordings_dir.mkdir(parents=True, exist_ok=True)
        self.recordings: dict[str, Recording] = {}
        self.demos = {path.stem: path for path in sorted(DEMOS.glob("*.png"))}
        self.metrics = GatewayMetrics()
        self.sessions_active = 0
        self.channel: grpc.aio.Channel | None = None
        self.stub: session_pb2_grpc.WorldSessionServiceStub | None = None
        # The decoder deployment's family as its latest session showed it (`tab.deployment`); None before one.
        # The page picks its start form (image or prompt) by it; a decoder redeployed under another family answers
        # the other start with INVALID_ARGUMENT and its first session corrects it.
        self.deployment: dict | None = None

    def saw_deployment(self, info: session_pb2.SessionInfo) -> None:
        self.deployment = deployment(info)

    def hold_session(self) -> None:
        self.sessions_active += 1
        self.metrics.sessions_active.set(self.sessions_active)

    def release_session(self) -> None:
        self.sessions_active -= 1
        self.metrics.sessions_active.set(self.sessions_active)

    async def open(self, app: web.Application) -> None:
        # Every tab's session shares this channel: round_robin spreads them over all the addresses the decoder
        # name resolves to (e.g. dns:/// over a headless Service); the default policy would pin them to one.
        self.channel = open_channel(self.decoder, self.tls, [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                                                             ("grpc.lb_policy_name", "round_robin")])
        self.stub = session_pb2_grpc.WorldSessionServiceStub(self.channel)

    async def close(self, app: web.Application) -> None:
        for ws in list(app["websockets"]):
            await ws.close(code=1001, message=b"the gateway is shutting down")
        await self.channel.close()
        if self._recordings_tmp is not None:
            self._recordings_tmp.cleanup()

    async def decoder_status(self) -> str:
        """The readiness of the decoder's session service (SERVING while its models are loaded and its encoder
        answers), or UNREACHABLE."""
        try:
            request = health_pb2.HealthCheckRequest(service=session_pb2.DESCRIPTOR.services_by_name[
                "WorldSessionService"].full_name)
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(request,
                                                                          timeout=2.0)
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    # ---- routes -------------------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def config(self, request: web.Request) -> web.Response:
        """What the page needs before a session: demo images, transports, limits, and the deployment if a session
        showed it already."""
        return web.json_response({
            "demos": [{"name": name, "url": f"/static/demos/{path.name}"} for name, path in self.demos.items()],
            "deployment": self.deployment,
            "transports": self.transports, "default_transport": self.default_transport,
            "limits": {"max_image_bytes": self.limits.max_image_bytes,
                       "max_video_bytes": self.limits.max_video_bytes, "input_rate": self.limits.input_rate,
                       "max_sessions": self.limits.max_sessions}})

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=self.limits.max_message_bytes, heartbeat=15.0)
        await ws.prepare(request)
        request.app["websockets"].add(ws)
        try:
            await Tab(self, ws).serve()
        finally:
            request.app["websockets"].discard(ws)
        return ws

    async def recording(self, request: web.Request) -> web.FileResponse:
        recording = self.recordings.get(request.match_info["token"])
        if recording is None or not recording.finished:
            raise web.HTTPNotFound(text="no such recording: it is made when a recorded session ends and is kept "
                                        "while its tab is open")
        return web.FileResponse(recording.path, headers={
            "Content-Disposition": 'attachment; filename="worldstream-session.mp4"'})

    async def health(self, request: web.Request) -> web.Response:
        decoder = await self.decoder_status()
        ok = decoder == "SERVING"
        return web.json_response({"status": "ok" if ok else "unavailable", "decoder": self.decoder,
                                  "decoder_status": decoder, "sessions_active": self.sessions_active},
                                 status=200 if ok else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app["websockets"] = set()
    app.on_startup.append(gateway.open)
    app.on_shutdown.append(gateway.close)
    app.router.add_get("/", gateway.index)
    app.router.add_get("/api/config", gateway.config)
    app.router.add_get("/ws", gateway.websocket)
    app.router.add_get(r"/recordings/{token:[A-Za-z0-9_-]+}.mp4", gateway.recording)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/metrics", gateway.metrics_page)
    app.router.add_static("/static", STATIC)
    return app


async def serve(gateway: Gateway, host: str, port: int) -> None:
    """Runs until cancelled."""
    runner = web.AppRunner(create_app(gateway))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    print(f"worldstream gateway: open http://{shown}:{port}/ (decoder {gateway.decoder})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
