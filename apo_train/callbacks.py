"""Trainer callbacks: a rich progress bar with the latest metrics, a JSONL log of every record, and a
Ctrl-C / SIGTERM handler that saves a checkpoint to resume from."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class JsonlLogCallback(TrainerCallback):
    """Append every log record (step, epoch, time, metrics) as one JSON line to ``path``.

    Appending keeps earlier records across resumes; each line is flushed so nothing is lost on a crash."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401 - HF callback signature
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time()}
        record.update({k: _plain(v) for k, v in logs.items()})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


#: Metrics shown next to the progress bar, in order, when present.
_SHOWN = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/margins_max",
    "learning_rate",
    "eval_loss",
)


class RichProgressCallback(TrainerCallback):
    """A rich progress bar (steps, elapsed, ETA) with the latest loss and reward metrics in its description.

    Replaces transformers' tqdm bar and printer so the CLI looks like the rest of cxrmax."""

    def __init__(self, console: Any | None = None, description: str = "training") -> None:
        self.console = console
        self.description = description
        self._progress = None
        self._task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=state.max_steps, metrics="")
        self._progress.update(self._task, completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._progress is None or not logs:
            return
        shown = []
        for key in _SHOWN:
            if key in logs and isinstance(logs[key], (int, float)):
                shown.append(f"{key.split('/')[-1]}={logs[key]:.4g}")
        if shown:
            self._progress.update(self._task, metrics=" ".join(shown))

    def on_train_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step)
            self._progress.stop()
            self._progress = None


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint. ``kept`` says where and how to
    resume (the CLI prints it as its one "interrupted:" line); ``signum`` is the signal received."""

    def __init__(self, kept: str, signum: int) -> None:
        super().__init__(kept)
        self.kept = kept
        self.signum = signum


class InterruptCallback(TrainerCallback):
    """The first Ctrl-C (SIGINT) or SIGTERM during training finishes the current optimizer step, saves a
    checkpoint and stops training (``signum`` is then set, for the caller to raise
    :class:`TrainingInterrupted`); a second one stops at once, as a plain KeyboardInterrupt.

    The handlers are installed for the duration of ``train()`` only (and only from the main thread,
    where Python delivers signals): loading the model or the data is interrupted as usual."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # asked twice: do not wait for the step to end
            interrupt = KeyboardInterrupt()
            interrupt.signum = signum  # type: ignore[attr-defined] - read by the CLI for the exit code
            raise interrupt
        self.signum = signum

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank(args):
            control.should_save = True
            control.should_training_stop = True

    def _any_rank(self, args: Any) -> bool:
        """Whether any process was interrupted: under torchrun every rank must stop at the same step
        (one rank leaving the loop alone would hang the others in their next collective)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else int(self.signum)], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Put the signal handlers back (also called when training raised, so idempotent)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
