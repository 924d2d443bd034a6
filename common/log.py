"""structlog set-up shared by every process: JSON lines to ``<run_dir>/logs/<role>-<id>.jsonl``, readable console."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import structlog


def setup_logging(role: str, proc_id: int | str, run_dir: str | Path | None, console_level: str = "INFO") -> Any:
    """Configure structlog and return a logger bound with role, id and pid.

    Every event goes to the JSON file (DEBUG and up); the console shows ``console_level`` and up, rendered for
    humans, on stderr (stdout stays free for progress lines).
    """
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(structlog.stdlib.ProcessorFormatter(processor=structlog.dev.ConsoleRenderer(colors=False)))
    handlers.append(console)
    if run_dir is not None:
        log_dir = Path(run_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_dir / f"{role}-{proc_id}.jsonl")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(structlog.stdlib.ProcessorFormatter(processor=structlog.processors.JSONRenderer()))
        handlers.append(file_handler)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(logging.DEBUG)
    for noisy in ("urllib3", "filelock", "PIL", "matplotlib", "torch.distributed", "h5py", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger().bind(role=role, id=str(proc_id), pid=os.getpid())


def set_process_title(title: str) -> None:
    """``ps`` shows ``editrl::scorer-3`` when setproctitle is available; otherwise a no-op."""
    try:
        import setproctitle  # optional

        setproctitle.setproctitle(title)
    except ImportError:
        pass
