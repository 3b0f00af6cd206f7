"""asyncio helpers for the body of a streaming call: status mapping, time limits, writes to slow callers,
helper coroutines, a worker thread per stream so that device work never runs on the event loop, and the wall-clock
time stamps the messages carry."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from .errors import ClientGone, ServiceError
from .logs import log_event
from .metrics import ServiceMetrics

T = TypeVar("T")


async def run_call(handler: Awaitable[None], context: grpc.aio.ServicerContext, metrics: ServiceMetrics,
                   logger: logging.Logger, call: str) -> None:
    """Run one RPC body: end the call with the status of a ServiceError, INTERNAL for a bug (logged with its
    traceback, without taking down other calls); count failures by code. Cancellation (client gone) is counted
    and propagated.

    A failed call must not keep what its handler held (a 30 MB start, a session's state). So the status is set on
    the context rather than raised with `context.abort`: gRPC keeps an abort's exception in the call's state, and
    with it, through the exception chain, the failed handler's frames, in a reference cycle that only a full
    garbage collection frees (the large request counts as one object towards the collector's thresholds). For the
    same reason the failure's frames are cleared: tasks that re-raise a helper's error form such cycles too."""
    try:
        await handler
        return
    except ServiceError as e:
        code, message = e.code, e.message
        _drop_frames(e)
    except ClientGone:
        metrics.errors.labels(code=grpc.StatusCode.CANCELLED.name).inc()
        log_event(logger, "call cancelled", call=call)
        return
    except asyncio.CancelledError:
        metrics.errors.labels(code=grpc.StatusCode.CANCELLED.name).inc()
        log_event(logger, "call cancelled", call=call)
        raise
    except Exception as e:  # a bug
        logger.exception("call crashed", extra={"fields": {"call": call}})
        crash = ServiceError(grpc.StatusCode.INTERNAL, f"internal error in {call}: {type(e).__name__}: {e}")
        code, message = crash.code, crash.message  # capped like every status message
        _drop_frames(e)
    if context.cancelled():  # the error is a consequence of the caller leaving
        metrics.errors.labels(code=grpc.StatusCode.CANCELLED.name).inc()
        log_event(logger, "call cancelled", call=call, detail=message)
        return
    metrics.errors.labels(code=code.name).inc()
    log_event(logger, "call failed", logging.WARNING, call=call, code=code.name, detail=message)
    context.set_code(code)
    context.set_details(message)


def _drop_frames(error: BaseException) -> None:
    """Clear the local variables of the finished frames an exception (and the ones it was raised from) passed
    through, so that nothing they referenced outlives the failed call."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        pending += [error.__cause__, error.__context__]


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """Await with a time limit (asyncio.TimeoutError when it passes). Unlike asyncio.wait_for before Python 3.12,
    a cancellation of the caller is never swallowed when the awaited operation completes at the same moment."""
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(_discard_result)  # an abandoned task's error is not worth a warning
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        task.cancel()  # no-op when done
    if not done:
        raise asyncio.TimeoutError
    return task.result()


def _discard_result(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # marks it retrieved


async def write_with_timeout(context: grpc.aio.ServicerContext, message: Any, metrics: ServiceMetrics,
                             timeout: float) -> None:
    """Write one response; a caller that reads nothing for `timeout` seconds is dropped."""
    if context.cancelled():
        raise ClientGone
    try:
        await within(context.write(message), timeout)
    except asyncio.TimeoutError:
        raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"the caller read no response for {timeout:g} s; dropping the stream") from None
    except Exception as e:  # grpc raises internal error types when the call died under the write
        if context.cancelled() or context.done():
            raise ClientGone from None
        raise ServiceError(grpc.StatusCode.INTERNAL, f"writing a response failed: {e}") from None
    metrics.bytes_sent.inc(message.ByteSize())


async def run_together(main: Awaitable[T], *helpers: Awaitable[None], settled: asyncio.Event | None = None) -> T:
    """Run `main` alongside helper coroutines (readers, producers). The first helper to fail cancels `main` and
    its error is raised, unless `main` has set `settled`: its outcome is then decided (the stream's last message
    is on its way, and a failure now would follow it), so a helper's failure only stops that helper. A helper that
    returns normally just stops. Everything left is cancelled when `main` ends or when the caller is cancelled."""
    main_task = asyncio.ensure_future(main)
    helper_tasks = [asyncio.ensure_future(h) for h in helpers]
    pending: set[asyncio.Future] = {main_task, *helper_tasks}
    try:
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if main_task in done:
                return main_task.result()
            for task in done:
                if task.exception() is not None and not (settled is not None and settled.is_set()):
                    raise task.exception()
    finally:
        for task in (main_task, *helper_tasks):
            task.cancel()
        await asyncio.gather(main_task, *helper_tasks, return_exceptions=True)


class Requests:
    """The request messages of a streaming call, read with `context.read()`: use this, not the request iterator
    gRPC hands to the handler. That iterator is an async generator in a reference cycle with its owner, suspended
    at `yield` on the last message it gave out, so each call's last request (a 30 MB upload) stays in memory until
    a full garbage collection finds the cycle; this object holds no message."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context

    def __aiter__(self) -> "Requests":
        return self

    async def __anext__(self) -> Any:
        message = await self._context.read()
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return message


async def first_request(requests: Requests, timeout: float, what: str) -> Any:
    """The first message of a request stream; INVALID_ARGUMENT if the stream ends first, DEADLINE_EXCEEDED if
    nothing comes within `timeout` seconds."""
    try:
        return await within(anext(requests), timeout)
    except StopAsyncIteration:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"the stream closed before its first message ({what})"
                           ) from None
    except asyncio.TimeoutError:
        raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"no first message ({what}) within {timeout:g} s") from None


class WorkerLane:
    """A dedicated thread for the sequential work of one stream (device work, profiling), so that it never runs
    on the event loop."""

    def __init__(self, name: str):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def close(self, finalizer: Callable[[], None]) -> asyncio.Future:
        """Queue `finalizer` after the work already queued and let the thread end. Synchronous, so that a second
        cancellation of the caller cannot skip it; the returned future completes once `finalizer` has run."""
        done = self._executor.submit(finalizer)
        self._executor.shutdown(wait=False)
        return asyncio.wrap_future(done)


def now_timestamp() -> Timestamp:
    """The wall-clock time now, as the messages report it."""
    stamp = Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp
