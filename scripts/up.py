"""``editrl up topo.yaml``: start every process of a topology on this host and supervise them.

Processes: the broker, ``scorers.count`` scorers, ``actors.count`` actors, and the learner under torchrun. Each child
writes its console output to ``<run_dir>/logs/<role>-<id>.out`` (its structured log is the ``.jsonl`` beside it);
the learner's progress lines are echoed here. Crashed actors and scorers are restarted (with a back-off); a crashed
broker is restarted (it recovers everything from LMDB). The run ends when the learner exits (e.g. ``--max-steps``
reached), on Ctrl-C or SIGTERM: children get SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from editrl.common.config import TopologyConfig
from editrl.common.net import free_local_port

GRACE_S = 10.0
POLL_S = 0.1  # how often children are checked (a finished learner ends the run within this)
QUICK_CRASH_S = 10.0  # a child that dies this soon after start is crash-looping
MAX_QUICK_CRASHES = 5  # ... and after this many in a row the run stops (exit 1) instead of looping forever


@dataclass
class Child:
    role: str
    index: int
    argv: list[str]
    restart: bool
    proc: subprocess.Popen | None = None
    restarts: int = 0
    quick_crashes: int = 0
    started: float = 0.0
    log_files: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


def child_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    # Thread oversubscription on 2 cores turns 0.5 s into 16 s: every child runs with few threads.
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def plan(cfg: TopologyConfig, config_path: str, max_steps: int | None) -> list[Child]:
    py = sys.executable
    children = [Child("broker", 0, [py, "-m", "editrl.broker.main", "--config", config_path], restart=True)]
    for i in range(cfg.scorers.count):
        children.append(
            Child("scorer", i, [py, "-m", "editrl.scorer.main", "--config", config_path, "--id", str(i)], True)
        )
    for i in range(cfg.actors.count):
        children.append(
            Child("actor", i, [py, "-m", "editrl.actor.main", "--config", config_path, "--id", str(i)], True)
        )
    learner = [
        py, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.learner.nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(cfg.learner.master_port),  # 0: replaced in start()
        "-m", "editrl.learner.main", "--config", config_path,
    ]  # fmt: skip
    if max_steps is not None:
        learner += ["--max-steps", str(max_steps)]
    children.append(Child("learner", 0, learner, restart=True))
    return children


class Supervisor:
    def __init__(self, cfg: TopologyConfig, config_path: str, max_steps: int | None, log) -> None:  # noqa: ANN001
        self.cfg, self.log = cfg, log
        self.children = plan(cfg, config_path, max_steps)
        self.log_dir = cfg.run_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stopping = False
        self.exit_code = 0

    def start(self, child: Child) -> None:
        for f in child.log_files:  # the previous incarnation's output file
            f.close()
        child.log_files.clear()
        out = open(self.log_dir / f"{child.name}.out", "ab")  # noqa: SIM115 - owned by the child's lifetime
        is_learner = child.role == "learner"
        threads = {"learner": self.cfg.learner.threads, "actor": self.cfg.actors.threads}.get(child.role, 1)
        argv = list(child.argv)
        if is_learner and self.cfg.learner.master_port == 0:  # a fresh port per start: a taken one cannot crash-loop
            argv[argv.index("--master_port") + 1] = str(free_local_port())
        child.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if is_learner else out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            env=child_env(threads),
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
        )
        child.started = time.monotonic()
        child.log_files.append(out)
        if is_learner:
            threading.Thread(target=self._echo, args=(child.proc, out), daemon=True).start()
        self.log.info("process_started", name=child.name, pid=child.proc.pid)

    @staticmethod
    def _echo(proc: subprocess.Popen, out) -> None:  # noqa: ANN001
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line.decode(errors="replace"))
            sys.stdout.flush()
            with contextlib.suppress(ValueError):  # the file was closed: a new incarnation took over
                out.write(line)
                out.flush()

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            self._supervise()
        finally:  # whatever happens here, no child is left running unsupervised
            self.stop_all()
        return self.exit_code

    def _supervise(self) -> None:
        broker, *others = self.children
        self.start(broker)
        time.sleep(0.2)  # not needed for correctness (clients retry), just fewer reconnects
        for child in others:
            self.start(child)
        learner = self.children[-1]
        while not self.stopping:
            time.sleep(POLL_S)
            for child in self.children:
                assert child.proc is not None
                rc = child.proc.poll()
                if rc is None:
                    continue
                if child is learner and rc == 0:  # done (max steps reached)
                    self.log.info("learner_exited", returncode=rc)
                    self.stopping = True
                    break
                self.log.warning("process_exited", name=child.name, returncode=rc, restarts=child.restarts)
                quick = time.monotonic() - child.started < QUICK_CRASH_S
                child.quick_crashes = child.quick_crashes + 1 if quick else 0
                if not child.restart or child.quick_crashes > MAX_QUICK_CRASHES:
                    self.log.error(
                        "giving_up", name=child.name, returncode=rc, quick_crashes=child.quick_crashes,
                        output_tail=self._output_tail(child),
                    )  # fmt: skip
                    self.exit_code, self.stopping = 1, True
                    break
                if quick:  # crash loop: back off
                    time.sleep(self.cfg.timers.restart_backoff_s)
                child.restarts += 1  # the learner resumes from its last checkpoint; the others are stateless
                self.start(child)

    def _output_tail(self, child: Child, limit: int = 2000) -> str:
        """The end of a child's stdout/stderr file, so a crash loop says why without opening the logs directory."""
        path = self.log_dir / f"{child.name}.out"
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - limit))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _on_signal(self, signum, frame) -> None:  # noqa: ANN001
        self.stopping = True

    def stop_all(self) -> None:
        """SIGTERM every child and its descendants (torchrun's workers run in sessions of their own), producers
        first and the broker (the durable state) last; SIGKILL whatever is still alive after the grace period."""
        order = [c for c in self.children if c.role in ("actor", "scorer", "learner")] + [self.children[0]]
        procs: list[psutil.Process] = []
        for child in order:
            if child.proc is None:
                continue
            try:
                parent = psutil.Process(child.proc.pid)
                procs += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=GRACE_S)
        for proc in alive:
            self.log.warning("process_killed", pid=proc.pid, grace_s=GRACE_S)
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        for child in self.children:
            if child.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=1)
            for f in child.log_files:
                f.close()
        self.log.info("all_stopped")


