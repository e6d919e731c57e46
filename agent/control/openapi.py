"""The OpenAPI 3.1 document of the HTTP API, served at ``/v1/openapi.json``.

The request schema is generated from :class:`agent.control.job_requests.JobRequest`, the same
model that validates requests, so the document cannot drift from what is accepted.
"""

from __future__ import annotations

import functools
from typing import Any

from agent.control.job_requests import JOB_ID_RE, JobRequest, JobState

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _reply(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref(schema)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Invalid request (error.field names what is wrong), or a Host header that "
        "names no address of the agent (code host-not-allowed)",
        401: "Missing or wrong bearer token",
        404: "No such job, domain or backup",
        409: "The id belongs to a different request, or the job has ended",
        413: "Request body too large",
        415: "The body is not application/json",
        503: "The agent is starting or stopping, or its store is unavailable",
    }
    return {str(s): _reply(text[s], "Error") for s in statuses}


_JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": f"^{JOB_ID_RE.pattern}$"},
}
_DOMAIN = {
    "name": "domain",
    "in": "path",
    "required": True,
    "description": "Domain name or UUID",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[^/]+$"},
}

_JOB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "kind", "domain", "state", "request", "created_at", "progress"],
    "properties": {
        "id": {"type": "string"},
        "kind": {"enum": ["backup", "restore", "verify", "reconcile"]},
        "domain": {"type": "string"},
        "state": {"enum": [s.value for s in JobState]},
        "source": {"enum": ["http", "nats", "schedule", "cli"]},
        "request": {"type": "object"},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": {"type": ["string", "null"], "format": "date-time"},
        "finished_at": {"type": ["string", "null"], "format": "date-time"},
        "progress": {
            "type": "object",
            "properties": {
                "done_bytes": {"type": "integer"},
                "total_bytes": {"type": "integer"},
            },
        },
        "backup_id": {"type": ["string", "null"]},
        "disks": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "target": {"type": "string"},
                    "mode": {
                        "enum": ["full", "incremental", "excluded"],
                        "description": "excluded: the disk is in no backup (reason says "
                        "why, nothing copied)",
                    },
                    "reason": {"type": ["string", "null"]},
                    "bytes_copied": {"type": "integer"},
                },
            },
        },
        "error": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                },
            ]
        },
        "result": {"type": "object"},
    },
}

_NULLABLE_STRING: dict[str, Any] = {"type": ["string", "null"]}

_DOMAIN_DISK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["target", "chain_valid", "reason", "detail", "backup", "backup_reason"],
    "properties": {
        "target": {"type": "string"},
        "chain_valid": {
            "type": ["boolean", "null"],
            "description": "The disk's chain in the ledger; null without one (e.g. raw)",
        },
        "reason": {**_NULLABLE_STRING, "description": "Why the chain is broken"},
        "detail": _NULLABLE_STRING,
        "backup": {
            "enum": ["incremental", "full", "excluded", None],
            "description": "How backups treat the disk today; null for a disk only the "
            "ledger knows (no longer attached)",
        },
        "backup_reason": {
            **_NULLABLE_STRING,
            "description": "Why full (e.g. format-raw: no persistent bitmap) or excluded "
            "(e.g. device-cdrom, readonly, shareable, excluded-by-config)",
        },
    },
}

_DOMAINS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["domains"],
    "properties": {
        "domains": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "name",
                    "uuid",
                    "state",
                    "disks",
                    "partial",
                    "partial_disks",
                    "not_backed_up",
                ],
                "properties": {
                    "name": {"type": "string"},
                    "uuid": _NULLABLE_STRING,
                    "state": {"type": "string", "description": "undefined: not in libvirt"},
                    "disks": {"type": "array", "items": _ref("DomainDisk")},
                    "partial": {
                        "type": ["boolean", "null"],
                        "description": "A writable disk is in no backup, not on purpose; "
                        "null when libvirt does not know the domain",
                    },
                    "partial_disks": {
                        "type": ["array", "null"],
                        "items": {"type": "string"},
                        "description": "The targets that make the domain partial: "
                        "writable, in no backup, not left out by configuration",
                    },
                    "not_backed_up": {
                        "type": ["array", "null"],
                        "description": "Every disk left out of backups, and why",
                        "items": {
                            "type": "object",
                            "required": ["target", "reason"],
                            "properties": {
                                "target": {"type": "string"},
                                "reason": {"type": "string"},
                            },
                        },
                    },
                    "last_backup": {"type": ["object", "null"]},
                    "backups": {"type": "integer"},
                    "chain_length": {"type": "integer"},
                    "repository_problem": _NULLABLE_STRING,
                },
            },
        }
    },
}

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": "string"},
            },
        }
    },
}


@functools.cache
def openapi_document() -> dict[str, Any]:
    request = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    get_list = {"type": "object", "additionalProperties": True}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "libvirt-backup-agent",
            "version": "1",
            "description": "Jobs (backup, restore, verify, reconcile) of one libvirt host.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "JobRequest": request,
                "Job": _JOB_SCHEMA,
                "Error": _ERROR_SCHEMA,
                "Domains": _DOMAINS_SCHEMA,
                "DomainDisk": _DOMAIN_DISK_SCHEMA,
                "List": get_list,
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/jobs": {
                "post": {
                    "summary": "Submit a job (idempotent by id)",
                    "requestBody": {
                        "required": True,
                        "content": {_JSON: {"schema": _ref("JobRequest")}},
                    },
                    "responses": {
                        "201": _reply("Job created", "Job"),
                        "200": _reply("A job with this id and request already exists", "Job"),
                        **_errors(400, 401, 409, 413, 415, 503),
                    },
                },
                "get": {
                    "summary": "List jobs, newest first, a page at a time ('next': the "
                    "id to pass as 'before' for the next page; null on the last)",
                    "parameters": [
                        {"name": "domain", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "state",
                            "in": "query",
                            "schema": {"enum": [s.value for s in JobState]},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                            "description": "Jobs per page (default 100).",
                        },
                        {
                            "name": "before",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "Only jobs older than this one (a page's 'next').",
                        },
                    ],
                    "responses": {"200": _reply("Jobs", "List"), **_errors(400, 401)},
                },
            },
            "/v1/jobs/{job_id}": {
                "parameters": [_JOB_ID],
                "get": {
                    "summary": "One job",
                    "responses": {"200": _reply("The job", "Job"), **_errors(400, 401, 404)},
                },
                "delete": {
                    "summary": "Cancel a queued or running job",
                    "responses": {
                        "200": _reply("Cancelled", "Job"),
                        "202": _reply("Running: cancellation under way", "Job"),
                        **_errors(400, 401, 404, 409),
                    },
                },
            },
            "/v1/domains": {
                "get": {
                    "summary": "Domains with their disks (chain, how backed up), partial "
                    "coverage and last backup",
                    "responses": {"200": _reply("Domains", "Domains"), **_errors(401)},
                }
            },
            "/v1/domains/{domain}/checkpoints": {
                "parameters": [_DOMAIN],
                "get": {
                    "summary": "The domain's checkpoints from the ledger",
                    "responses": {
                        "200": _reply("Checkpoints", "List"),
                        **_errors(400, 401, 404),
                    },
                },
            },
            "/v1/domains/{domain}/backups": {
                "parameters": [_DOMAIN],
                "get": {
                    "summary": "The domain's backups in the repository",
                    "responses": {"200": _reply("Backups", "List"), **_errors(400, 401)},
                },
            },
        },
    }
