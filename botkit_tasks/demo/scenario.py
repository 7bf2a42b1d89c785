"""The demo's script: set up the bot and the remote fediverse, follow, publish, check."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .bot_factory import build_demo_bot
from .display import Progress
from .processes import WorkerProcesses
from .remote import RemoteActor, RemoteFediverse
from .report import Check, DemoResult, print_summary, render_progress
from .servers import Server, free_socket
from .settings import DEMO_DELIVERY, MIN_FOLLOWERS, PHASE_TIMEOUT

if TYPE_CHECKING:
    from ..bot import Bot
    from ..monitor import QueueStats

__all__ = ["Demo"]

logger = logging.getLogger("botkit_tasks.demo")


class Demo:
    """One demo run; see the module docstring.  Use :func:`run_demo`."""

    def __init__(
        self,
        *,
        followers: int = 240,
        threads: int = 8,
        processes: int = 2,
        live: bool = False,
        keep: str | None = None,
        out: TextIO = sys.stdout,
    ) -> None:
        if followers < MIN_FOLLOWERS:
            raise ValueError(f"the demo needs at least {MIN_FOLLOWERS} followers")
        self.n_followers = followers
        self.threads = max(threads, 1)
        self.processes = max(processes, 1)
        self.live = live
        self.keep = keep
        self.out = out
        self.started = time.monotonic()
        self.phase = "starting"
        self.phase_no = 0
        self.activity_id: str | None = None
        self._tmp: str | None = None
        self._servers: list[Server] = []
        self._workers: WorkerProcesses | None = None
        self._progress: Progress | None = None
        self._log_handler: logging.Handler | None = None
        self._saved_levels: dict[str, tuple[int, bool]] = {}
        self.bot: Bot | None = None
        self.remote: RemoteFediverse | None = None
        self._queues: list[QueueStats] = []
        self._queues_at = 0.0

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        if self.keep:
            Path(self.keep).mkdir(parents=True, exist_ok=True)
            directory = self.keep
        else:
            directory = self._tmp = tempfile.mkdtemp(prefix="botkit-demo-")
        self.db_path = Path(directory) / "demo.sqlite3"
        self.log_path = Path(directory) / "demo.log"
        self._quiet_logs()

        bot_socket = free_socket()
        remote_sockets = {"a": free_socket(), "b": free_socket()}
        base_url = f"http://127.0.0.1:{bot_socket.getsockname()[1]}"
        backends = build_demo_bot(self.db_path, base_url, global_broker=False)
        self.engine, self.kv, self.broker = backends.engine, backends.kv, backends.broker
        self.bot = backends.bot
        # The key pair is made here, before any worker process could race to make one.
        self.bot.federation.private_key  # noqa: B018

        self.remote = RemoteFediverse(
            {name: s.getsockname()[1] for name, s in remote_sockets.items()},
            hang_seconds=DEMO_DELIVERY.read_timeout + 2.0,
        )
        self._populate(self.remote)

        self._servers = [
            Server(self.bot.asgi_app(), [bot_socket], "bot"),
            Server(self.remote, list(remote_sockets.values()), "remote"),
        ]
        for server in self._servers:
            server.start()
        # Real `dramatiq` worker processes, as a deployment runs them.
        self._workers = WorkerProcesses(
            db_path=self.db_path,
            base_url=base_url,
            processes=self.processes,
            threads=self.threads,
            log_path=self.log_path,
        )
        self._workers.start()
        self._workers.wait_ready(self._workers_up)

    def _workers_up(self) -> bool:
        from ..monitor import inspect

        return len(inspect(self.broker).workers()) >= self.processes

    def _populate(self, remote: RemoteFediverse) -> None:
        n = self.n_followers
        on_b = max(n // 5, 1)
        flaky = max(3, n // 40)
        specials = 3  # limited, gone, hanging
        normal_a = n - on_b - flaky - specials
        for i in range(normal_a):
            remote.add_actor(f"user{i + 1:03d}", "a")
        for i in range(flaky):
            remote.add_actor(f"flaky{i + 1}", "a", "flaky", fails=1 + i % 3)
        remote.add_actor("ratelimited", "a", "limited")
        remote.add_actor("gone", "a", "gone")
        remote.add_actor("hangs", "a", "hanging")
        for i in range(on_b):
            remote.add_actor(f"b-user{i + 1:03d}", "b")
        self.expected_inboxes = normal_a + flaky + specials + 1  # + instance b's shared inbox
        self.expected_flaky = flaky

    def _quiet_logs(self) -> None:
        # Retries are expected here; their log lines would scroll the live view
        # away.  Everything goes to demo.log in the demo's directory instead.
        handler = logging.FileHandler(self.log_path, encoding="utf-8")
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
        )
        handler.setLevel(logging.INFO)
        self._log_handler = handler
        for name in ("dramatiq", "botkit_tasks", "uvicorn", "uvicorn.error", "httpx"):
            log = logging.getLogger(name)
            self._saved_levels[name] = (log.level, log.propagate)
            log.addHandler(handler)
            log.propagate = False
            log.setLevel(logging.INFO if name != "httpx" else logging.WARNING)

    def _restore_logs(self) -> None:
        handler = self._log_handler
        if handler is None:
            return
        for name, (level, propagate) in self._saved_levels.items():
            log = logging.getLogger(name)
            log.removeHandler(handler)
            log.setLevel(level)
            log.propagate = propagate
        handler.close()
        self._log_handler = None

    # ------------------------------------------------------------------ the script

    def run(self) -> DemoResult:
        """Run the script; return what was observed.  Call :meth:`close` afterwards."""
        result = DemoResult()
        out = self.out
        print(
            "botkit-tasks demo: a bot, a simulated fediverse and Dramatiq workers on loopback",
            file=out,
        )
        self._setup()
        assert self.bot is not None and self.remote is not None
        bot, remote = self.bot, self.remote
        print(f"  bot        {bot.actor_id}  ({bot.handle})", file=out)
        print(
            f"  remote     {self.n_followers} accounts on {len(remote.instances)} simulated "
            f"servers: {', '.join(i.base for i in remote.instances.values())}",
            file=out,
        )
        print(f"  storage    SQLite {self.db_path} (KV store and SqlBroker, one engine)", file=out)
        assert self._workers is not None
        print(
            f"  workers    `dramatiq` with {self.processes} processes x {self.threads} threads "
            f"(pids {' '.join(map(str, self._workers.pids()))}); log in {self.log_path}",
            file=out,
        )
        print(file=out)
        self._progress = Progress(out, self._render, live=self.live)
        self._progress.start()

        # Phase 1: everyone follows the bot.
        self._enter(
            1, "remote accounts follow the bot (signed Follow -> inbox job -> signed Accept)"
        )
        failures = self._send_follows(bot, remote)
        if failures:
            result.problems.append(f"{failures} Follow requests were not answered 202")
        phase1 = self._wait(lambda: remote.accepted_count() >= self.n_followers)
        followers_stored = bot.federation.followers.count()
        if not phase1:
            result.problems.append(
                f"only {remote.accepted_count()} of {self.n_followers} follows accepted in time"
            )
        self._progress.say(
            f"  phase 1 done in {time.monotonic() - self.phase_started:.1f} s: "
            f"{remote.accepted_count()} follows accepted, {followers_stored} followers stored"
        )

        # Phase 2: publish and watch the fan-out.
        self._enter(2, "the bot publishes a note: one fan-out job, one delivery job per inbox")
        self.activity_id = bot.publish(
            "Hello, fediverse! This note was delivered by Dramatiq workers from a SQLite queue."
        )
        phase2 = self._wait(self._deliveries_settled)
        with contextlib.suppress(Exception):
            self.broker.join("botkit.outbox", timeout=5_000)
        if not phase2:
            result.problems.append("deliveries did not settle in time")
        self._progress.say(f"  phase 2 done in {time.monotonic() - self.phase_started:.1f} s")
        self._progress.stop()
        self._progress = None

        result.seconds = time.monotonic() - self.started
        result.checks = self._checks(followers_stored)
        if remote.signature_failures:
            result.problems.append(
                f"{len(remote.signature_failures)} requests failed signature verification, "
                f"e.g. {remote.signature_failures[0]}"
            )
        if remote.bad_accepts:
            result.problems.append(f"{len(remote.bad_accepts)} malformed Accepts")
        self._summary(result)
        return result

    def _enter(self, number: int, text: str) -> None:
        self.phase_no = number
        self.phase = text
        self.phase_started = time.monotonic()
        if self._progress is not None:
            self._progress.say(f"Phase {number}/2: {text}")
            self._progress.draw()

    def _wait(self, done: Any, timeout: float = PHASE_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done():
                return True
            time.sleep(0.1)
        return bool(done())

    def _send_follows(self, bot: Bot, remote: RemoteFediverse) -> int:
        import httpx

        inbox = bot.federation.inbox_url

        def follow(actor: RemoteActor, client: httpx.Client) -> bool:
            # As a real server does, a 429 (the inbox's flood limits) is retried
            # after its Retry-After.
            for _ in range(20):
                headers, body = remote.signed_follow(actor, bot.actor_id, inbox)
                try:
                    response = client.post(inbox, headers=headers, content=body)
                except httpx.HTTPError:
                    return False
                if response.status_code != 429:
                    return response.status_code == 202
                time.sleep(min(float(response.headers.get("retry-after", "1")), 5.0))
            return False

        limits = httpx.Limits(max_connections=16)
        pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="botkit-demo-follow")
        try:
            with httpx.Client(timeout=10.0, limits=limits) as client:
                actors = list(remote.actors.values())
                results = list(pool.map(lambda a: follow(a, client), actors))
        finally:
            # On Ctrl-C, do not send the follows that have not started yet.
            pool.shutdown(wait=True, cancel_futures=True)
        return results.count(False)

    # ------------------------------------------------------------------ observation

    def _actors(self, behaviour: str) -> list[RemoteActor]:
        assert self.remote is not None
        return [a for a in self.remote.actors.values() if a.behaviour == behaviour]

    def _queue_stats(self) -> list[QueueStats]:
        # The display and the waits both want these; read at most every 0.2 s.
        now = time.monotonic()
        if now - self._queues_at > 0.2:
            from ..monitor import inspect

            try:
                self._queues = inspect(self.broker).queues()
            except Exception:
                logger.debug("demo: queue stats unavailable", exc_info=True)
            self._queues_at = now
        return self._queues

    def _outbox_busy(self) -> int:
        return sum(
            q.ready + q.delayed + q.in_flight
            for q in self._queue_stats()
            if q.name in ("botkit.outbox", "botkit.fanout")
        )

    def _deliveries_settled(self) -> bool:
        assert self.remote is not None
        remote = self.remote
        with remote.lock:
            a_inboxes = [
                a for a in remote.actors.values() if a.instance == "a" and a.behaviour != "gone"
            ]
            waiting = [
                a for a in a_inboxes if a.behaviour != "hanging" and 202 not in a.create_statuses
            ]
            shared_done = 202 in remote.instances["b"].shared_statuses
            gone_done = all(410 in a.create_statuses for a in self._actors("gone"))
            hang_done = all(
                len(a.create_statuses) >= DEMO_DELIVERY.max_retries + 1
                for a in self._actors("hanging")
            )
        if not (not waiting and shared_done and gone_done):
            return False
        # The hanging inbox is done when its last attempt was made or (should an
        # attempt never have reached the server) when its message is dead.
        dead = sum(q.dead for q in self._queue_stats() if q.name == "botkit.outbox")
        return (hang_done or dead > 0) and self._outbox_busy() == 0

    def _render(self, live: bool) -> list[str]:
        assert self.remote is not None
        return render_progress(
            self.remote,
            self._queue_stats(),
            elapsed=time.monotonic() - self.started,
            phase=self.phase_no,
            n_followers=self.n_followers,
            expected_inboxes=self.expected_inboxes,
            live=live,
        )

    def _checks(self, followers_stored: int) -> list[Check]:
        assert self.remote is not None and self.bot is not None
        from ..monitor import inspect

        remote = self.remote
        insp = inspect(self.broker)
        dead = insp.dead_letters()
        with remote.lock:
            a_actors = [a for a in remote.actors.values() if a.instance == "a"]
            delivered = sum(1 for a in a_actors if 202 in a.create_statuses)
            shared = remote.instances["b"].shared_statuses
            delivered += 1 if 202 in shared else 0
            attempted = sum(1 for a in a_actors if a.create_statuses) + (1 if shared else 0)
            # Only the scripted failures count: on a loaded machine a normal inbox
            # may also be retried once (a reply slower than the 1 s demo timeout),
            # which is the system working, not a deviation from the script.
            retried = sum(
                1
                for a in a_actors
                if a.behaviour in ("flaky", "limited")
                and 202 in a.create_statuses
                and len(a.create_statuses) > 1
            )
            self.unscripted_retries = sum(
                1
                for a in remote.actors.values()
                if a.behaviour == "normal" and len(a.create_statuses) > 1
            ) + max(len(shared) - 1, 0)
            gone = sum(1 for a in a_actors if 410 in a.create_statuses)
            hanging = self._actors("hanging")
            hang_attempts = sum(len(a.create_statuses) for a in hanging)
            accepted = sum(1 for a in remote.actors.values() if a.accepted)
        dead_deliveries = [d for d in dead if d.actor == "botkit_deliver"]
        self.dead_letters = dead
        n = self.n_followers
        return [
            Check("follows accepted (signed Accept verified)", n, accepted),
            Check("followers stored before publishing", n, followers_stored),
            Check("inboxes the fan-out delivered to", self.expected_inboxes, attempted),
            Check("delivered (2xx, signature verified)", self.expected_inboxes - 2, delivered),
            Check("delivered after retries (500s, 429)", self.expected_flaky + 1, retried),
            Check("permanently failed: 410 Gone", 1, gone),
            Check(
                "attempts at the hanging inbox (1 + max_retries)",
                DEMO_DELIVERY.max_retries + 1,
                hang_attempts,
            ),
            Check("dead letters (retries exhausted)", 1, len(dead_deliveries)),
            Check("other dead letters", 0, len(dead) - len(dead_deliveries)),
            Check(
                "followers after the 410 dropped one", n - 1, self.bot.federation.followers.count()
            ),
        ]

    def _summary(self, result: DemoResult) -> None:
        print_summary(
            self.out,
            result,
            unscripted_retries=getattr(self, "unscripted_retries", 0),
            dead_letters=getattr(self, "dead_letters", []),
            log_path=self.log_path,
            keep=self.keep,
            db_path=self.db_path,
        )

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop everything this demo started; safe to call more than once and after errors.

        Each step runs even when an earlier one fails (a failure is logged to
        ``demo.log``), so no thread, socket or temporary file is left behind.
        """
        if self._progress is not None:
            self._step(lambda p=self._progress: p.stop(final=False))
            self._progress = None
        if self._workers is not None:
            self._step(self._workers.stop)
            self._workers = None
        if self.remote is not None:
            self.remote.stopping.set()  # ends hanging requests
        for server in self._servers:
            self._step(server.stop)
        self._servers = []
        if self.bot is not None:
            self._step(self.bot.close)
        for closer in ("broker", "kv", "engine"):
            obj = getattr(self, closer, None)
            if obj is not None:
                self._step(obj.dispose if closer == "engine" else obj.close)
                setattr(self, closer, None)
        self._restore_logs()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _step(self, action: Any) -> None:
        try:
            action()
        except Exception:
            logger.exception("demo: error while shutting down")
