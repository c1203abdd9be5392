"""An LSTM demand predictor, trained online: the `scheduler.predict.Predictor` contract (observe the calls of
each interval, predict the probability of at least one call in the next), with torch on the CPU.

The model (`DemandNet`): per key, its calls over the last `window` intervals (default 24), each normalised as
log1p(count) / `count_scale` (4: 53 calls in an interval give 1), each step concatenated with a learned key
embedding (`embedding_dim` 8); an LSTM (Hochreiter & Schmidhuber, "Long Short-Term Memory", Neural
Computation 1997) of `layers` (2) x `hidden` (64); a linear head on the last step's output; sigmoid = the
probability. Keys get embedding slots 1..`embedding_buckets` (4096) in order of first sight; slot 0 is shared
by the keys beyond capacity and by keys never seen.

Which keys the network answers: only those with a call in the last `window` intervals ("active"). Every
other key, never-seen ones included, gets a cheap prior: the share of idle known keys (no call in the last
`window` intervals) that were called in the next interval, counted since the start. Training samples come
from the same population, so the network never spends capacity on all-zero windows.

Training, online: at each `observe`, the windows that ended with the previous interval are labelled by the
interval just observed (called or not) and go into a bounded replay buffer (`buffer_size` samples, oldest
overwritten). Most active keys are not called in a given interval, so the buffer is kept balanced-ish: all
positives (at most `max_positives` per interval), negatives sampled to at most `negatives_per_positive` (4)
times the positives kept (at least that many when there are none); each kept sample carries the inverse of
its sampling rate as a weight in the loss (binary cross-entropy, weighted mean), so the probabilities stay
calibrated to the real share of calls. Optimiser: Adam (Kingma & Ba, ICLR 2015), `learning_rate` 3e-3,
minibatches of `batch_size` (64) drawn uniformly from the buffer with a seeded torch generator. Every
`train_every` intervals (20), `steps` (4) optimiser steps:
- `train="inline"`: inside `observe`, deterministic for a `seed` (weights initialised and minibatches drawn
  from generators seeded by it, negatives sampled by a seeded numpy generator): the simulator and the tests;
- `train="background"`: a daemon thread runs the same rounds on its own copy of the model, woken by
  `observe`, and publishes a copy of the weights under a lock after each round; `predict` uses the last
  published weights and never waits for training. `close()` stops and joins the thread.

Until `warmup` intervals (60) have been observed and one training round has been published, `predict`
answers with the `fallback` predictor (an `Ewma` unless given), which observes every interval.

Cost, measured on this project's 2-core CPU while shared (load ~2x its cores), 1 torch thread: one forward
for 10,000 active keys at the defaults (window 24, 2 x 64) 0.84 s (0.71 s for the same LSTM on the machine
less loaded; 0.34 s there with 2 threads); a training step on 64 samples 12-18 ms, so the default schedule
(4 steps every 20 intervals) costs 2.5-4 ms per interval. With 2 threads on the loaded machine a training
step took 90-530 ms and the forward 1.1-1.6 s (OpenMP's threads wait on each other), hence `threads` = 1 by
default: the torch intra-op threads of the predictor's own work, set around each training round and forward
in the calling thread and restored after (the training thread sets its own once); None leaves torch's
setting. Nothing is changed at import. The network's cost grows with the active keys x window x hidden^2:
10,000 keys of Zipf(1.1) popularity with ~64 called per interval (~790 active) cost ~50 ms per interval; the
15-day Alibaba GenAI trace (77 models, 22,006 one-minute intervals) 6 ms per interval (133 s), mostly
training. `hidden`, `window`, `train_every` and `steps` are the levers for a long simulation.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from scheduler.predict import Ewma, IntervalClock, KeyTable, Predictor, check_interval, checked_counts

_NEVER = np.iinfo(np.int64).min // 2  # the last-call interval of a key never called


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Runs the block with `n` torch intra-op threads in the calling thread (None: as set), then restores
    the previous count. With torch's OpenMP backend the count is per calling thread."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DemandNet(nn.Module):
    """logit of P(call next interval) from a window of normalised counts and a key embedding slot."""

    def __init__(self, *, buckets: int, embedding_dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(buckets + 1, embedding_dim)
        self.lstm = nn.LSTM(1 + embedding_dim, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, bucket: torch.Tensor) -> torch.Tensor:
        """x: [batch, window] normalised counts, oldest first; bucket: [batch] embedding slots -> [batch]."""
        e = self.embedding(bucket)[:, None, :].expand(-1, x.shape[1], -1)  # [batch, window, embedding_dim]
        out, _ = self.lstm(torch.cat([x[..., None], e], dim=-1))  # [batch, window, hidden]
        return self.head(out[:, -1]).squeeze(-1)

    def init_weights(self, generator: torch.Generator) -> None:
        """Torch's default ranges (uniform +-1/sqrt(hidden) for the LSTM and the head), drawn from `generator`;
        embeddings N(0, 0.1)."""
        bound = self.lstm.hidden_size ** -0.5
        with torch.no_grad():
            self.embedding.weight.normal_(0.0, 0.1, generator=generator)
            for p in [*self.lstm.parameters(), *self.head.parameters()]:
                p.uniform_(-bound, bound, generator=generator)


class _Replay:
    """A bounded ring of training samples: window, embedding slot, label, weight."""

    def __init__(self, capacity: int, window: int) -> None:
        self.capacity = capacity
        self.x = torch.zeros(capacity, window)
        self.bucket = torch.zeros(capacity, dtype=torch.long)
        self.label = torch.zeros(capacity)
        self.weight = torch.zeros(capacity)
        self.size = 0
        self._next = 0

    def add(self, x: np.ndarray, bucket: np.ndarray, label: np.ndarray, weight: np.ndarray) -> None:
        n = min(len(x), self.capacity)
        if n == 0:
            return
        idx = torch.from_numpy((self._next + np.arange(n)) % self.capacity)
        self.x[idx] = torch.from_numpy(np.ascontiguousarray(x[-n:], dtype=np.float32))
        self.bucket[idx] = torch.from_numpy(np.asarray(bucket[-n:], dtype=np.int64))
        self.label[idx] = torch.from_numpy(np.asarray(label[-n:], dtype=np.float32))
        self.weight[idx] = torch.from_numpy(np.asarray(weight[-n:], dtype=np.float32))
        self._next = (self._next + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(0, self.size, (batch,), generator=generator)
        return self.x[idx], self.bucket[idx], self.label[idx], self.weight[idx]


class LstmPredictor:
    """Per-key LSTM over the last `window` intervals' counts, trained online (module docstring)."""

    name = "lstm"

    def __init__(self, interval_s: float, *, fallback: Predictor | None = None, window: int = 24, hidden: int = 64,
                 layers: int = 2, embedding_buckets: int = 4096, embedding_dim: int = 8, count_scale: float = 4.0,
                 learning_rate: float = 3e-3, batch_size: int = 64, train: Literal["inline", "background"] = "inline",
                 train_every: int = 20, steps: int = 4, warmup: int = 60, buffer_size: int = 20_000,
                 negatives_per_positive: int = 4, max_positives: int = 256, seed: int = 0,
                 threads: int | None = 1) -> None:
        self.interval_s = check_interval(interval_s)
        if train not in ("inline", "background"):
            raise ValueError(f"train must be 'inline' or 'background', got {train!r}")
        for label, v in (("window", window), ("hidden", hidden), ("layers", layers), ("batch_size", batch_size),
                         ("train_every", train_every), ("steps", steps), ("buffer_size", buffer_size),
                         ("negatives_per_positive", negatives_per_positive), ("max_positives", max_positives),
                         ("embedding_dim", embedding_dim)):
            if v < 1:
                raise ValueError(f"{label} must be at least 1, got {v}")
        if embedding_buckets < 0 or warmup < 0 or count_scale <= 0 or learning_rate <= 0:
            raise ValueError("embedding_buckets and warmup must be >= 0, count_scale and learning_rate > 0")
        if fallback is not None and fallback.interval_s != self.interval_s:
            raise ValueError(f"fallback interval {fallback.interval_s} s differs from {self.interval_s} s")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1 (or None), got {threads}")
        self.threads = threads
        self.window, self.buckets, self.count_scale = window, embedding_buckets, count_scale
        self.batch_size, self.train_every, self.steps, self.warmup = batch_size, train_every, steps, warmup
        self.negatives_per_positive, self.max_positives = negatives_per_positive, max_positives
        self.mode = train
        self.fallback: Predictor = fallback if fallback is not None else Ewma(interval_s)

        self._clock = IntervalClock(interval_s)
        self._table = KeyTable({"ring": (np.float32, 0.0, (window,)), "last": (np.int64, _NEVER, ())})
        self._idle_called = 0  # idle known keys called in the next interval ...
        self._idle_trials = 0  # ... out of idle known keys (the prior)
        self._rng = np.random.default_rng(seed)
        self._generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # construction draws from the global generator: leave it as it was
            self._model = DemandNet(buckets=embedding_buckets, embedding_dim=embedding_dim, hidden=hidden,
                                    layers=layers)
        self._model.init_weights(self._generator)
        self._optimizer = torch.optim.Adam(self._model.parameters(), lr=learning_rate)
        self._replay = _Replay(buffer_size, window)
        self._observed = 0
        self.steps_done = 0
        self.last_loss: float | None = None

        self._lock = threading.Lock()  # guards the replay buffer and the published weights
        self._published_cv = threading.Condition(self._lock)
        self._published: DemandNet | None = None
        self.rounds = 0  # training rounds published
        self._cache: tuple[int, int, np.ndarray] | None = None  # (interval, rounds, probability per key)
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        if train == "background":
            self._thread = threading.Thread(target=self._train_forever, name="lstm-trainer", daemon=True)
            self._thread.start()

    # -- observing ------------------------------------------------------------------------------------------

    def observe(self, end: float, counts: Mapping[str, int]) -> None:
        prev = self._clock.index
        n = self._clock.advance(end)
        calls = checked_counts(counts)
        self._clear(prev + 1, n)  # intervals skipped between the two boundaries had no calls
        if prev >= 0:
            self._collect(n, calls)
        self._write(n, calls)
        self.fallback.observe(end, counts)
        self._observed += 1
        if self._observed % self.train_every == 0 and self._replay.size >= self.batch_size:
            if self._thread is None:
                with torch_threads(self.threads):
                    self._train_round(self._model)
                self._publish(self._model)
            else:
                self._wake.set()

    def _clear(self, first: int, stop: int) -> None:
        """Zeroes the ring columns of intervals first .. stop - 1 (they held the intervals `window` before)."""
        k, w = len(self._table), self.window
        ring = self._table.col["ring"]
        for j in range(first, min(stop, first + w)):
            ring[:k, j % w] = 0.0

    def _order(self, n: int) -> np.ndarray:
        """Ring columns of the window ending with interval n, oldest first."""
        return np.arange(n - self.window + 1, n + 1) % self.window

    def _collect(self, n: int, calls: list[tuple[str, int]]) -> None:
        """Labels the windows that ended with interval n - 1 by interval n's calls, into the replay buffer."""
        k = len(self._table)
        last = self._table.col["last"][:k]
        active = np.flatnonzero(last > n - 1 - self.window)
        called = np.zeros(k, dtype=bool)
        slot = self._table.slot
        known = [s for key, _ in calls if (s := slot.get(key)) is not None]
        called[known] = True
        self._idle_trials += k - len(active)
        self._idle_called += len(known) - int(called[active].sum())
        if len(active) == 0:
            return
        positives, negatives = active[called[active]], active[~called[active]]
        keep_pos, w_pos = self._subsample(positives, self.max_positives)
        limit = self.negatives_per_positive * max(len(keep_pos), 1)
        keep_neg, w_neg = self._subsample(negatives, limit)
        chosen = np.concatenate([keep_pos, keep_neg])
        x = self._table.col["ring"][chosen][:, self._order(n - 1)]
        label = np.concatenate([np.ones(len(keep_pos)), np.zeros(len(keep_neg))])
        weight = np.concatenate([np.full(len(keep_pos), w_pos), np.full(len(keep_neg), w_neg)])
        with self._lock:
            self._replay.add(x, self._bucket(chosen), label, weight)

    def _subsample(self, slots: np.ndarray, limit: int) -> tuple[np.ndarray, float]:
        """At most `limit` of `slots`, sampled without replacement, and the weight that undoes the sampling."""
        if len(slots) <= limit:
            return slots, 1.0
        return np.sort(self._rng.choice(slots, size=limit, replace=False)), len(slots) / limit

    def _bucket(self, slots: np.ndarray) -> np.ndarray:
        return np.where(slots < self.buckets, slots + 1, 0)

    def _write(self, n: int, calls: list[tuple[str, int]]) -> None:
        self._clear(n, n + 1)  # the column held interval n - window, the oldest of the windows just labelled
        col = n % self.window
        for key, c in calls:
            s = self._table.add(key)
            self._table.col["ring"][s, col] = np.log1p(c) / self.count_scale
            self._table.col["last"][s] = n

    # -- training -------------------------------------------------------------------------------------------

    def _train_round(self, model: DemandNet) -> None:
        """`steps` optimiser steps on minibatches drawn from the replay buffer."""
        model.train()
        for _ in range(self.steps):
            with self._lock:
                x, bucket, label, weight = self._replay.sample(self.batch_size, self._generator)
            loss = (F.binary_cross_entropy_with_logits(model(x, bucket), label, reduction="none") * weight).sum()
            loss = loss / weight.sum()
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
            self.steps_done += 1
            self.last_loss = float(loss.detach())
        model.eval()

    def _publish(self, model: DemandNet) -> None:
        with self._lock:
            self._published = model
            self.rounds += 1
            self._published_cv.notify_all()

    def _train_forever(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # this thread's own count (OpenMP backend)
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            self._train_round(self._model)
            self._publish(copy.deepcopy(self._model))  # predict reads the copy while training goes on

    def wait_trained(self, rounds: int, timeout: float | None = None) -> bool:
        """Blocks until `rounds` training rounds have been published (background mode); False on timeout."""
        with self._published_cv:
            return self._published_cv.wait_for(lambda: self.rounds >= rounds, timeout)

    def close(self) -> None:
        """Stops and joins the training thread (background mode); closes the fallback if it holds resources."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None
        close = getattr(self.fallback, "close", None)
        if close is not None:
            close()

    # -- predicting -----------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the network answers (else the fallback does)."""
        return self._observed >= self.warmup and self._published is not None

    @property
    def prior(self) -> float:
        """The probability given to keys without a call in the last `window` intervals."""
        return self._idle_called / self._idle_trials if self._idle_trials else 0.0

    def predict(self, now: float, keys: Collection[str]) -> dict[str, float]:
        if not self.ready:
            return self.fallback.predict(now, keys)
        return self._table.answer(keys, self._probabilities(), self.prior)

    def _probabilities(self) -> np.ndarray:
        """P(call next interval) of every known key: the network for the active ones, the prior for the rest;
        one batched forward per interval and published weights (cached)."""
        n = self._clock.index
        with self._lock:
            model, rounds = self._published, self.rounds
        assert model is not None
        if self._cache is not None and self._cache[:2] == (n, rounds):
            return self._cache[2]
        k = len(self._table)
        values = np.full(k, self.prior)
        active = np.flatnonzero(self._table.col["last"][:k] > n - self.window)
        if len(active):
            x = torch.from_numpy(self._table.col["ring"][active][:, self._order(n)])
            bucket = torch.from_numpy(self._bucket(active))
            with torch_threads(self.threads), torch.inference_mode():
                values[active] = torch.sigmoid(model(x, bucket)).double().numpy()
        self._cache = (n, rounds, values)
        return values
