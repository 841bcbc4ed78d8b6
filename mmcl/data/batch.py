"""`Batch`: the one thing the training loop receives."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


@dataclass
class Batch:
    """A collated batch. Tensors are (B, ...); optional parts are None when absent.

    images:      (B, 3, H, W) float, normalised for the image tower
    text:        (B, L) long token ids, padded; `text_mask` (B, L) 1 = real token
    captions:    the raw caption strings
    labels:      (B,) long class index, for labelled eval shards
    keys:        sample keys (`__key__`), for reports and resume bookkeeping
    worker:      the (logical) loader worker that built the batch, and how many raw
    consumed:    samples that worker had read when it did (exact resume of the data position)
    skipped:     that worker's running count of skipped samples by reason
    epoch:       the data epoch the batch belongs to
    position:    where that worker's stream stands (shard, byte offset, shuffle buffer; see
                 `mmcl.data.shards.StreamState`), so a resumed run seeks instead of replaying
    views:       named inputs the loss terms asked the loader for (`mmcl.data.views`), e.g.
                 a second augmented image (B, 3, H, W) or PrefixLM's `prefix_ids` (B, P)
    """

    images: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)
    labels: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)
    worker: int = 0
    consumed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    epoch: int = 0
    views: dict[str, Any] = field(default_factory=dict)
    position: dict[str, Any] | None = None

    def get(self, name: str) -> Any:
        """A field or a view by name (None when the batch has neither)."""
        if name in self.views:
            return self.views[name]
        return getattr(self, name, None) if name in _FIELDS else None

    def __len__(self) -> int:
        for t in (self.images, self.text, self.labels):
            if t is not None:
                return t.shape[0]
        return len(self.captions)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        views = {
            k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in self.views.items()
        }
        return replace(self, **moved, views=views)

    def split(self, parts: int) -> list[Batch]:
        """Cut into `parts` micro-batches along the batch dimension (for gradient accumulation)."""
        n = len(self)
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        out = []
        for lo, hi in zip(bounds, bounds[1:]):
            if hi <= lo:
                continue
            sliced = {}
            for f in fields(self):
                v = getattr(self, f.name)
                if isinstance(v, torch.Tensor) or (isinstance(v, list) and len(v) == n):
                    sliced[f.name] = v[lo:hi]
            sliced["views"] = {k: _rows(v, lo, hi) for k, v in self.views.items()}
            out.append(replace(self, **sliced))
        return out

    def select(self, keep: list[int]) -> Batch:
        """The rows `keep` of every per-sample field and view (rows dropped after collation: a JPEG the device
        could not decode, rows trimmed to match the other ranks)."""
        n = len(self.keys)
        index = torch.tensor(keep, dtype=torch.long)

        def rows(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
                return v[index.to(v.device)]
            if isinstance(v, list) and len(v) == n:
                return [v[i] for i in keep]
            return v

        changed = {f.name: rows(getattr(self, f.name)) for f in fields(self) if f.name not in ("views", "skipped")}
        return replace(self, **changed, views={k: rows(v) for k, v in self.views.items()})


def _rows(v: Any, lo: int, hi: int) -> Any:
    """Rows lo:hi of a per-sample view (tensors and lists; anything else is shared by the batch)."""
    return v[lo:hi] if isinstance(v, (torch.Tensor, list)) else v


_FIELDS = {"images", "text", "text_mask", "captions", "labels", "keys"}
