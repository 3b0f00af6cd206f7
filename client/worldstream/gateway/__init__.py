"""Web gateway: plays live world-model sessions in a browser.

Browsers cannot open a gRPC bidirectional stream, so this asyncio process (aiohttp) stands between a browser tab
and the decoder's `WorldSessionService.Session`: it serves the page, holds one session per tab, turns the tab's
input events (WebSocket) into the mode's action (image deployments) or its prompt and prompt switches into the
start and `switch_prompt` (text-to-video deployments), and plays the frames back at the session's fps as JPEG over
the WebSocket or as a WebRTC video track (aiortc). It is a client of the decoder, not an engine: no
torch. `pip install 'worldstream-client[web]'`, then `worldstream-gateway --decoder HOST:PORT`.
"""
