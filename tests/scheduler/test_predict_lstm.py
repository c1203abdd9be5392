"""The LSTM demand predictor: it learns a periodic pattern, deterministically; defers to its fallback until
warm; gives idle and unknown keys the prior; keeps its replay buffer balanced with weights; batches its
inference; trains in the background without blocking predict."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from scheduler.predict import Ewma, FallbackPredictor, HybridHistogram, LastValue, build_predictor
from scheduler.predict_lstm import DemandNet, LstmPredictor, torch_threads

KEYS = [f"k{i}" for i in range(16)]
SMALL = {"window": 8, "hidden": 32, "embedding_buckets": 32, "batch_size": 32}


def periodic(t: int) -> dict[str, int]:
    """Each key once every 4 intervals, the phases spread over the keys."""
    return {k: 1 for i, k in enumerate(KEYS) if (t + i) % 4 == 0}


def run(seed: int, train: int = 80, test: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Trains inline on `train` intervals, then (predictions, outcomes) over `test` more: interval t ends at
    t + 1, so predict(now=t) is about interval t."""
    p = LstmPredictor(1.0, seed=seed, train_every=1, steps=4, warmup=20, learning_rate=1e-2,
                      **SMALL)  # type: ignore[arg-type]
    for t in range(train):
        p.observe(t + 1.0, periodic(t))
    assert p.ready
    preds, outcomes = [], []
    for t in range(train, train + test):
        got = p.predict(float(t), KEYS)
        preds.append([got[k] for k in KEYS])
        outcomes.append([k in periodic(t) for k in KEYS])
        p.observe(t + 1.0, periodic(t))
    return np.array(preds), np.array(outcomes, dtype=float)


def bce(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def test_learns_a_periodic_pattern_far_better_than_a_constant() -> None:
    preds, outcomes = run(seed=0)
    base = outcomes.mean()  # 0.25: the best constant
    constant = bce(np.full_like(outcomes, base), outcomes)
    assert constant == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))  # 0.56
    assert bce(preds, outcomes) < constant / 4
    assert ((preds >= 0.5) == outcomes).mean() >= 0.95  # the constant's accuracy is 0.75


