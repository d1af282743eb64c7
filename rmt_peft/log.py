"""What the commands print while they run: one verbosity for rmt-peft and transformers, main process only.

``setup(verbosity)`` (-1 = ``-q``, 0 = default, 1 = ``-v``) sets the ``rmt_peft`` logger (messages on
stderr, as transformers logs) and transformers' logging to the same level. Under a launcher
(torchrun / deepspeed: the environment holds RANK) only rank 0 speaks; the other ranks report
errors only, so every stage header and parameter summary appears once. Known third-party noise is
filtered unless ``-v``: bitsandbytes' warning that its optional CPU kernel package (``kernels``) is
missing, and DeepSpeed's "Setting accelerator to CPU" on machines without a GPU. ``-q`` also
turns off progress bars and the Trainer's log lines (``trainer_output``, which also keeps them off
stdout and keeps bars out of logs that are not a terminal).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

logger = logging.getLogger("rmt_peft")

# logger name -> message starts that say nothing a user can act on
NOISE = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "DeepSpeed": ("Setting accelerator to CPU",),
    # torchao (imported by peft and transformers when installed) loads optional kernels that
    # rmt-peft does not use, and registers enums the way torch now warns about: nothing to act on
    "torchao": ("Failed to load",),
    "torch.utils._pytree": ("%s is an Enum subclass",),
}
_USER_HF_VERBOSITY = os.environ.get("TRANSFORMERS_VERBOSITY")  # the user's own choice wins


class _Quiet(logging.Filter):
    """Drops records below ``min_level`` and records whose message starts with one of ``starts``.
    A filter, not a level: DeepSpeed resets its logger's level when it is imported."""

    def __init__(self, min_level: int, starts: tuple[str, ...] = ()):
        super().__init__()
        self.min_level, self.starts = min_level, starts

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.min_level and not str(record.msg).startswith(self.starts)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, never to the stream of an earlier
    command that may be closed by now (a test's capture, a redirect)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def is_main_process() -> bool:
    """Rank 0, or no launcher at all (launchers put RANK in the environment before Python starts)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(verbosity: int = 0) -> None:
    """Configure the process's logging for a command (see the module docstring)."""
    main = is_main_process()
    level = logging.ERROR if not main or verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logger.setLevel(level)
    for old in [h for h in logger.handlers if getattr(h, "_rmt_peft", False)]:
        logger.removeHandler(old)  # bound to the sys.stderr of an earlier command (tests swap it)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._rmt_peft = True
    logger.addHandler(handler)  # (still propagates: pytest's caplog and a user's root handlers see it)
    # transformers: its default (warning) normally, info with -v (every config and file it reads);
    # read from the environment when it is imported later, set directly when it already is.
    hf_level = logging.INFO if verbosity > 0 and main else max(level, logging.WARNING)
    if _USER_HF_VERBOSITY is None:
        os.environ["TRANSFORMERS_VERBOSITY"] = logging.getLevelName(hf_level).lower()
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(hf_level)
    for name in NOISE:  # (also: DeepSpeed's other messages on ranks other than 0, or with -q)
        third_party = logging.getLogger(name)
        for old in [f for f in third_party.filters if isinstance(f, _Quiet)]:
            third_party.removeFilter(old)
        third_party.addFilter(_Quiet(logging.ERROR if not main or verbosity < 0 else 0,
                                     NOISE.get(name, ()) if verbosity < 1 else ()))
    if not main or verbosity < 0:
        warnings.filterwarnings("ignore")
    if not main or verbosity < 0 or not sys.stderr.isatty():
        hide_library_progress_bars()  # in a log file a bar is a line of carriage returns


def hide_library_progress_bars() -> None:
    """No "Loading weights" / "Writing model shards" / download bars from transformers and the Hub
    (``-q``, ``--no-progress``, and stderr that is not a terminal)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when they are imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def trainer_output(trainer) -> None:
    """Where a Trainer's progress goes: its log dicts (loss, learning rate, ...) to stderr through the
    ``rmt_peft`` logger instead of ``print`` on stdout (stdout holds a command's result), its
    progress bars only where stderr is a terminal (a log file gets no carriage returns or cursor
    moves, only the log lines); with ``-q`` (or on a rank other than 0) neither."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if logger.getEffectiveLevel() <= logging.INFO:
        bars = sys.stderr.isatty() and not trainer.args.disable_tqdm
        trainer.add_callback(_logged_progress(ProgressCallback)(bars=bars))


def _logged_progress(progress_class):
    class LoggedProgress(progress_class):
        """transformers' ProgressCallback with bars only on a terminal and the log lines on stderr."""

        def __init__(self, bars: bool):
            super().__init__()
            self.bars = bars

        def on_train_begin(self, args, state, control, **kwargs):
            self.current_step = 0
            if self.bars:
                super().on_train_begin(args, state, control, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            if self.training_bar is not None:
                super().on_step_end(args, state, control, **kwargs)

        def on_prediction_step(self, args, state, control, **kwargs):
            if self.bars:
                super().on_prediction_step(args, state, control, **kwargs)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            shown = {k: v for k, v in logs.items() if k != "total_flos"}
            line = f"step {state.global_step}: " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
            if self.training_bar is not None:
                self.training_bar.write(line, file=sys.stderr)
            else:
                logger.info(line)

        def on_train_end(self, args, state, control, **kwargs):
            if self.training_bar is not None:
                super().on_train_end(args, state, control, **kwargs)

    return LoggedProgress
