"""How many judge calls are in flight, and how long one may take: the calls in flight adapt to what
the server sustains (additive increase, multiplicative decrease, as TCP's congestion window), and a
call's timeout is sized from its token budget and the throughput observed.

Why not a fixed semaphore and a fixed timeout: a self-hosted server that generates 15 tokens/s in
all (vLLM on two CPU cores) answers 8 calls of 130 tokens in about 70 s; a 60 s timeout then aborts
every one of them, and the client sends each again from the start at the same load, up to its retry
limit (issue 25: 122 retries, 24 of 118 calls failed). Here a timeout is first a congestion signal
(the window halves, so no new call starts until the load has dropped) and the late call keeps its
place (its work is not thrown away) while the load can still drop; it is cut and sent again only
when it is alone or still late after its extensions, and then with a longer timeout.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Flow:
    """The congestion window over the calls to one server (``max_window`` = judge.concurrency).

    ``acquire``/``release`` bound the calls in flight by the window (first come, first served;
    a call sent again goes first). ``success`` grows the window by one per window of answers;
    ``congestion`` halves it, once per round of calls (a signal from a call that started before the
    last cut is part of that cut's load, not a new one)."""

    def __init__(self, max_window: int, timeout_s: float, max_tokens: int):
        self.max = max(1, int(max_window))
        self.window = float(self.max)
        self.in_flight = 0
        self.epoch = 0
        self.timeout_s = timeout_s
        self.max_tokens = max(1, max_tokens)
        # seconds per completion token per call in flight (1 / the server's tokens/s in all), an EWMA
        self.s_per_token: float | None = None
        self._waiters: deque[asyncio.Future] = deque()
        self.stats = {
            "requests": 0,
            "retried_calls": 0,
            "resent_after_timeout": 0,
            "timeouts": 0,
            "overloaded": 0,
            "window_cuts": 0,
            "min_window": self.max,
            "max_window": self.max,
        }

    # ---------------------------------------------------------------- slots

    async def acquire(self, first: bool = False) -> None:
        if self.in_flight < int(self.window) and not self._waiters:
            self.in_flight += 1
            return
        fut = asyncio.get_running_loop().create_future()
        (self._waiters.appendleft if first else self._waiters.append)(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was granted as the waiter was cancelled: hand it on
            elif fut in self._waiters:  # (a wake-up may have dropped it already)
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < int(self.window):
            fut = self._waiters.popleft()
            if not fut.done():
                self.in_flight += 1
                fut.set_result(None)

    # ---------------------------------------------------------------- signals

    def success(self, elapsed_s: float, completion_tokens: int, load: int) -> None:
        """An answer: the window grows by 1/window (one slot per window of answers), and the
        throughput estimate learns from it (``load``: the calls in flight when it was sent)."""
        if self.window < self.max:
            self.window = min(float(self.max), self.window + 1.0 / self.window)
            self.stats["max_window"] = max(self.stats["max_window"], int(self.window))
            self._wake()
        # at least a few tokens: a one-token answer says more about latency than about throughput
        sample = elapsed_s / (max(8, completion_tokens) * max(1, load))
        self.s_per_token = sample if self.s_per_token is None else 0.8 * self.s_per_token + 0.2 * sample

    def congestion(self, epoch: int, why: str) -> None:
        """A timeout or a 429/503 of a call sent in ``epoch``: halve the window once per round."""
        self.stats["timeouts" if why == "timeout" else "overloaded"] += 1
        if epoch != self.epoch:
            return
        self.epoch += 1
        self.window = max(1.0, self.window / 2.0)
        self.stats["window_cuts"] += 1
        self.stats["min_window"] = min(self.stats["min_window"], int(self.window))

    def timeout_for(self, budget_tokens: int | None = None) -> float:
        """A call's timeout: twice the time its whole token budget takes at the present load at the
        throughput observed, never under judge.timeout_s (all there is before the first answer)."""
        if self.s_per_token is None:
            return self.timeout_s
        budget = budget_tokens or self.max_tokens
        return max(self.timeout_s, 2.0 * budget * max(1, self.in_flight) * self.s_per_token)

    def can_drop(self) -> bool:
        """Whether the load on the server can still fall without cutting a call: others are in flight."""
        return self.in_flight > 1

    def summary(self) -> dict:
        return {
            **self.stats,
            "final_window": int(self.window),
            "tokens_per_s": round(1.0 / self.s_per_token, 2) if self.s_per_token else None,
        }
