"""One readable console line per epoch when THDH update counters fill the logs.

The counters (``update_zero_frac/<layer>/<var>``, ``update_saturate_frac/...``,
``update_nonzero_frac/...``: one per weight variable) all go to MLflow; the
console gets loss, accuracy and a compact summary of them. Example::

    Epoch 3/15 - 1.2s - loss 0.4123 - accuracy 0.8811 - val_loss 0.4410 - val_accuracy 0.8750
      - updates rounded away 12.5% (most: dense1/kernel 40.1%), saturated 0.0%
"""

from __future__ import annotations

import time

import keras

COUNTER_PREFIXES = ("update_zero_frac/", "update_saturate_frac/", "update_nonzero_frac/")


def counter_summary(logs: dict) -> str:
    """``updates rounded away 12.5% (most: dense1/kernel 40.1%), saturated 0.0%`` (mean over variables)."""
    parts = []
    for prefix, what in (("update_zero_frac/", "rounded away"), ("update_saturate_frac/", "saturated")):
        values = {k[len(prefix):]: float(v) for k, v in logs.items() if k.startswith(prefix)}
        if not values:
            continue
        worst = max(values, key=values.get)
        text = f"{what} {100 * sum(values.values()) / len(values):.1f}%"
        if values[worst] > 0 and len(values) > 1:
            text += f" (most: {worst} {100 * values[worst]:.1f}%)"
        parts.append(text)
    return "updates " + ", ".join(parts) if parts else ""


def epoch_line(epoch: int, epochs: int, seconds: float, logs: dict) -> str:
    """The console line of one epoch: progress, time, loss and accuracy values, the counter summary."""
    plain = [f"{k} {float(v):.4f}" for k, v in logs.items() if not k.startswith(COUNTER_PREFIXES)]
    line = " - ".join([f"Epoch {epoch + 1}/{epochs}", f"{seconds:.1f}s", *plain])
    summary = counter_summary(logs)
    return f"{line}\n  - {summary}" if summary else line


class CompactEpochLogger(keras.callbacks.Callback):
    """Prints :func:`epoch_line` at each epoch end (use with ``fit(verbose=0)``; after the counters callback)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.started = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        print(epoch_line(epoch, self.epochs, time.monotonic() - self.started, dict(logs or {})), flush=True)
