"""Where scheduler messages arrive: job requests over NATS JetStream, job events back.

A central scheduler publishes job requests (the JSON body of ``POST /v1/jobs``) on
``<prefix>.<host>.jobs``; :class:`SchedulerMessages` consumes them through a durable pull
consumer named ``agent-<host>`` and hands each to the agent's :class:`JobSink`. Every job
state change is published back, as JSON, on ``<prefix>.<host>.events``. Both subjects
are stored by JetStream (in the configured stream, unless a stream already covers them),
so requests wait for an agent that is away, and the scheduler may read events it missed.

``<host>`` is the agent's host id with every character outside ``[A-Za-z0-9_-]``
replaced by ``_``: a dot would split the subject into more tokens, and ``*``, ``>`` and
spaces are not allowed in subjects at all. (So ``db.1`` and ``db_1`` share subjects;
give such hosts distinct ids.) The events themselves carry the host id unchanged.

Delivery guarantees
    JetStream delivers each request at least once: a message stays pending until the
    agent acknowledges it, and is redelivered when the agent does not acknowledge it
    within ``ack_wait`` (crash, lost connection) or asks for redelivery (``nak``). The
    agent acknowledges a request only after :meth:`JobSink.submit` returned, that is
    after the job is durably recorded; a crash in between means a redelivery. Job ids
    make the redelivery harmless: submitting an id seen before returns the existing job
    (``created`` False), which is acknowledged like the first. At-least-once delivery
    plus idempotent job ids: exactly one job. (A request without an ``id`` gets a fresh
    one each time it is submitted, so the scheduler must set ``id`` for this to hold.)

    Requests that can never succeed (not JSON, invalid fields, an id reused for a
    different request) are answered with a ``request-rejected`` event and acknowledged
    once JetStream has stored that event (if it cannot, the request is ``nak``-ed and
    comes back): redelivering them would only repeat the refusal. Requests the agent
    cannot take *now* (stopping, job store failing) are ``nak``-ed with a delay and
    come back later.

    The end of every job (succeeded, failed, cancelled; of any source, not only of
    NATS requests) is published at least once. The job store records it in its outbox
    in the same transaction as the job's finished state (:mod:`agent.control.job_store`);
    an entry leaves the outbox only once JetStream has acknowledged its event. The
    outbox is published at the start of every session and after every reconnection
    (once the stream is ensured), whenever a job ends, and every
    :data:`OUTBOX_RECHECK` seconds; a failed publish is tried again with back-off. So a
    job the agent was killed in, reported ``agent-restarted`` by the next start, is
    announced as soon as NATS is reachable, however long that takes (up to ``[jobs]
    keep_finished_days``: an entry goes with its job). Every event carries the header
    ``Nats-Msg-Id: <host>:<job id>:<state>``: JetStream drops a second copy published
    within the stream's duplicate window (two minutes by default), e.g. after a crash
    between the acknowledgement and the outbox's update; later copies reach the
    scheduler, which must take an end it has seen as a no-op.

    The other job events (queued, running) are best effort: they are queued in memory
    (bounded; the oldest is dropped when full) and published with a timeout; a failed
    publish is logged, not retried. The job store, not the event stream, is the record
    of a job.

Stream set-up
    Adding our subjects to an existing stream is a read-modify-write (JetStream has no
    conditional update), so agents starting at the same moment can overwrite each
    other's subjects, and two can try to create the stream at once. After any change
    the agent waits a random moment (:data:`STREAM_SETTLE`), reads the subjects again
    and adds what is missing again, up to :data:`STREAM_ATTEMPTS` rounds; a stream
    another agent created first ("stream name already in use") is read and updated.
    While consuming it checks every :data:`STREAM_CHECK_INTERVAL` seconds that its
    subjects are still stored, and sets them up again if not.

Connection
    nats-py reconnects by itself once connected; the first connection (and a session
    that fails, e.g. because JetStream refuses the stream) is retried by :meth:`run`
    with exponential back-off from 1 s to 30 s, each delay up to a quarter longer at
    random (:mod:`agent.core.retry`). After every reconnection the stream and the
    consumer are ensured again, in case the server came back without its store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from pathlib import Path
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck

from agent.control.job_requests import MAX_REQUEST_BYTES, Job, JobSink, parse_request
from agent.core.config import NatsSection
from agent.core.errors import (
    JobConflictError,
    JobError,
    JobsClosedError,
    MessagingError,
    RequestError,
)
from agent.core.faults import Faults, no_faults
from agent.core.logs import get_logger
from agent.core.retry import Backoff, retry_forever
from agent.core.shielding import to_completion

log = get_logger("messages")

_SUBJECT_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_-]")

FETCH_BATCH: Final = 8
#: Deliveries of a request the agent could not record (store failing) before it is
#: answered with an error event and dropped instead of redelivered again.
MAX_ATTEMPTS: Final = 20
#: Seconds a stream the agent creates keeps requests and events.
STREAM_MAX_AGE: Final = 7 * 86400.0
FETCH_TIMEOUT: Final = 2.0
RETRY_FIRST_DELAY: Final = 1.0
RETRY_MAX_DELAY: Final = 30.0
EVENT_QUEUE_SIZE: Final = 10_000
PUBLISH_TIMEOUT: Final = 5.0
#: Job ends read from the outbox at a time.
OUTBOX_BATCH: Final = 100
#: Seconds between looks at the outbox when nothing woke the publisher.
OUTBOX_RECHECK: Final = 30.0
#: Back-off of a failed outbox publish, in seconds.
OUTBOX_RETRY_FIRST: Final = 1.0
OUTBOX_RETRY_MAX: Final = 30.0
#: Rounds of adding our subjects to the stream before the session fails (and is retried).
STREAM_ATTEMPTS: Final = 10
#: Random pause (seconds) after changing the stream, before reading it back.
STREAM_SETTLE: Final = (0.1, 0.4)
#: Seconds between checks, while consuming, that the stream still holds our subjects.
STREAM_CHECK_INTERVAL: Final = 60.0
#: JetStream's error code for add_stream on a name taken with another configuration.
STREAM_NAME_IN_USE: Final = 10058
MSG_ID: Final = "Nats-Msg-Id"
CLOSE_TIMEOUT: Final = 5.0
# nats-py's default (two missed pings, two minutes apart) notices a silently dead server
# only after four minutes; three missed pings 20 s apart take one.
PING_INTERVAL: Final = 20
MAX_OUTSTANDING_PINGS: Final = 3


def subject_token(host_id: str) -> str:
    """``host_id`` as one NATS subject token: anything outside [A-Za-z0-9_-] becomes '_'."""
    if not host_id:
        raise ValueError("host id must not be empty")
    return _SUBJECT_UNSAFE.sub("_", host_id)


class SchedulerMessages:
    """Consumes job requests and publishes job events for one host (see module docstring).

    ``faults`` is called with ``"nats:before-ack"`` between a successful submit and its
    acknowledgement (tests crash there); ``nak_delay`` is how long JetStream waits before
    redelivering a request the agent could not take now.
    """

    def __init__(
        self,
        settings: NatsSection,
        host_id: str,
        jobs: JobSink,
        *,
        faults: Faults = no_faults,
        nak_delay: float = 5.0,
    ) -> None:
        self._settings = settings
        self._host_id = host_id
        self._jobs = jobs
        self._faults = faults
        self._nak_delay = nak_delay
        token = subject_token(host_id)
        self.jobs_subject: Final = f"{settings.subject_prefix}.{token}.jobs"
        self.events_subject: Final = f"{settings.subject_prefix}.{token}.events"
        self.consumer_name: Final = f"agent-{token}"
        self._nc: Client | None = None
        # None: "look at the outbox", queued where a job ended so events stay in order.
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=EVENT_QUEUE_SIZE)
        self._token = token
        self._overflow_logged = False
        self._received = 0
        self._rejected = 0
        self._events_dropped = 0

    @property
    def messages_received(self) -> int:
        """Request messages delivered to the agent (redeliveries count again)."""
        return self._received

    @property
    def messages_rejected(self) -> int:
        """Requests refused with a ``request-rejected`` event (and acknowledged)."""
        return self._rejected

    @property
    def events_dropped(self) -> int:
        """Job events dropped because the event queue was full."""
        return self._events_dropped

    @property
    def connected(self) -> bool:
        """True while a connection to the NATS server is up."""
        return self._nc is not None and self._nc.is_connected

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Consume requests until cancelled; ``ready`` is set once consuming.

        Never returns and never raises an :class:`Exception`: failures are logged and
        retried with back-off. Cancellation closes the connection.
        """
        unsubscribe = self._jobs.subscribe(self._on_job)
        backoff = Backoff(RETRY_FIRST_DELAY, RETRY_MAX_DELAY)
        try:
            await retry_forever(
                lambda consuming: self._session(consuming, ready),
                backoff,
                self._unavailable,
                retry_on=(Exception,),  # the agent must survive any failure here
            )
        finally:
            unsubscribe()

    def _unavailable(self, delay: float, error: Exception | None) -> None:
        if error is not None:
            log.warning(
                "scheduler messages unavailable",
                url=self._settings.url,
                error=str(error) or type(error).__name__,
                retry_in=delay,
            )

    async def _session(self, consuming: asyncio.Event, ready: asyncio.Event | None) -> None:
        """One connection's life: connect, set up, consume; returns only by raising."""
        reconnected = asyncio.Event()
        nc = await self._connect(reconnected)
        self._nc = nc
        publisher: asyncio.Task[None] | None = None
        try:
            js = nc.jetstream()
            sub = await self._subscribe(js)
            # The publisher starts with the outbox: ends recorded while no session ran.
            publisher = asyncio.create_task(self._publish_events(js), name="nats-events")
            log.info("consuming job requests", subject=self.jobs_subject)
            consuming.set()
            if ready is not None:
                ready.set()
            next_check = time.monotonic() + STREAM_CHECK_INTERVAL
            while True:
                lost = False
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + STREAM_CHECK_INTERVAL
                    lost = not await self._subjects_stored(js)
                if reconnected.is_set() or lost:
                    reconnected.clear()
                    with contextlib.suppress(nats.errors.Error):
                        await sub.unsubscribe()
                    sub = await self._subscribe(js)
                    self._enqueue(None)  # the stream is there again: publish the outbox
                await self._consume_batch(js, sub)
        finally:
            self._nc = None
            if publisher is not None:
                publisher.cancel()
                await asyncio.wait([publisher], timeout=CLOSE_TIMEOUT)
            await to_completion(_close(nc))

    async def _connect(self, reconnected: asyncio.Event) -> Client:
        token = await self._read_token()
        established = False
        failures: list[str] = []  # before the first connection; run() reports them

        async def on_error(exc: Exception) -> None:
            text = str(exc) or type(exc).__name__
            if established:
                log.warning("nats connection error", error=text)
            elif text not in failures:
                failures.append(text)

        async def on_disconnected() -> None:
            # Also called when the agent itself closes the connection: that is no news.
            if established and not nc.is_closed:
                log.warning("nats disconnected", url=self._settings.url)

        async def on_reconnected() -> None:
            log.info("nats reconnected", url=self._settings.url)
            reconnected.set()

        nc = Client()
        try:
            await nc.connect(
                servers=[self._settings.url],
                name=f"backup-agent {self._host_id}",
                token=token,
                # nats-py annotates int but only hands it to asyncio timeouts.
                connect_timeout=self._settings.connect_timeout,  # type: ignore[arg-type]
                # With -1 the first connect would retry inside nats-py forever, out of
                # sight; a small limit hands failures to run()'s back-off instead.
                max_reconnect_attempts=1,
                ping_interval=PING_INTERVAL,
                max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            )
        except BaseException as exc:
            await to_completion(_close(nc))
            if isinstance(exc, Exception):
                # nats-py ends with "no servers available"; the attempts' errors say why.
                why = "; ".join(failures) or str(exc) or type(exc).__name__
                raise MessagingError(f"cannot connect to {self._settings.url}: {why}") from exc
            raise
        # Once connected, nats-py itself reconnects, forever.
        nc.options["max_reconnect_attempts"] = -1
        established = True
        log.info("nats connected", url=self._settings.url)
        return nc

    async def _read_token(self) -> str | None:
        path = self._settings.token_file
        if not path:
            return None
        try:
            token = (await asyncio.to_thread(Path(path).read_text)).strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise MessagingError(f"cannot read the NATS token file {path}: {exc}") from exc
        if not token:
            raise MessagingError(f"the NATS token file {path} is empty")
        return token

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        """Ensure the stream and the durable consumer, and bind a pull subscription."""
        try:
            stream = await self._ensure_stream(js)
            config = ConsumerConfig(
                name=self.consumer_name,
                durable_name=self.consumer_name,
                description=f"job requests for backup agent {self._host_id}",
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._settings.ack_wait,
                max_deliver=-1,
                filter_subject=self.jobs_subject,
            )
            # Creates the consumer, or updates it (e.g. a new ack_wait) if it exists.
            await js.add_consumer(stream, config)
            return await js.pull_subscribe_bind(durable=self.consumer_name, stream=stream)
        except nats.errors.Error as exc:
            raise MessagingError(
                f"cannot set up the JetStream consumer {self.consumer_name}: "
                f"{exc or type(exc).__name__}"
            ) from exc

    async def _ensure_stream(self, js: JetStreamContext) -> str:
        """The name of the stream holding our requests; our subjects added where missing.

        A subject already covered by some stream (e.g. one the scheduler made for
        ``<prefix>.>``) stays there; the others go into ``settings.stream``, which is
        created if it does not exist. Safe against other agents doing the same at the
        same moment (see "Stream set-up" in the module docstring).
        """
        name = self._settings.stream
        missing: list[str] = []
        for _ in range(STREAM_ATTEMPTS):
            owners, missing = await self._owners(js)
            if not missing:
                return owners[self.jobs_subject]
            await self._add_subjects(js, name, missing)
            # An agent that read the stream before our change may still write its old
            # subjects back: look again once such a write has had time to land.
            await asyncio.sleep(random.uniform(*STREAM_SETTLE))
        raise MessagingError(
            f"the subjects {', '.join(missing)} are still missing from the JetStream stream "
            f"{name} after {STREAM_ATTEMPTS} attempts to add them (other agents changing it "
            "at the same moment?); retrying the set-up"
        )

    async def _owners(self, js: JetStreamContext) -> tuple[dict[str, str], list[str]]:
        """Which stream stores each of our subjects, and the subjects none stores."""
        owners: dict[str, str] = {}
        missing: list[str] = []
        for subject in (self.jobs_subject, self.events_subject):
            try:
                owners[subject] = await js.find_stream_name_by_subject(subject)
            except nats.js.errors.NotFoundError:
                missing.append(subject)
        return owners, missing

    async def _add_subjects(self, js: JetStreamContext, name: str, missing: list[str]) -> None:
        """One read-modify-write of the stream ``name``: create it, or add ``missing``."""
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            try:
                # Kept a week: well within the job store's memory of finished jobs
                # ([jobs] keep_finished_days), so a replayed request with an id is
                # recognised as the job it already was.
                await js.add_stream(name=name, subjects=missing, max_age=STREAM_MAX_AGE)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != STREAM_NAME_IN_USE:
                    raise
                # Another agent created it first, with its own subjects: the next round
                # reads it and adds ours.
                log.info("stream created by another agent meanwhile", stream=name)
            else:
                log.info("stream created", stream=name, subjects=missing)
            return
        subjects = list(info.config.subjects or [])
        subjects += [s for s in missing if s not in subjects]
        await js.update_stream(info.config.evolve(subjects=subjects))
        log.info("stream subjects added", stream=name, subjects=missing)

    async def _subjects_stored(self, js: JetStreamContext) -> bool:
        """False if some stream no longer stores one of our subjects (overwritten by a
        racing agent, or the server lost its store without us reconnecting)."""
        try:
            _, missing = await self._owners(js)
        except nats.errors.Error as exc:
            # A slow or away server says nothing about the subjects; look again later.
            log.info("cannot check the stream's subjects", error=str(exc) or type(exc).__name__)
            return True
        if missing:
            log.warning("our subjects are missing from the stream; adding them", subjects=missing)
        return not missing

    async def _consume_batch(
        self, js: JetStreamContext, sub: JetStreamContext.PullSubscription
    ) -> None:
        try:
            msgs = await sub.fetch(batch=FETCH_BATCH, timeout=FETCH_TIMEOUT)
        except nats.errors.TimeoutError:
            return  # no requests waiting
        for msg in msgs:
            await self._handle(js, msg)

    async def _handle(self, js: JetStreamContext, msg: Msg) -> None:
        """Submit one request; ack once it is recorded, reject or nak otherwise."""
        self._received += 1
        try:
            request = parse_request(msg.data)
            job, created = await self._jobs.submit(request, source="nats")
        except (RequestError, JobConflictError) as exc:
            await self._reject(js, msg, exc)
            return
        except Exception as exc:  # JobsClosedError, JobStoreError, or a bug: try later
            attempts = _delivered(msg)
            if not isinstance(exc, JobsClosedError) and attempts >= MAX_ATTEMPTS:
                # A poison message is not redelivered forever: it is answered and dropped.
                failed = JobError(
                    f"the request could not be recorded after {attempts} attempts: {exc}",
                    code="undeliverable",
                )
                await self._reject(js, msg, failed)
                return
            log.warning(
                "request not taken now, redelivery requested",
                stream_seq=_stream_seq(msg),
                error=str(exc) or type(exc).__name__,
                error_type=type(exc).__name__,
                redeliver_in=self._nak_delay,
            )
            await self._settle(msg, "nak")
            return
        log.info(
            "request submitted" if created else "duplicate request",
            job=job.id,
            stream_seq=_stream_seq(msg),
        )
        self._faults("nats:before-ack")
        await self._settle(msg, "ack")

    async def _reject(self, js: JetStreamContext, msg: Msg, exc: JobError) -> None:
        field = exc.field if isinstance(exc, RequestError) else None
        request_id = _request_id(msg.data)
        stream_seq = _stream_seq(msg)
        log.warning(
            "request rejected",
            code=exc.code,
            error=str(exc),
            field=field,
            request_id=request_id,
            stream_seq=stream_seq,
        )
        event = {
            "type": "request-rejected",
            "host": self._host_id,
            "error": {"code": exc.code, "message": str(exc), "field": field},
            "request_id": request_id,
            "stream_seq": stream_seq,
        }
        # The refusal is the request's only answer: acknowledged once it is stored.
        msg_id = None if stream_seq is None else f"{self._token}:request-{stream_seq}:rejected"
        try:
            await self._publish(js, event, msg_id)
        except Exception as error:
            log.warning(
                "refusal not published; redelivery requested",
                stream_seq=stream_seq,
                error=str(error) or type(error).__name__,
            )
            await self._settle(msg, "nak")
            return
        self._rejected += 1
        await self._settle(msg, "ack")

    async def _settle(self, msg: Msg, how: str) -> None:
        # A lost ack or nak costs a redelivery after ack_wait, which job ids make harmless.
        try:
            if how == "ack":
                await msg.ack()
            else:
                await msg.nak(delay=self._nak_delay)
        except nats.errors.Error as exc:
            log.warning(
                f"{how} failed", stream_seq=_stream_seq(msg), error=str(exc) or type(exc).__name__
            )

    def _on_job(self, job: Job) -> None:
        # A JobSink listener: called on the loop thread, must neither block nor raise.
        try:
            # A finished job's end is in the outbox already: the publisher reads it from
            # there, after the events queued before it.
            self._enqueue(None if job.state.finished else self._job_event(job))
        except Exception:
            log.exception("cannot queue job event", job=job.id)

    def _job_event(self, job: Job) -> dict[str, Any]:
        return {"type": "job", "host": self._host_id, "job": job.to_json()}

    def _enqueue(self, event: dict[str, Any] | None) -> None:
        if self._events.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._events.get_nowait()  # a dropped None is made up by OUTBOX_RECHECK
            self._events_dropped += 1
            if not self._overflow_logged:
                self._overflow_logged = True
                log.warning("event queue full, dropping the oldest events", size=EVENT_QUEUE_SIZE)
        self._events.put_nowait(event)

    async def _publish_events(self, js: JetStreamContext) -> None:
        """The session's publisher: the outbox first, then events as they come, the
        outbox again whenever a job ended and every OUTBOX_RECHECK seconds; after a
        failure, again with back-off (not at every event) until it is empty."""
        outbox_due = True
        retry_at = 0.0  # monotonic time before which a failed outbox is not tried again
        delay = OUTBOX_RETRY_FIRST
        while True:
            if outbox_due and time.monotonic() >= retry_at:
                if await self._publish_outbox(js):
                    outbox_due, delay = False, OUTBOX_RETRY_FIRST
                else:
                    retry_at = time.monotonic() + delay
                    delay = min(delay * 2, OUTBOX_RETRY_MAX)
            wait = max(0.0, retry_at - time.monotonic()) if outbox_due else OUTBOX_RECHECK
            try:
                event = await asyncio.wait_for(self._events.get(), wait)
            except TimeoutError:
                outbox_due = True
                continue
            if event is None:
                outbox_due = True
            else:
                await self._publish_best_effort(js, event)
            if self._events.empty():
                self._overflow_logged = False

    async def _publish_outbox(self, js: JetStreamContext) -> bool:
        """Publish every unpublished job end the store holds; False if one failed."""
        while True:
            try:
                ends = await self._jobs.unpublished_ends(OUTBOX_BATCH)
            except Exception as exc:  # the store failing: try again later
                log.warning("cannot read the job ends to publish", error=str(exc))
                return False
            for job in ends:
                try:
                    ack = await self._publish(js, self._job_event(job), self._msg_id(job))
                    await self._jobs.end_published(job.id)
                except Exception as exc:  # kept in the outbox, published again later
                    log.warning(
                        "job end not published yet; will retry",
                        job=job.id,
                        state=job.state.value,
                        error=str(exc) or type(exc).__name__,
                    )
                    return False
                log.info("job end published", job=job.id, state=job.state.value, dup=ack.duplicate)
            if len(ends) < OUTBOX_BATCH:
                return True

    async def _publish_best_effort(self, js: JetStreamContext, event: dict[str, Any]) -> None:
        job = event.get("job")
        msg_id = None
        if isinstance(job, dict):
            msg_id = f"{self._token}:{job.get('id')}:{job.get('state')}"
        try:
            await self._publish(js, event, msg_id)
        except Exception as exc:  # a publisher that died would silence every event
            log.warning(
                "event not published",
                type=event.get("type"),
                error=str(exc) or type(exc).__name__,
            )

    async def _publish(
        self, js: JetStreamContext, event: dict[str, Any], msg_id: str | None
    ) -> PubAck:
        """Publish ``event`` on the events subject; returns once JetStream stored it."""
        payload = json.dumps(event).encode()
        headers = None if msg_id is None else {MSG_ID: msg_id}
        return await js.publish(
            self.events_subject, payload, timeout=PUBLISH_TIMEOUT, headers=headers
        )

    def _msg_id(self, job: Job) -> str:
        """The event's ``Nats-Msg-Id``: one per job and state, so copies are dropped."""
        return f"{self._token}:{job.id}:{job.state.value}"


async def _close(nc: Client) -> None:
    try:
        await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)
    except TimeoutError:
        log.warning("closing the nats connection timed out")
    except nats.errors.Error as exc:
        log.warning("closing the nats connection failed", error=str(exc) or type(exc).__name__)


def _request_id(data: bytes) -> str | None:
    """The ``id`` of a (possibly invalid) request, if it is a JSON object with a string id."""
    if len(data) > MAX_REQUEST_BYTES:
        return None
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if isinstance(body, dict) and isinstance(body.get("id"), str):
        request_id: str = body["id"]
        return request_id
    return None


def _stream_seq(msg: Msg) -> int | None:
    try:
        return msg.metadata.sequence.stream
    except (nats.errors.Error, ValueError, IndexError):
        return None


def _delivered(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except (AttributeError, TypeError, ValueError, nats.errors.Error):
        return 1