def prepare(cfg: TopologyConfig, log) -> None:  # noqa: ANN001
    """Create the run's role secrets (before any child: none waits or races for them), then build what the topology
    says may be built locally: the tiny model and the quickstart task set."""
    if cfg.security.role_secrets_file and not cfg.security.curve:
        from editrl.common.roles import role_secrets

        try:
            role_secrets(cfg.security.role_secrets_file)
        except ValueError as exc:  # names security.role_secrets_file
            raise SystemExit(f"editrl: config error: {exc}") from None
    if cfg.policy.make_tiny:
        from editrl.common.families.base import build_tiny

        t0 = time.monotonic()
        if build_tiny(cfg.policy, seed=cfg.run.seed):
            log.info("tiny_model_built", path=cfg.policy.model, seconds=round(time.monotonic() - t0, 1))
    if cfg.data.make_quickstart is not None:  # idempotent: rewrites only files that differ (e.g. another size)
        from editrl.common.tasks import make_quickstart_tasks

        q = cfg.data.make_quickstart
        path = make_quickstart_tasks(
            Path(cfg.data.tasks).parent, n_tasks=q.n_tasks, size=q.size, seed=cfg.run.seed,
            instructions=q.instructions or None,
        )  # fmt: skip
        if Path(path) != Path(cfg.data.tasks):
            raise SystemExit(f"data.tasks: the quickstart generator writes {path}; point data.tasks there")
        log.info("quickstart_tasks_written", path=str(path))
