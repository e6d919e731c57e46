"""**Where requests arrive**: event dispatch, jobs, the HTTP API, NATS, schedules, metrics.

``dispatch``      events to handlers, in order per domain
``job_requests``  what a job request may say: one gate for HTTP, NATS and schedules
``jobs``          the job runner: queue, limits, cancellation, deadlines, shutdown
``job_store``     the durable job store
``api``           the HTTP API, ``/metrics``, ``/healthz``, ``/readyz``; ``openapi`` its document
``gate``          what every request must pass first: ``Host``, token, media type
``credentials``   the API's bearer token: made once, root-only, read by the agent and the CLI
``messages``      **where scheduler messages arrive**: NATS JetStream
``schedules``     local cron schedules
``metrics``       Prometheus metrics and the event-loop lag probe

May import: :mod:`agent.backup` and every layer below it. Not :mod:`handlers`,
:mod:`agent.service` or :mod:`agent.cli`.
"""
