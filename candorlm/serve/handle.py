"""What a caller of the engine holds: a RequestHandle, through which the TokenEvents of its request
arrive, from the engine's thread to a blocking iterator or an asyncio consumer.

Does not schedule or compute anything; the engine pushes events, the caller reads them.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

_END = object()


@dataclass
class TokenEvent:
    """One generated token of one sequence of a request."""

    index: int  # which of the request's n sequences
    token_id: int
    text: str  # the text this token adds (held-back bytes and stop strings already handled)
    logprob: float | None
    top_logprobs: list[tuple[str, float]] | None
    finish_reason: str | None  # "stop" | "length" on the sequence's last event, else None


class RequestHandle:
    """The events of one request. Iterate it (blocking, from any thread) or `async for` over
    `events()` (in an asyncio loop); either ends after every sequence's last event, or at once
    after `cancel()`. An error inside the engine is raised to the reader."""

    def __init__(self, request_id: str, prompt_tokens: int, n: int, on_cancel: Callable[["RequestHandle"], None]):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.n = n
        self.completion_tokens = 0
        self.cancelled = False
        self.finished = False
        self._on_cancel = on_cancel
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # --- engine side

    def _push(self, item) -> None:
        with self._cond:
            self._queue.append(item)
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its reader is gone
                pass

    def _finish(self, error: BaseException | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        if error is not None:
            self._push(error)
        self._push(_END)

    # --- caller side

    def cancel(self) -> None:
        """Stop generating: the engine frees this request's slots before its next step."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self._on_cancel(self)

    def _take(self, item):
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._queue.popleft()
            if (ev := self._take(item)) is None:
                return
            yield ev

    async def events(self) -> AsyncIterator[TokenEvent]:
        """The events, for an asyncio consumer. Leaving the loop early (the client went away,
        the task was cancelled) cancels the request."""
        loop, wake = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._waiters.append((loop, wake))
        ended = False
        try:
            while True:
                with self._cond:
                    item = self._queue.popleft() if self._queue else None
                    if item is None:
                        wake.clear()
                if item is None:
                    await wake.wait()
                    continue
                if (ev := self._take(item)) is None:
                    ended = True
                    return
                yield ev
        finally:
            with self._cond:
                self._waiters.remove((loop, wake))
            if not ended:
                self.cancel()
