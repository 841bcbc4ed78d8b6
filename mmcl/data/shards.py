"""Streaming WebDataset shards into `Batch`es, resumable to the exact sample.

Built on webdataset's tar readers (`url_opener`, `tar_file_expander`,
`group_by_keys`: local paths, `pipe:`, http(s), s3, gs ... as webdataset
supports). What mmcl adds:

* shard order is a pure function of (seed, epoch), split by rank and then by
  worker, so workers and ranks never overlap and nothing is lost (epoch mode);
  or each worker draws shards with replacement from a (seed, rank, worker)
  stream, several sources mixed by weight (resampled mode);
* each worker counts the samples it has consumed and records where its stream
  stands: the shard (its number in the worker's shard sequence), the byte offset
  of the last sample read there, and the shuffle buffer as (shard, offset) entries
  with the buffer's RNG state. A batch carries that position, a checkpoint saves it
  for every worker, and a resumed run seeks there: the time to resume does not grow
  with the number of samples read (exact resume). A checkpoint without positions
  (older runs, compressed shards) replays the stream without decoding instead;
* worker ids are rotated on resume so the DataLoader's round-robin hands out
  batches in the same order as the uninterrupted run;
* per-sample randomness (augmentation, caption choice) is seeded by
  (seed, epoch, key), independent of worker count and position;
* bad samples are skipped and counted by reason, never fatal.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmcl.data.batch import Batch
from mmcl.data.decode import SkipCounter, SkipSample
from mmcl.data.reader import count_samples, expand_shards, read_sample_at, read_samples  # noqa: F401 (listing)
from mmcl.data.remote import FetchOptions
from mmcl.utils import UserError

log = logging.getLogger("mmcl.data")

# ----------------------------------------------------------------------------- the stream


def _seed(*parts: Any) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class EpochEnd:
    """What a loader worker sends after its last batch of an epoch (only when `ShardStream.report_epoch_end`):
    its final counts, including samples skipped after its last batch or in an epoch that made no batch."""

    worker: int
    consumed: int
    skipped: dict[str, int]
    epoch: int
    position: dict[str, Any] | None = None


@dataclass
class StreamState:
    """Where every logical worker of one rank stands; saved with each checkpoint.

    `skipped` holds this epoch's counts per worker (restored into each worker on resume);
    `skipped_before` the totals of all earlier epochs, so `skip_totals()` is cumulative over the run.
    `positions` holds each worker's stream position (see `ShardStream`): with it a resumed worker seeks,
    without it (older checkpoints) it replays `consumed` samples.
    """

    epoch: int = 0
    next_worker: int = 0
    consumed: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, dict[str, int]] = field(default_factory=dict)
    skipped_before: dict[str, int] = field(default_factory=dict)
    positions: dict[int, dict[str, Any]] = field(default_factory=dict)
    device_skipped: dict[str, int] = field(default_factory=dict)  # this epoch's, skipped after the workers

    def add_skips(self, counts: dict[str, int]) -> None:
        """Count samples skipped in the main process (images that fail to decode with data.decode_on=device)."""
        for reason, n in counts.items():
            self.device_skipped[reason] = self.device_skipped.get(reason, 0) + n

    def record(self, batch: Batch | EpochEnd, num_workers: int) -> None:
        if batch.epoch != self.epoch:
            self.next_epoch(batch.epoch)
        self.consumed[batch.worker] = batch.consumed
        self.skipped[batch.worker] = dict(batch.skipped)
        if batch.position is not None:
            self.positions[batch.worker] = batch.position
        else:
            self.positions.pop(batch.worker, None)
        if isinstance(batch, Batch):
            self.next_worker = (batch.worker + 1) % max(num_workers, 1)

    def next_epoch(self, epoch: int) -> None:
        """Move to `epoch`, folding this epoch's skip counts into the run's totals."""
        self.skipped_before = self.skip_totals()
        self.epoch, self.next_worker, self.consumed, self.skipped, self.positions = epoch, 0, {}, {}, {}
        self.device_skipped = {}

    def epoch_skip_totals(self) -> dict[str, int]:
        totals: dict[str, int] = dict(self.device_skipped)
        for counts in self.skipped.values():
            for reason, n in counts.items():
                totals[reason] = totals.get(reason, 0) + n
        return totals

    def skip_totals(self) -> dict[str, int]:
        """Skipped samples by reason since the run began (resumes included)."""
        totals = dict(self.skipped_before)
        for reason, n in self.epoch_skip_totals().items():
            totals[reason] = totals.get(reason, 0) + n
        return totals

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "next_worker": self.next_worker,
            "consumed": {str(k): v for k, v in self.consumed.items()},
            "skipped": {str(k): v for k, v in self.skipped.items()},
            "skipped_before": dict(self.skipped_before),
            "positions": {str(k): v for k, v in self.positions.items()},
            "device_skipped": dict(self.device_skipped),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamState:
        return cls(
            d["epoch"],
            d["next_worker"],
            {int(k): v for k, v in d["consumed"].items()},
            {int(k): v for k, v in d["skipped"].items()},
            dict(d.get("skipped_before", {})),  # checkpoints from before cumulative counts: none
            {int(k): v for k, v in d.get("positions", {}).items()},  # older checkpoints: none (replayed)
            dict(d.get("device_skipped", {})),
        )


class ShardStream(IterableDataset):
    """Yields collated `Batch`es built inside loader workers.

    Args:
        sources: one shard list per source (see `expand_shards`).
        sample_fn: raw sample dict + per-sample RNG -> decoded sample dict; raises SkipSample.
        collate_fn: list of decoded samples -> Batch.
        weights: per-source sampling weights (resampled mode only).
        resampled: draw shards with replacement forever instead of exact epochs.
        drop_last: drop each worker's final partial batch (training) or keep it (eval).
        fetch: timeouts and retries for http(s) shards.
    """

    def __init__(
        self,
        sources: list[list[str]],
        sample_fn: Callable[[dict[str, Any], random.Random], dict[str, Any]],
        collate_fn: Callable[[list[dict[str, Any]]], Batch],
        batch_size: int,
        *,
        weights: list[float] | None = None,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        fetch: FetchOptions | None = None,
    ) -> None:
        super().__init__()
        self.fetch = fetch or FetchOptions()
        self.sources = sources
        self.sample_fn, self.collate_fn = sample_fn, collate_fn
        self.batch_size = batch_size
        self.weights = weights or [1.0] * len(sources)
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = drop_last
        self.num_workers = 1
        self.state = StreamState()
        self.report_epoch_end = False  # the trainer sets it to receive an EpochEnd from each worker
        if not resampled and world_size > len(self.all_shards):
            raise UserError(
                f"{len(self.all_shards)} shard(s) cannot be split over {world_size} processes: "
                "write more, smaller shards or use data.resampled=true"
            )

    @property
    def all_shards(self) -> list[str]:
        return [s for src in self.sources for s in src]

    def shards_per_rank(self) -> int:
        return len(self.all_shards) // self.world_size

    def start(self, state: StreamState, num_workers: int) -> None:
        """Set the position to start from (fresh or restored) before the loader's workers fork."""
        self.state, self.num_workers = state, max(num_workers, 1)

    def _epoch_shards(self, epoch: int, worker: int) -> list[str]:
        shards = sorted(self.all_shards)
        random.Random(_seed(self.seed, "shards", epoch)).shuffle(shards)
        return shards[self.rank :: self.world_size][worker :: self.num_workers]

    def _resampled_shards(self, worker: int) -> Iterator[str]:
        rng = random.Random(_seed(self.seed, "resample", self.state.epoch, self.rank, worker))
        while True:
            source = rng.choices(self.sources, weights=self.weights)[0]
            yield rng.choice(source)

    def _raw_samples(self, shards, counter: SkipCounter, start: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        """Raw samples of `shards` tagged with `__seq__` (the shard's number in this worker's sequence).

        With `start` (a saved position) the sequence begins at its shard, at the byte offset of the last
        sample read there, and that sample itself is dropped: reading resumes right after it.
        """
        seq0 = start["seq"] if start else 0
        for seq, url in enumerate(itertools.islice(shards, seq0, None), start=seq0):
            resume_here = start is not None and seq == seq0
            offset = start["offset"] if resume_here else 0
            for raw in read_samples([url], counter, options=self.fetch, start_offset=offset):
                if resume_here:
                    resume_here = False
                    if raw["__key__"] != start["key"]:
                        raise UserError(
                            f"{url}: expected sample '{start['key']}' at byte {offset} to resume; "
                            "the shard changed since the checkpoint was written"
                        )
                    continue
                raw["__seq__"] = seq
                yield raw

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        physical = info.id if info else 0
        worker = (physical + self.state.next_worker) % self.num_workers  # logical id, rotated on resume
        epoch = self.state.epoch
        counter = SkipCounter()
        counter.counts.update(self.state.skipped.get(worker, {}))
        skip = self.state.consumed.get(worker, 0)
        shards = self._resampled_shards(worker) if self.resampled else self._epoch_shards(epoch, worker)
        rng = random.Random(_seed(self.seed, "buffer", epoch, self.rank, worker))
        position = self.state.positions.get(worker)
        seek = bool(skip) and position is not None and position.get("consumed") == skip
        buffer = _Buffer(self.shuffle_buffer, rng)
        if seek:
            buffer.restore(position, self.fetch)
            start = position if position.get("key") is not None else None
            consumed = skip
        else:
            start, consumed = None, 0
        tracker = _Tracker(position if seek else None)
        raws = () if buffer.draining else tracker.follow(self._raw_samples(shards, start=start, counter=counter))
        pending: list[dict[str, Any]] = []
        for raw in buffer.shuffle(raws):
            consumed += 1
            if consumed <= skip:
                continue  # replaying up to the checkpointed position (no saved position): read, never decode
            sample_rng = random.Random(_seed(self.seed, epoch, raw["__key__"]))
            try:
                pending.append(self.sample_fn(raw, sample_rng))
            except SkipSample as e:
                counter.add(e.reason, where=f"{raw.get('__url__', '?')}:{raw['__key__']}", detail=e.detail)
                continue
            for note in pending[-1].pop("notes", ()):  # a part left out, the sample kept (e.g. bad_counterfactual)
                counter.add(note.reason, where=f"{raw.get('__url__', '?')}:{raw['__key__']}", detail=note.detail)
            if len(pending) == self.batch_size:
                yield self._finish(pending, worker, consumed, counter, epoch, tracker.position(consumed, buffer))
                pending = []
        if pending and not self.drop_last:
            yield self._finish(pending, worker, consumed, counter, epoch, tracker.position(consumed, buffer))
        if self.report_epoch_end:
            yield EpochEnd(worker, consumed, dict(counter.counts), epoch, tracker.position(consumed, buffer))

    def _finish(
        self, samples, worker: int, consumed: int, counter: SkipCounter, epoch: int, position: dict[str, Any] | None
    ) -> Batch:
        batch = self.collate_fn(samples)
        batch.worker, batch.consumed, batch.skipped, batch.epoch = worker, consumed, dict(counter.counts), epoch
        batch.position = position
        return batch


class _Buffer:
    """The shuffle buffer of one worker, whose contents and RNG state can be saved and restored.

    Full, each new sample swaps with a random one of the buffer, which is yielded; at the end of a finite
    stream the rest is shuffled and drained in order (`draining`).
    """

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size, self.rng = size, rng
        self.items: list[dict[str, Any]] = []
        self.draining = False

    def shuffle(self, samples) -> Iterator[dict[str, Any]]:
        if self.size <= 1:
            yield from samples
            return
        if not self.draining:
            for sample in samples:
                if len(self.items) < self.size:
                    self.items.append(sample)
                    continue
                i = self.rng.randrange(len(self.items))
                self.items[i], sample = sample, self.items[i]
                yield sample
            self.rng.shuffle(self.items)
            self.draining = True
        while self.items:
            yield self.items.pop(0)

    def state(self) -> dict[str, Any] | None:
        """Entries as [url, offset, key], the RNG state and the phase; None when an entry cannot be sought."""
        entries = [[s["__url__"], s["__offset__"], s["__key__"]] for s in self.items]
        if any(offset < 0 for _, offset, _ in entries):
            return None
        version, internal, gauss = self.rng.getstate()
        return {"buffer": entries, "rng": [version, list(internal), gauss], "draining": self.draining}

    def restore(self, position: dict[str, Any], fetch: FetchOptions) -> None:
        """Re-read the saved entries (one seek each) and restore the RNG and the phase."""
        version, internal, gauss = position["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.items = [read_sample_at(url, offset, key, options=fetch) for url, offset, key in position["buffer"]]
        self.draining = position["draining"]


class _Tracker:
    """Follows the raw stream to know the last sample read: (shard number, url, byte offset, key)."""

    def __init__(self, start: dict[str, Any] | None) -> None:
        self.last = {k: start.get(k) for k in ("seq", "url", "offset", "key")} if start else {}

    def follow(self, raws: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for raw in raws:
            self.last = {
                "seq": raw["__seq__"],
                "url": raw["__url__"],
                "offset": raw["__offset__"],
                "key": raw["__key__"],
            }
            yield raw

    def position(self, consumed: int, buffer: _Buffer) -> dict[str, Any] | None:
        """The worker's position after `consumed` samples; None if some sample cannot be sought (compressed)."""
        state = buffer.state()
        if state is None or (self.last and self.last["offset"] < 0):
            return None
        return {"consumed": consumed, **(self.last or {"seq": None, "url": None, "offset": None, "key": None}), **state}


def make_loader(
    stream: ShardStream, num_workers: int, state: StreamState | None = None, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader over `stream` starting at `state`. Never hand it to `accelerator.prepare`: the stream
    splits the shards by rank and worker itself, which its exact resume relies on (each worker's position)."""
    if not stream.resampled:
        per_rank = stream.shards_per_rank()
        if num_workers > per_rank:
            log.info("using %d loader worker(s), not %d: only %d shard(s) per process", per_rank, num_workers, per_rank)
            num_workers = per_rank
    stream.start(state or StreamState(), num_workers)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
