"""Sessions of the decoder service: validation of the client's messages, the per-session block loop, and the
bookkeeping that frees a session's state however it ends.

Per session three coroutines run on the event loop: a reader (client messages -> `ActionInbox`), a producer (the
block loop: action, condition, `launch_block` on the session's own worker thread) and the deliverer (frame
encoding on a shared thread pool, then writing to the client). The producer queues block b+1 on the device as soon
as its inputs are there, while block b still runs and is handed over (its frames are waited for on a second thread
of the session, so the worker that queues blocks is never held by a wait); a bounded queue between producer and
deliverer keeps at most `OUTBOX_BLOCKS` blocks in memory. A block's frames reach the host latent by latent: the
deliverer sends each latent's but the last as `block_frames` at once, then the `block` (unless the client asked
for `whole_blocks`).

Prompt switches (LongLive): each `switch_prompt` opens its own Encode call at once; the block it is due at (the
block of the next action, LOCKSTEP; the first block to start once it is encoded, REALTIME) switches to it, waiting
for its text context only then. A session that continues a video has the clip and its two prompts encoded at once
(three Encode calls), caches the clip before `info`, and sends its reconstruction (`video_frames`) before block 0.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf.timestamp_pb2 import Timestamp

from worldstream.api.spaces import BlockAction
from ..encoder.client import ClipSpec, ConditionFeed, ConditionSpec, EncoderClient
from ..engine.generator import BlockOutput, DecoderModels, GenerationSession, PendingBlock
from ..media import encode_jpeg
from ..serving.aio import WorkerLane, now_timestamp, run_together, within, write_with_timeout
from ..serving.errors import ServiceError
from ..serving.logs import log_event
from ..serving.memory import HeapTrimmer
from ..serving.metrics import ServiceMetrics
from ..serving.profiling import StreamProfiler
from ..serving.streams import StreamSlots
from worldstream.v1 import session_pb2
from worldstream.api.messages import action_space_message, parse_action
from .requests import ClientMessages, StartOptions, parse_start

log = logging.getLogger("worldstream.decoder")

OUTBOX_BLOCKS = 2  # finished blocks waiting for encoding/sending before the block loop pauses
# Prompt switches sent and not yet applied: each holds an Encode call, then a text context (4 MiB at full size).
MAX_PENDING_SWITCHES = 4
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_OUT_OF_RANGE = grpc.StatusCode.OUT_OF_RANGE


# ---- actions from the client ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptContext:
    """A prompt's text context as the encoder service made it."""
    context: torch.Tensor
    tokens_dropped: int  # by the truncation to the model's text length


@dataclass(frozen=True)
class TakenAction:
    message: session_pb2.Action  # as received (echoed in the block)
    action: BlockAction | None  # None: text-to-video, whose actions are empty
    taken_at: Timestamp
    switch: asyncio.Task[PromptContext] | None = None  # LOCKSTEP: the prompt switch sent before this action


class _Signal:
    """Why `ActionInbox.take` returned no action."""
    STOPPED = "stopped"
    IDLE = "idle"
    SHUTDOWN = "shutdown"


class ActionInbox:
    """Actions between the reader and the block loop. LOCKSTEP: a FIFO, one action per block. REALTIME: the
    latest action, reused until a newer one arrives (the idle action before the first)."""

    def __init__(self, pacing: int, idle: BlockAction | None):
        self.lockstep = pacing == session_pb2.PACING_LOCKSTEP
        self._queue: list[TakenAction] = []
        self._latest = TakenAction(session_pb2.Action(), idle, now_timestamp())
        self._stopped = False
        self._interrupted = False
        self._changed = asyncio.Condition()

    async def put(self, taken: TakenAction) -> None:
        async with self._changed:
            if self.lockstep:
                self._queue.append(taken)
            else:
                self._latest = taken
            self._changed.notify_all()

    async def stop(self) -> None:
        """The client will send no more actions."""
        async with self._changed:
            self._stopped = True
            self._changed.notify_all()

    async def interrupt(self) -> None:
        """Server shutdown: the next `take` ends the session."""
        async with self._changed:
            self._interrupted = True
            self._changed.notify_all()

    def ready(self) -> bool:
        """Whether `take` would return at once."""
        return not self.lockstep or bool(self._queue) or self._stopped or self._interrupted

    async def take(self, idle_timeout: float) -> TakenAction | str:
        if not self.lockstep:
            if self._interrupted:
                return _Signal.SHUTDOWN
            return _Signal.STOPPED if self._stopped else self._latest
        try:
            await within(self._news(), idle_timeout)
        except asyncio.TimeoutError:
            return _Signal.IDLE
        if self._interrupted:
            return _Signal.SHUTDOWN
        return self._queue.pop(0) if self._queue else _Signal.STOPPED

    async def _news(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._queue or self._stopped or self._interrupted)


