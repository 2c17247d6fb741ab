"""Run logging: `WORKDIR/metrics.jsonl` (one JSON object per logged step), TensorBoard events, a tqdm bar.

Only the primary process writes. On resume from step s, records after s (written before an interruption,
then trained again) are dropped from metrics.jsonl and purged from TensorBoard, so every step appears once.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional

from tqdm import tqdm


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line, from a killed run, is ignored)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def _json_value(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf; keep them visible as "nan"/"inf"


class MetricsLogger:
    """Writes metrics to `workdir/metrics.jsonl` and `workdir/tensorboard`, and drives a progress bar."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not enabled, dynamic_ncols=True,
                         desc="train", mininterval=1.0)
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        from tensorboardX import SummaryWriter  # imported only where used: it pulls in torch when installed

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append `{"step": step, **metrics}` to metrics.jsonl and each value as a TensorBoard scalar."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            self._tb.add_scalar(k, float(v), int(step))

    def progress(self, steps: int = 1, postfix: Optional[Mapping[str, str]] = None) -> None:
        """Advance the bar by `steps`, optionally updating what it shows after the count."""
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(steps)

    def message(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if self.enabled:
            self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
        if self._tb is not None:
            self._tb.close()