def test_inline_training_is_deterministic_for_a_seed() -> None:
    a, _ = run(seed=3, train=24, test=2)
    b, _ = run(seed=3, train=24, test=2)
    c, _ = run(seed=4, train=24, test=2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_defers_to_the_fallback_until_warm() -> None:
    p = LstmPredictor(1.0, fallback=LastValue(1.0), warmup=12, train_every=4, steps=1, **SMALL)  # type: ignore[arg-type]
    reference = LastValue(1.0)
    for t in range(11):
        p.observe(t + 1.0, periodic(t))
        reference.observe(t + 1.0, periodic(t))
        assert not p.ready
        assert p.predict(t + 1.0, [*KEYS, "new"]) == reference.predict(t + 1.0, [*KEYS, "new"])
    p.observe(12.0, periodic(11))
    assert p.ready and p.rounds == 2  # trained after 8 and 12 intervals (after 4 it held less than a batch)
    assert p.predict(12.0, KEYS) != reference.predict(12.0, KEYS)


def test_idle_and_unknown_keys_get_the_prior() -> None:
    window = SMALL["window"]
    p = LstmPredictor(1.0, warmup=0, train_every=1, steps=1, **SMALL)  # type: ignore[arg-type]
    history = {t: periodic(t) for t in range(60)}
    for t in (0, 30, 31):
        history[t] = {**history[t], "y": 1}  # y: idle from 9 to 29, called at 30; again after 40
    history[5] = {**history[5], "x": 2}
    for t in range(60):
        p.observe(t + 1.0, history[t])
    # the prior, counted the slow way: known keys without a call in the `window` intervals before n
    idle = called = 0
    for n in range(1, 60):
        known = {k for t in range(n) for k in history[t]}
        for k in known:
            if all(k not in history[t] for t in range(max(n - window, 0), n)):
                idle += 1
                called += k in history[n]
    assert (called, idle) == (1, 22 + 20 + 46)  # y called at 30; y idle at 9..30 and 40..59, x at 14..59
    assert p.prior == pytest.approx(called / idle)
    got = p.predict(60.0, ["x", "y", "never", "k0"])
    assert got["x"] == got["never"] == pytest.approx(p.prior)
    assert got["y"] == pytest.approx(p.prior)  # y's last call (31) is 29 intervals back
    assert got["k0"] != pytest.approx(p.prior)  # an active key: the network answers


def test_the_replay_buffer_keeps_positives_and_weights_the_sampled_negatives() -> None:
    p = LstmPredictor(1.0, window=4, negatives_per_positive=4, hidden=8, embedding_buckets=10)
    keys = [f"a{i}" for i in range(100)]
    p.observe(1.0, {k: 3 for k in keys})  # all 100 active from here on
    p.observe(2.0, {"a7": 1})  # one called again, 99 not
    replay = p._replay
    assert replay.size == 5
    labels, weights = replay.label[:5].tolist(), replay.weight[:5].tolist()
    assert labels == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert weights == [1.0] + [pytest.approx(99 / 4)] * 4  # each kept negative stands for 99/4
    # windows end with the interval before the label's, oldest first: three empty intervals, then 3 calls
    scaled = math.log1p(3) / p.count_scale
    assert replay.x[:5].tolist() == [[0.0, 0.0, 0.0, pytest.approx(scaled)]] * 5
    assert replay.bucket[0].item() == 8  # a7 is the 8th key seen: slot 1 + 7
    buckets = [p._bucket(np.array([p._table.slot[f"a{i}"]]))[0] for i in (5, 9, 10, 99)]
    assert buckets == [6, 10, 0, 0]  # beyond 10 keys: the shared slot 0
    p.observe(3.0, {})  # no positives: still 4 negatives, each standing for 100/4
    assert replay.size == 9 and replay.label[5:9].tolist() == [0.0] * 4
    assert replay.weight[5:9].tolist() == [25.0] * 4


def test_a_skipped_boundary_counts_as_empty_intervals() -> None:
    p = LstmPredictor(1.0, window=4, warmup=0, train_every=1, steps=1, batch_size=1, hidden=8)
    for t in range(4):
        p.observe(t + 1.0, {"a": 1, "b": 1} if t == 0 else {"a": 1})  # a fills every column of the ring
    p.observe(7.0, {"a": 3})  # intervals 4 and 5 never reported; a called in 6
    one = math.log1p(1) / p.count_scale
    # the sample labelled by interval 6 saw intervals 2 .. 5: a's calls in 2 and 3, then nothing (the
    # columns that held intervals 0 and 1 were cleared)
    assert p._replay.x[p._replay.size - 1].tolist() == [pytest.approx(one)] * 2 + [0.0, 0.0]
    assert p._replay.label[p._replay.size - 1].item() == 1.0
    p.observe(12.0, {})  # five more intervals unreported: nobody called in the last 4
    assert p.predict(12.0, ["a", "b"]) == {"a": p.prior, "b": p.prior}


def test_inference_is_one_batched_forward_per_interval_over_the_active_keys() -> None:
    p = LstmPredictor(1.0, window=4, hidden=8, warmup=0, train_every=1, steps=1, batch_size=8)
    keys = [f"a{i}" for i in range(10_000)]
    p.observe(1.0, {k: 1 for k in keys[:6_000]})
    p.observe(2.0, {k: 1 for k in keys[:10]})
    assert p.ready
    batches: list[int] = []
    model = p._published
    assert model is not None
    model.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    got = p.predict(2.0, [*keys, "never"])
    assert batches == [6_000]  # a4000.. were never called: the prior, without the network
    assert len(got) == 10_001 and got["a9999"] == got["never"] == p.prior
    assert p.predict(2.0, keys[:3]) == {k: got[k] for k in keys[:3]}
    assert batches == [6_000]  # the same interval: answered from the first forward


class GatedTrainer(LstmPredictor):
    """Background training whose rounds wait for the test to open a gate."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.entered = threading.Semaphore(0)
        self.gate = threading.Semaphore(0)
        super().__init__(*args, **kwargs)

    def _train_round(self, model: DemandNet) -> None:
        self.entered.release()
        assert self.gate.acquire(timeout=60)
        super()._train_round(model)


def test_background_training_never_blocks_predict_and_close_joins() -> None:
    p = GatedTrainer(1.0, train="background", fallback=LastValue(1.0), warmup=0, train_every=2, steps=2,
                     **SMALL)  # type: ignore[arg-type]
    thread = p._thread
    assert thread is not None and thread.daemon and thread.is_alive()
    reference = LastValue(1.0)
    for t in range(16):
        p.observe(t + 1.0, periodic(t))
        reference.observe(t + 1.0, periodic(t))
    assert p.entered.acquire(timeout=60)  # a round is running, held at the gate
    assert not p.ready and p.predict(16.0, KEYS) == reference.predict(16.0, KEYS)  # the fallback answers
    p.observe(17.0, periodic(16))  # observing goes on while the round waits
    p.gate.release()
    assert p.wait_trained(1, timeout=60) and p.ready
    first = p.predict(17.0, KEYS)
    for t in range(17, 20):
        p.observe(t + 1.0, periodic(t))
    assert p.entered.acquire(timeout=60)  # the next round is held: predict uses the published weights
    published = p._published
    assert p.predict(20.0, KEYS) == p.predict(20.0, KEYS) and p._published is published
    assert first != p.predict(20.0, KEYS)  # a later interval, other windows
    p.gate.release()
    assert p.wait_trained(2, timeout=60)
    p.gate.release()  # let any further round through, then stop
    p.close()
    assert not thread.is_alive() and p._thread is None
    p.close()  # twice is fine


def test_build_predictor_makes_the_lstm_and_the_default_fallback_chain() -> None:
    lstm = build_predictor("lstm", 60.0, hidden=8, window=6)
    assert isinstance(lstm, LstmPredictor) and lstm.window == 6 and isinstance(lstm.fallback, Ewma)
    fb = build_predictor("fallback", 60.0, members={"lstm": {"hidden": 8, "train": "background"}}, patience=3)
    assert isinstance(fb, FallbackPredictor) and fb.name == "fallback(lstm>histogram>ewma)" and fb.active == "lstm"
    assert isinstance(fb._members[1].predictor, HybridHistogram)
    trainer = fb._members[0].predictor
    assert isinstance(trainer, LstmPredictor) and trainer._thread is not None
    thread = trainer._thread
    fb.close()  # closes the members: the training thread is joined
    assert not thread.is_alive()


def test_torch_threads_are_restored() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train": "sometimes"}, "train must be"),
        ({"window": 0}, "window"),
        ({"threads": 0}, "threads"),
        ({"fallback": LastValue(2.0)}, "differs"),
    ],
)
def test_bad_settings_are_refused(options, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        LstmPredictor(1.0, **options)