# ---- sessions -----------------------------------------------------------------------------------------------------

@dataclass
class _Queued:
    """A block on the device whose frames the block loop has not waited for yet."""
    pending: PendingBlock
    taken: TakenAction
    stages: dict[str, float]  # the waits before it started
    start_time: Timestamp
    switched: session_pb2.PromptSwitched | None


@dataclass
class _Finished:
    """A generated block, all its frames on the host."""
    output: BlockOutput
    taken: TakenAction
    stage_seconds: dict[str, float]
    start_time: Timestamp
    generated_time: Timestamp


@dataclass
class _Outgoing:
    """A block on its way to the client, from when the block loop starts waiting for its frames: the frames of
    its latents that are sent early (`parts`, uint8 [t, H, W, 3] each), as they reach the host, then the block."""
    index: int
    switched: session_pb2.PromptSwitched | None  # the prompt switch that took effect at this block
    parts: asyncio.Queue[torch.Tensor | _Finished] = dataclasses.field(default_factory=asyncio.Queue)


class SessionManager:
    """All sessions of one decoder process."""

    def __init__(self, encoder: EncoderClient, metrics: ServiceMetrics, *, max_sessions: int, idle_timeout: float,
                 frame_workers: int = 2, profile_dir: Path | None = None):
        self.models: DecoderModels | None = None
        self.encoder = encoder
        self.metrics = metrics
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.profiler = StreamProfiler(profile_dir, log)
        self.frame_pool = concurrent.futures.ThreadPoolExecutor(frame_workers, thread_name_prefix="frames")
        self.trimmer = HeapTrimmer()
        self.sessions: dict[str, Session] = {}
        self.slots = StreamSlots("decoder", max_sessions, metrics, "this decoder runs {limit} sessions at most and "
                                 "all are busy; retry later or connect to another replica")

    async def terminate(self) -> None:
        """End every session after its current block and refuse new ones."""
        await self.slots.terminate()
        for session in list(self.sessions.values()):
            await session.inbox.interrupt()

    async def stream(self, context: grpc.aio.ServicerContext) -> None:
        """The body of one WorldSessionService.Session call."""
        self.slots.check_open(self.models is not None)
        received = time.perf_counter()
        messages = ClientMessages(context, self.metrics, self.trimmer)
        first = await messages.first(self.idle_timeout)
        options = await asyncio.get_running_loop().run_in_executor(None, parse_start, first, self.models)
        del first  # the serialized start would otherwise live as long as the session
        with self.slots.slot():
            session = Session(self, options, context, received)
            self.sessions[session.id] = session
            try:
                await session.run(messages)
            finally:
                try:
                    await session.release()
                finally:
                    del self.sessions[session.id]


class Session:
    def __init__(self, manager: SessionManager, options: StartOptions, context: grpc.aio.ServicerContext,
                 received: float):
        self.id = uuid.uuid4().hex
        self.manager = manager
        self.models = manager.models
        self.metrics = manager.metrics
        self.options = options
        self.context = context
        self.received = received
        self.space = self.models.action_space  # None: text-to-video, whose actions are empty
        self.inbox = ActionInbox(options.pacing, self.space.idle_action() if self.space else None)
        self.lane = WorkerLane(f"session-{self.id[:8]}")
        self.waiter = WorkerLane(f"frames-{self.id[:8]}")  # waits for the device's frames (CUDA events)
        self.spec = ConditionSpec.of(self.models)
        self.feed: ConditionFeed | None = None  # image sessions: the image's stream (prompts: `_prompt_context`)
        self.switch: asyncio.Task[PromptContext] | None = None  # REALTIME: the switch not yet applied
        self.pending: set[asyncio.Task[PromptContext]] = set()  # switches neither applied nor replaced
        self.switch_count = 0  # switches that took effect
        self.blocks_started = 0
        self.generation: GenerationSession | None = None
        self.profiler: torch.profiler.profile | None = None
        # blocks, the end, and first a continued clip's reconstruction (uint8 [T, H, W, 3])
        self.outbox: asyncio.Queue[_Outgoing | session_pb2.SessionEnd | torch.Tensor] = asyncio.Queue(OUTBOX_BLOCKS)
        self.blocks_sent = 0
        self.frames_sent = False  # whether generated frames were sent (the first: time to first frame)
        self.first_frames_here = asyncio.Event()  # block 0's first frames reached the host
        self.ending = asyncio.Event()  # `end` is on its way: the call ends with OK whatever the client sends now

    def _log(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        log_event(log, event, level, session_id=self.id, **fields)

    async def _send(self, response: session_pb2.SessionResponse) -> None:
        await write_with_timeout(self.context, response, self.metrics, self.manager.idle_timeout)

    async def run(self, messages: ClientMessages) -> None:
        options, models = self.options, self.models
        self._log("session starting", seed=options.seed, max_blocks=options.max_blocks,
                  pacing=session_pb2.Pacing.Name(options.pacing),
                  frame_encoding=session_pb2.FrameEncoding.Name(options.frame_encoding), peer=self.context.peer())
        height, width = int(models.cfg.video.height), int(models.cfg.video.width)
        reconstruction = None
        opening: dict[str, float] = {}  # how the time to `info` splits, for the log (continued videos: no split)
        if options.video:
            reconstruction, tokens_dropped = await self._continue_video()
        elif models.text_to_video:
            prompt = await self._prompt_context(options.prompt)
            tokens_dropped = prompt.tokens_dropped
            opening["context_seconds"] = time.perf_counter() - self.received
            self.generation = await self.lane.run(self._open_generation, prompt.context)
        else:
            self.feed = await self.manager.encoder.open(self.id, options.mode, options.image, height, width,
                                                        options.max_blocks, self.spec)
            opening["encoder_ready_seconds"] = time.perf_counter() - self.received
            tokens_dropped = 0
            context = await self.feed.context()
            opening["context_seconds"] = time.perf_counter() - self.received
            self.generation = await self.lane.run(self._open_generation, context)
        if opening:
            opening["generation_seconds"] = time.perf_counter() - self.received - opening["context_seconds"]
        info = session_pb2.SessionInfo(
            session_id=self.id, mode=options.mode, height=height, width=width,
            first_block_frames=models.layout.first_block_frames, block_frames=models.layout.block_frames,
            fps=int(models.cfg.video.fps), max_blocks=options.max_blocks, frame_encoding=options.frame_encoding,
            pacing=options.pacing, family=str(models.cfg.family), prompt_tokens_dropped=tokens_dropped,
            prompt_switching=models.switches_prompts, video_conditioning=models.continues_videos)
        if self.space is not None:
            info.action_space.CopyFrom(action_space_message(self.space))
        # timed as `info` is handed to the stream: the client can hold it before the write returns
        opening["info_seconds"] = time.perf_counter() - self.received
        self._log("session opened", **{name: round(seconds, 4) for name, seconds in opening.items()})
        await self._send(session_pb2.SessionResponse(info=info))
        if reconstruction is not None:
            self.outbox.put_nowait(reconstruction)
        await run_together(self._deliver(), self._produce(), self._read(messages), settled=self.ending)

    async def _continue_video(self) -> tuple[torch.Tensor, int]:
        """Encode the clip and both prompts at once, open the session under the clip's prompt and cache the clip
        in it, then generate under the start's prompt (`batch.PromptConditioning` with a clip, exactly). Returns
        the clip as the model reconstructs it and the tokens the start's prompt lost to truncation."""
        options = self.options
        tasks = [asyncio.ensure_future(self._clip_latents()),
                 asyncio.ensure_future(self._prompt_context(options.video_prompt)),
                 asyncio.ensure_future(self._prompt_context(options.prompt))]
        try:
            latents, described, prompt = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.options = dataclasses.replace(options, video=b"")  # sent: the session need not hold it
        self.generation = await self.lane.run(self._open_generation, described.context)
        try:
            reconstruction = await self.lane.run(self.generation.condition_on_video, latents, prompt.context)
        except ValueError as e:  # (parse_start leaves room for the longest clip: a config mistake)
            raise ServiceError(_INVALID, f"start.video: {e}") from None
        return reconstruction, prompt.tokens_dropped

    async def _clip_latents(self) -> torch.Tensor:
        """The conditioning latents of the start's clip, from its own Encode call."""
        feed = await self.manager.encoder.open_video(self.id, self.options.mode, self.options.video,
                                                     ClipSpec.of(self.models))
        try:
            return await feed.latents()
        finally:
            feed.close()

    def _open_generation(self, context: torch.Tensor) -> GenerationSession:
        self.profiler = self.manager.profiler.start(f"session-{self.id}")
        return self.models.open_session(context, seed=self.options.seed, max_blocks=self.options.max_blocks)

    def _launch_block(self, cond: torch.Tensor | None, action: BlockAction | None,
                      prompt: torch.Tensor | None) -> PendingBlock:
        if prompt is not None:
            self.generation.switch_prompt(prompt)
        return self.generation.launch_block(cond, action)  # host tensor: the engine copies it asynchronously

    async def _prompt_context(self, prompt: str) -> PromptContext:
        """A prompt's text context, from its own Encode call (the start's, each switch's)."""
        feed = await self.manager.encoder.open_prompt(self.id, self.options.mode, prompt, self.spec)
        try:
            return PromptContext(await feed.context(), feed.prompt_tokens_dropped)
        finally:
            feed.close()

    def _switch(self, message: session_pb2.SwitchPrompt, no_block_left: bool, after: str) -> asyncio.Task:
        """Start encoding a switch's prompt (checked by `ClientMessages`) if the session can take it."""
        models, family = self.models, f"{self.models.cfg.family} ({self.models.mode})"
        if not models.text_to_video:
            raise ServiceError(_INVALID, f"this server runs {family}, which starts from an image and takes actions: "
                                         "it has no prompt to switch (`switch_prompt` needs a text-to-video "
                                         "deployment that switches prompts, e.g. longlive/interactive)")
        if not models.switches_prompts:
            raise ServiceError(_INVALID, f"this server runs {family}, which cannot switch prompts "
                                         "(SessionInfo.prompt_switching is false): start a new session with the new "
                                         "prompt, or use a LongLive deployment (e.g. longlive/interactive)")
        if no_block_left:
            raise ServiceError(_INVALID, f"switch_prompt after the session's end ({after}): no block is left to take "
                                         "the new prompt; send the switch before the action of the block it is for")
        if len(self.pending) >= MAX_PENDING_SWITCHES:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{MAX_PENDING_SWITCHES} prompt switches are already waiting for their blocks; send "
                               "the next one once a PromptSwitched came back")
        task = asyncio.ensure_future(self._prompt_context(message.prompt))
        self.pending.add(task)
        task.add_done_callback(self._encoded)
        return task

    def _encoded(self, task: asyncio.Task) -> None:
        if task.cancelled():
            self.pending.discard(task)  # replaced
        else:
            task.exception()  # marks it retrieved: a replaced switch's failure is nobody's

    # -- the three coroutines --

    async def _read(self, messages: ClientMessages) -> None:
        """Client messages -> inbox (switches: LOCKSTEP with the next action, REALTIME to `switch`). Ends when
        the client half-closes or sends `stop`."""
        lockstep, max_blocks = self.inbox.lockstep, self.options.max_blocks
        switch: asyncio.Task | None = None  # LOCKSTEP: the switch for the next action's block
        actions = 0
        while True:
            message = await messages.next()
            kind = None if message is None else message.WhichOneof("request")
            if kind in (None, "stop"):
                if switch is not None:  # no action follows it: no block takes it
                    switch.cancel()
                await self.inbox.stop()
                if kind is None:
                    return
                break
            if kind == "switch_prompt":
                no_block_left = actions >= max_blocks if lockstep else self.blocks_started >= max_blocks
                task = self._switch(message.switch_prompt, no_block_left,
                                    f"the actions of all {max_blocks} blocks were sent" if lockstep else
                                    f"all {max_blocks} blocks have started")
                if lockstep:
                    if switch is not None:  # a later switch before the same block replaces the earlier one
                        switch.cancel()
                    switch = task
                else:  # a later switch replaces one not applied yet
                    if self.switch is not None:
                        self.switch.cancel()
                    self.switch = task
                continue
            if lockstep and actions >= max_blocks:
                raise ServiceError(_OUT_OF_RANGE, f"action #{actions + 1} is past the end: the session has "
                                                  f"max_blocks={max_blocks} blocks, one action each")
            action = self._parse_action(message.action, actions if lockstep else None, f"action #{actions + 1}")
            await self.inbox.put(TakenAction(message.action, action, now_timestamp(), switch))
            switch, actions = None, actions + 1
        late = await messages.next()
        if late is not None and late.WhichOneof("request") == "switch_prompt":
            self._switch(late.switch_prompt, True, "after `stop`")
        if late is not None:
            raise ServiceError(_OUT_OF_RANGE, "a message arrived after `stop`; the session accepts nothing more")

    def _parse_action(self, message: session_pb2.Action, block_index: int | None, where: str) -> BlockAction | None:
        if self.space is None:
            if message.ByteSize():
                raise ServiceError(_INVALID, f"{where}: this {self.models.cfg.family} session (text-to-video) takes "
                                             "no keyboard or mouse; send an empty `action` per block")
            return None
        try:
            return parse_action(message, self.space, self.models.layout, block_index, where)
        except ValueError as e:
            raise ServiceError(_INVALID, str(e)) from None

    async def _produce(self) -> None:
        """The block loop. Block b is queued on the device as soon as its inputs (action, condition) are here,
        while block b-1 may still run: b-1 goes to the deliverer meanwhile (`_finish`, a task that waits for its
        frames off the session's worker), so the device does not idle between blocks whenever b's inputs come
        before b-1 is done, and a client that sends each action once it has the frames before gets them. At most
        two blocks are on the device: b is queued only after b-2 was handed over."""
        finishing: asyncio.Future | None = None  # block b-1 on its way to the deliverer
        try:
            for b in range(self.options.max_blocks):
                waited = time.perf_counter()
                taken = await self.inbox.take(self.manager.idle_timeout)
                if isinstance(taken, str):
                    if finishing is not None:
                        await finishing
                    await self.outbox.put(self._end(taken))
                    return
                got_action = time.perf_counter()
                per_block = self.feed is not None and self.feed.spec.per_block
                switch = taken.switch if self.inbox.lockstep else self._due_switch()
                if switch is not None and finishing is not None:
                    await finishing  # (before a switch's wait or failure: a switch block starts alone)
                    finishing = None
                conditions = time.perf_counter()
                if per_block and b == 1:
                    # Taking block 1 grants the encoder the credit to prefetch blocks 1..window, on the GPU that
                    # block 0 is using: hold it until block 0's first frames are out, the latency a user sees.
                    await self.first_frames_here.wait()
                cond = await self.feed.block(b) if per_block else None
                prompt = await switch if switch is not None else None  # its Encode call may still be running
                self.pending.discard(switch)
                self.blocks_started = b + 1
                start_time, started = now_timestamp(), time.perf_counter()
                pending = await self.lane.run(self._launch_block, cond, taken.action,
                                              None if prompt is None else prompt.context)
                switched = None
                if prompt is not None:
                    self.switch_count += 1
                    self.metrics.prompt_switches.inc()
                    switched = session_pb2.PromptSwitched(block_index=b, switch_count=self.switch_count,
                                                          prompt_tokens_dropped=prompt.tokens_dropped)
                if finishing is not None:
                    await finishing
                waits = {"action_wait": got_action - waited, "condition_wait": started - conditions}
                finishing = asyncio.ensure_future(self._finish(_Queued(pending, taken, waits, start_time, switched)))
            if finishing is not None:
                await finishing
            await self.outbox.put(self._end(None))
        finally:
            if finishing is not None:
                finishing.cancel()

    async def _finish(self, queued: _Queued) -> None:
        """Hand a queued block to the deliverer (once the outbox has room), then wait for its frames on the
        session's frame waiter (not its worker, which may be queuing the next block meanwhile): each latent's but
        the last as they reach the host (none with `whole_blocks`), then the whole block."""
        pending = queued.pending
        outgoing = _Outgoing(pending.index, queued.switched)
        await self.outbox.put(outgoing)
        for part in range(0 if self.options.whole_blocks else pending.part_count - 1):
            outgoing.parts.put_nowait(await self.waiter.run(pending.wait_part, part))
            self.first_frames_here.set()
        output = await self.waiter.run(pending.result)
        self.first_frames_here.set()
        outgoing.parts.put_nowait(_Finished(output, queued.taken, {**queued.stages, **output.timings},
                                            queued.start_time, now_timestamp()))

    def _due_switch(self) -> asyncio.Task | None:
        """REALTIME: the switch not yet applied, once its prompt is encoded."""
        due = self.switch
        if due is None or not due.done():
            return None
        self.switch = None
        return due

    def _end(self, signal: str | None) -> session_pb2.SessionEnd:
        reason, detail = {
            None: (session_pb2.END_REASON_MAX_BLOCKS, f"all {self.options.max_blocks} blocks generated"),
            _Signal.STOPPED: (session_pb2.END_REASON_CLIENT_STOP, "the client stopped"),
            _Signal.IDLE: (session_pb2.END_REASON_IDLE_TIMEOUT,
                           f"no action for {self.manager.idle_timeout:g} s"),
            _Signal.SHUTDOWN: (session_pb2.END_REASON_SERVER_SHUTDOWN, "the server is shutting down"),
        }[signal]
        return session_pb2.SessionEnd(reason=reason, detail=detail)

    async def _deliver(self) -> None:
        while True:
            item = await self.outbox.get()
            if isinstance(item, torch.Tensor):
                await self._send_video_frames(item)
                continue
            if isinstance(item, session_pb2.SessionEnd):
                self.ending.set()
                item.blocks_generated = self.blocks_sent
                await self._send(session_pb2.SessionResponse(end=item))
                self._log("session ended", reason=session_pb2.EndReason.Name(item.reason), blocks=self.blocks_sent)
                return
            await self._send_block(item)

    async def _send_block(self, block: _Outgoing) -> None:
        """A block's early frames (`block_frames`) as they come, then its `block` with the rest."""
        if block.switched is not None:
            await self._send(session_pb2.SessionResponse(prompt_switched=block.switched))
        sent, encode_seconds = 0, 0.0
        while not isinstance(part := await block.parts.get(), _Finished):
            frames, seconds = await self._timed_encode(part)
            encode_seconds += seconds
            self._sending_frames()
            await self._send(session_pb2.SessionResponse(block_frames=session_pb2.BlockFrames(
                block_index=block.index, first_frame=sent, frames=frames, send_time=now_timestamp())))
            sent += len(frames)
        finished = part
        frames, seconds = await self._timed_encode(finished.output.frames[sent:])
        finished.stage_seconds["frame_encode"] = encode_seconds + seconds
        chunk = session_pb2.BlockChunk(
            block_index=block.index, frame_count=len(frames), frames=frames, action=finished.taken.message,
            stage_seconds=finished.stage_seconds, action_time=finished.taken.taken_at,
            start_time=finished.start_time, generated_time=finished.generated_time, send_time=now_timestamp(),
            first_frame=sent)
        self._sending_frames()
        await self._send(session_pb2.SessionResponse(block=chunk))
        self.blocks_sent += 1
        self.metrics.blocks_served.inc()
        for stage, seconds in finished.stage_seconds.items():
            self.metrics.block_stage_seconds.labels(stage=stage).observe(seconds)

    def _sending_frames(self) -> None:
        """Times the first frames as they are handed to the stream: the client can hold them before the write
        returns."""
        if not self.frames_sent:
            self.frames_sent = True
            seconds = time.perf_counter() - self.received
            self.metrics.time_to_first_frame_seconds.observe(seconds)
            self._log("first frames sent", seconds=round(seconds, 4))

    async def _timed_encode(self, frames: torch.Tensor) -> tuple[list[bytes], float]:
        """`frames` encoded on the shared frame pool, and the seconds the encoding took (not its wait for a
        worker: the pool serves every session, and a session's timings are its own work)."""
        return await asyncio.get_running_loop().run_in_executor(self.manager.frame_pool, self._encode_frames, frames)

    async def _send_video_frames(self, frames: torch.Tensor) -> None:
        """A continued clip's reconstruction, in messages of a block's frames at most."""
        total, per_message = frames.shape[0], self.models.layout.block_frames
        for first in range(0, total, per_message):
            encoded, _ = await self._timed_encode(frames[first:first + per_message])
            await self._send(session_pb2.SessionResponse(video_frames=session_pb2.VideoFrames(
                first_frame=first, frames=encoded, total_frames=total)))

    def _encode_frames(self, frames: torch.Tensor) -> tuple[list[bytes], float]:
        started = time.perf_counter()
        if self.options.frame_encoding == session_pb2.FRAME_ENCODING_RAW_RGB:
            encoded = [frame.numpy().tobytes() for frame in frames]
        else:
            encoded = [encode_jpeg(frame, self.options.jpeg_quality) for frame in frames]
        return encoded, time.perf_counter() - started

    async def release(self) -> None:
        """Free everything the session holds, however it ended (after the block in flight finishes)."""
        if self.feed is not None:
            self.feed.close()
        for switch in list(self.pending):  # (the applied ones are done)
            switch.cancel()
        self.waiter.close(lambda: None)
        await asyncio.shield(self.lane.close(self._free_device_state))
        self._log("session released", blocks=self.blocks_sent)

    def _free_device_state(self) -> None:
        try:
            if self.generation is not None:
                self.generation.close()
                self.generation = None
        finally:
            self.manager.profiler.finish(self.profiler, f"session-{self.id}")
            self.profiler = None
