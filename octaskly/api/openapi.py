"""The OpenAPI 3.1 document of the REST API; request schemas come from the pydantic models
so the document cannot drift from what the API accepts."""

from __future__ import annotations

from typing import Any

from octaskly import __version__
from octaskly.domain import models

_STATUSES = [s.value for s in models.TaskStatus]
_TS = {"type": ["string", "null"], "format": "date-time"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _resp(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = _json_content(schema)
    return out


# Any request may be refused by the HTTP layer before the API sees it — a malformed or
# over-long (8 KiB) request line or header — with a 400 in text/plain.
_PLAIN = {"text/plain": {"schema": {"type": "string"}}}
_HTTP_400 = {
    "description": "a request the HTTP layer refused: malformed, or a request line or header "
    "over 8 KiB (text/plain)",
    "content": _PLAIN,
}
_ERRORS = {
    "400": {
        "description": "invalid input; `field` names it (text/plain: refused by the HTTP "
        "layer, see above)",
        "content": {**_json_content(_ref("Error")), **_PLAIN},
    },
    "401": _resp("missing or invalid credentials", _ref("Error")),
    "403": _resp("the caller's role may not do this", _ref("Error")),
    "503": _resp(
        "this dispatcher is a standby or is handing over to one (the message says where the "
        "primary is; X-Octaskly-Role), or its database is unavailable; see Retry-After",
        _ref("Error"),
    ),
}
_UNAUTHORIZED = {"401": _ERRORS["401"]}
# requests that carry a body or write to the database
_TOO_LARGE = {
    "408": _resp(
        "the request body arrived too slowly (under 500 bytes/s after connection_timeout)",
        _ref("Error"),
    ),
    "413": _resp("the request body is over 64 MiB", _ref("Error")),
}
_DISK_FULL = {"507": _resp("the database disk is full; see Retry-After", _ref("Error"))}
_CONFLICT_KEY = {
    "409": _resp(
        "the Idempotency-Key was used by a different request (another batch size, or a "
        "single task whose key is one of this batch's KEY#N)",
        _ref("Error"),
    )
}


def _object(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON object with these properties (the required ones always present)."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }


_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_OBJ = {"type": "object"}
_DATE = {"type": "string", "format": "date-time"}
_ROLE = {"type": "string", "enum": ["primary", "standby"]}
_WORKER = _object(
    {
        "id": _STR,
        "name": _STR,
        "address": _STR,
        "version": _STR,
        "resources": _OBJ,
        "max_jobs": _INT,
        "current_jobs": _INT,
        "sandbox_level": _STR,
        "state": {"type": "string", "enum": ["idle", "busy", "draining", "offline"]},
        "connected_at": _DATE,
        "last_heartbeat": _DATE,
    },
    {
        "dispatcher": _STR,
        # (absent from workers a dispatcher of an older version publishes in a federation)
        "sandbox_levels": {
            "type": "array",
            "items": {"type": "string", "enum": [level.value for level in models.SandboxLevel]},
            "description": "the levels a run on this worker can get (from its sandbox_level up)",
        },
        "sandbox_unavailable": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "levels from its sandbox_level up it cannot provide, with the reason",
        },
    },
)
_STATS = _object(
    {
        "workers": _object({"total": _INT, "active": _INT, "idle": _INT}),
        "tasks": _object({s: _INT for s in _STATUSES}),
        "queue": _object({p: _INT for p in ("critical", "high", "normal", "low")}),
        "throughput": _OBJ,
        "system": _object(
            {"uptime_seconds": _INT, "memory_usage_mb": _NUM, "cpu_usage_percent": _NUM}
        ),
        "database": _object({"total_tasks": _INT, "disk_size_mb": _NUM}),
        "ha": _object({"role": _ROLE, "term": _INT}),
    },
    {
        "federation": _object(
            {
                "name": _STR,
                "lease_seconds": _NUM,
                "dispatchers": {
                    "type": "array",
                    "items": _object(
                        {
                            "id": _STR,
                            "workers": _INT,
                            "running": _INT,
                            "renewed_seconds_ago": _NUM,
                        },
                        {
                            "api_url": {"type": ["string", "null"]},
                            "p2p_address": {"type": ["string", "null"]},
                        },
                    ),
                },
                "taken_over": _INT,
            }
        )
    },
)


def _stream_props(name: str) -> dict[str, Any]:
    return {
        name: {
            "type": "string",
            "description": f"{name} as text: UTF-8, U+FFFD where the bytes are not "
            f"(exact when {name}_encoding is utf-8); the start of a character a running "
            "task has not finished writing is left out",
        },
        f"{name}_base64": {
            "type": "string",
            "contentEncoding": "base64",
            "description": f"the exact bytes of {name} (its kept tail)",
        },
        f"{name}_encoding": {
            "type": "string",
            "enum": ["utf-8", "binary"],
            "description": f"utf-8: {name} is exactly the bytes; binary: they are not UTF-8 "
            f"(read {name}_base64)",
        },
        f"{name}_dropped_bytes": {
            "type": "integer",
            "minimum": 0,
            "description": f"bytes cut from the head of {name} before the kept tail (the text "
            "also leaves out the rest of a character torn by the cut)",
        },
    }


_OUTPUT_PROPS = {
    **_stream_props("stdout"),
    **_stream_props("stderr"),
    "output_source": {
        "type": "string",
        "enum": ["live", "store", "unavailable"],
        "description": "live: a running task's output so far, as this dispatcher receives "
        "it; store: as stored (a finished task's tail, or a queued one's from its previous "
        "attempt); unavailable: the task runs but its output goes to another dispatcher "
        "(or its worker has not reconnected yet), so only what the store has is shown",
    },
}


def _task_links(task_id: str) -> dict[str, Any]:
    """OpenAPI links from a response naming a task to what can be done with it."""
    task = "#/paths/~1api~1v1~1tasks~1{task_id}"
    return {
        "GetTask": {"operationRef": f"{task}/get", "parameters": {"task_id": task_id}},
        "CancelTask": {"operationRef": f"{task}/delete", "parameters": {"task_id": task_id}},
        "GetTaskLogs": {
            "operationRef": f"{task}~1logs/get",
            "parameters": {"task_id": task_id},
        },
    }


def _task_id_param() -> dict[str, Any]:
    return {
        "name": "task_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "format": "uuid"},
    }


def _schemas() -> dict[str, Any]:
    spec_schema = models.TaskSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = spec_schema.pop("$defs", {})
    summary_props: dict[str, Any] = {
        "id": {"type": "string"},
        "command": {"type": "string"},
        "status": {"type": "string", "enum": _STATUSES},
        "priority": {"type": "string", "enum": ["low", "normal", "high", "critical"]},
        "worker_id": {"type": ["string", "null"]},
        "exit_code": {"type": ["integer", "null"]},
        "duration_ms": {"type": ["integer", "null"]},
        "attempts": {"type": "integer"},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": _TS,
        "completed_at": _TS,
    }
    record_props = dict(summary_props)
    record_props.update(_OUTPUT_PROPS)
    record_props.update(
        {
            "error": {"type": ["string", "null"]},
            "timeout": {"type": "integer"},
            "waiting_reason": {"type": ["string", "null"]},
            "retry_count": {"type": "integer"},
            "memory_limit_mb": {"type": ["integer", "null"]},
            "cpu_seconds": {"type": ["integer", "null"]},
            "disk_limit_mb": {"type": ["integer", "null"]},
            "open_files_limit": {"type": ["integer", "null"]},
            "process_limit": {"type": ["integer", "null"]},
            "limits_preset": {"type": ["string", "null"]},
            "effective_limits": {"type": "object"},
            "sandbox_level": {"type": ["string", "null"]},
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "inputs": {"type": "array", "items": {"type": "string"}},
            "outputs": {"type": "array", "items": {"type": "string"}},
            "requirements": {"type": "object"},
            "owner": {"type": ["string", "null"]},
            "retry_at": _TS,
        }
    )
    return {
        **defs,
        "TaskSpec": spec_schema,
        "TaskSummary": {
            "type": "object",
            "properties": summary_props,
            "required": list(summary_props),
        },
        "Task": {"type": "object", "properties": record_props, "required": list(record_props)},
        "Error": {
            "type": "object",
            "required": ["error", "status", "timestamp"],
            "properties": {
                "error": {"type": "string"},
                "status": {"type": "integer"},
                "timestamp": {"type": "string", "format": "date-time"},
                "field": {"type": "string"},
            },
        },
    }


def _task_paths() -> dict[str, Any]:
    idem = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    }
    created = _resp(
        "queued durably (Idempotent-Replayed: true: the task an earlier request with this "
        "Idempotency-Key made, in its current status)",
        _object(
            {
                "id": _STR,
                "command": _STR,
                "status": {"type": "string", "enum": _STATUSES},
                "priority": {"type": "string", "enum": ["low", "normal", "high", "critical"]},
                "created_at": _DATE,
            }
        ),
    )
    full = _resp(
        "the queue is full, the database is unavailable, or this dispatcher is a standby or "
        "handing over to one; see Retry-After",
        _ref("Error"),
    )
    return {
        "/api/v1/tasks": {
            "post": {
                "summary": "Submit a task",
                "description": "With a client token, a task without sandbox_level gets "
                "client_min_sandbox_level (default strict) and one asking for less is a 400.",
                "parameters": [idem],
                "requestBody": {"required": True, "content": _json_content(_ref("TaskSpec"))},
                "responses": {
                    "201": {**created, "links": _task_links("$response.body#/id")},
                    **_ERRORS,
                    "503": full,
                    **_CONFLICT_KEY,
                    **_TOO_LARGE,
                    **_DISK_FULL,
                },
            },
            "get": {
                "summary": "List tasks, newest first",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": _STATUSES},
                    },
                    {"name": "worker_id", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 1000,
                            "default": 100,
                        },
                    },
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                ],
                "responses": {
                    "200": _resp(
                        "a page of tasks",
                        {
                            "type": "object",
                            "required": ["tasks", "total", "returned", "limit", "offset"],
                            "properties": {
                                "tasks": {"type": "array", "items": _ref("TaskSummary")},
                                "total": {"type": "integer"},
                                "returned": {"type": "integer"},
                                "limit": {"type": "integer"},
                                "offset": {"type": "integer"},
                            },
                        },
                    ),
                    **_ERRORS,
                },
            },
        },
        "/api/v1/tasks/batch": {
            "post": {
                "summary": "Submit many tasks, all or nothing",
                "description": "With a client token, each task is held to "
                "client_min_sandbox_level as on a single submit.",
                "parameters": [idem],
                "requestBody": {
                    "required": True,
                    "content": _json_content(
                        {
                            "type": "object",
                            "required": ["tasks"],
                            "additionalProperties": False,
                            "properties": {
                                "tasks": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": 10000,
                                    "items": _ref("TaskSpec"),
                                }
                            },
                        }
                    ),
                },
                "responses": {
                    "201": _resp(
                        "all queued durably",
                        {
                            "type": "object",
                            "required": ["ids"],
                            "properties": {"ids": {"type": "array", "items": {"type": "string"}}},
                        },
                    )
                    | {"links": _task_links("$response.body#/ids/0")},
                    **_ERRORS,
                    "503": full,
                    **_CONFLICT_KEY,
                    **_TOO_LARGE,
                    **_DISK_FULL,
                },
            }
        },
        "/api/v1/tasks/{task_id}": {
            "parameters": [_task_id_param()],
            "get": {
                "summary": "A task's full record",
                "responses": {
                    "200": _resp("the task", _ref("Task")),
                    "404": _resp("no such task", _ref("Error")),
                    **_ERRORS,
                },
            },
            "delete": {
                "summary": "Cancel a queued or running task",
                "responses": {
                    "200": _resp(
                        "cancelled",
                        _object({"id": _STR, "status": {"const": "cancelled"}, "message": _STR}),
                    ),
                    "404": _resp("no such task", _ref("Error")),
                    "409": _resp("already finished", _ref("Error")),
                    **_ERRORS,
                    **_DISK_FULL,
                },
            },
        },
        "/api/v1/tasks/{task_id}/logs": {
            "get": {
                "summary": "stdout and stderr (of a running task: so far); follow=true streams "
                "NDJSON until the task ends; format=raw&stream=stdout|stderr answers one "
                "stream's exact bytes",
                "description": "NDJSON events: {stream, data (text), data_base64 (the exact "
                "bytes)}, {event: attempt, attempt}, {event: dropped}, and last {event: end, "
                "status, exit_code, error}. A data event with an empty data_base64 carries "
                "only the U+FFFD of bytes a stream left undecoded.",
                "parameters": [
                    _task_id_param(),
                    {"name": "follow", "in": "query", "schema": {"type": "boolean"}},
                    {
                        "name": "format",
                        "in": "query",
                        "description": "json (the default) or raw: the bytes of `stream`, "
                        "application/octet-stream (not with follow)",
                        "schema": {"type": "string", "enum": ["json", "raw"]},
                    },
                    {
                        "name": "stream",
                        "in": "query",
                        "description": "the stream format=raw answers (required with it, "
                        "refused without it)",
                        "schema": {"type": "string", "enum": ["stdout", "stderr"]},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the output",
                        "headers": {
                            name: {"description": text, "schema": schema}
                            for name, text, schema in (
                                (
                                    "X-Octaskly-Dropped-Bytes",
                                    "format=raw: bytes cut from the head of the stream",
                                    _INT,
                                ),
                                (
                                    "X-Octaskly-Task-Status",
                                    "format=raw: the task's status",
                                    {"type": "string", "enum": _STATUSES},
                                ),
                                (
                                    "X-Octaskly-Output-Source",
                                    "format=raw: as output_source in JSON",
                                    _OUTPUT_PROPS["output_source"],
                                ),
                            )
                        },
                        "content": {
                            "application/json": {
                                "schema": _object(
                                    {
                                        "id": _STR,
                                        "status": {"type": "string", "enum": _STATUSES},
                                        **_OUTPUT_PROPS,
                                    }
                                )
                            },
                            "application/x-ndjson": {"schema": {"type": "string"}},
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            },
                        },
                    },
                    "404": _resp("no such task", _ref("Error")),
                    **_ERRORS,
                },
            }
        },
    }


def document() -> dict[str, Any]:
    obj = {"type": "object"}
    paths = _task_paths()
    paths.update(
        {
            "/api/v1/workers": {
                "get": {
                    "summary": "Connected workers",
                    "responses": {
                        "200": _resp(
                            "workers",
                            _object(
                                {"workers": {"type": "array", "items": _WORKER}, "total": _INT}
                            ),
                        ),
                        **_ERRORS,
                    },
                }
            },
            "/api/v1/stats": {
                "get": {
                    "summary": "Cluster statistics",
                    "responses": {"200": _resp("statistics", _STATS), **_ERRORS},
                }
            },
            "/api/v1/tokens": {
                "post": {
                    "summary": "Issue a token (admin)",
                    "requestBody": {
                        "required": True,
                        "content": _json_content(
                            {
                                "type": "object",
                                "required": ["role"],
                                "additionalProperties": False,
                                "properties": {
                                    "role": {
                                        "type": "string",
                                        "enum": ["admin", "dispatcher", "worker", "client"],
                                    },
                                    "subject": {"type": "string", "minLength": 1, "maxLength": 128},
                                    "ttl": {
                                        "oneOf": [
                                            {
                                                "type": "integer",
                                                "minimum": 60,
                                                "maximum": 366 * 86400,
                                            },
                                            {
                                                "type": "string",
                                                "pattern": "^\\s*[0-9]{1,9}\\s*[smhd]?\\s*$",
                                            },
                                        ]
                                    },
                                },
                            }
                        ),
                    },
                    "responses": {
                        "201": _resp(
                            "the token (shown once) and its id, subject, role and expiry",
                            _object(
                                {
                                    "token": _STR,
                                    "id": _STR,
                                    "subject": _STR,
                                    "role": _STR,
                                    "issued_at": _DATE,
                                    "expires_at": _DATE,
                                }
                            ),
                        )
                        | {
                            "links": {
                                "RevokeToken": {
                                    "operationRef": "#/paths/~1api~1v1~1tokens~1{jti}/delete",
                                    "parameters": {"jti": "$response.body#/id"},
                                }
                            }
                        },
                        **_ERRORS,
                        **_TOO_LARGE,
                        **_DISK_FULL,
                    },
                }
            },
            "/api/v1/tokens/{jti}": {
                "delete": {
                    "summary": "Revoke a token by id (admin); the revocation is durable",
                    "parameters": [
                        {
                            "name": "jti",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^[A-Za-z0-9]{1,64}$"},
                        }
                    ],
                    "responses": {
                        "200": _resp(
                            "revoked (also when it already was)",
                            _object({"id": _STR, "revoked": {"const": True}, "message": _STR}),
                        ),
                        **_ERRORS,
                        **_DISK_FULL,
                    },
                }
            },
            "/api/v1/audit-logs": {
                "get": {
                    "summary": "Audit log entries, newest first (admin)",
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                        {
                            "name": "offset",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                        {
                            "name": "event_type",
                            "in": "query",
                            "schema": {"type": "string", "pattern": "^[a-z_]{1,64}$"},
                        },
                    ],
                    "responses": {
                        "200": _resp(
                            "a page of entries",
                            _object(
                                {
                                    "entries": {"type": "array", "items": _OBJ},
                                    "total": _INT,
                                    "returned": _INT,
                                    "limit": _INT,
                                    "offset": _INT,
                                    "enabled": _BOOL,
                                }
                            ),
                        ),
                        **_ERRORS,
                    },
                }
            },
            "/api/v1/events": {
                "get": {
                    "summary": "Server-sent events for live views: `tasks` (changed tasks, "
                    "a client's own only), `stats` once a second, `reload` after an overflow",
                    "responses": {
                        "200": {
                            "description": "an endless text/event-stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_ERRORS,
                    },
                }
            },
            "/api/v1/backup": {
                "get": {
                    "summary": "A consistent copy of the database, streamed (admin): what "
                    "`octaskly backup --api-url` saves",
                    "responses": {
                        "200": {
                            "description": "the SQLite database file",
                            "content": {
                                "application/vnd.sqlite3": {
                                    "schema": {"type": "string", "format": "binary"}
                                }
                            },
                        },
                        **_ERRORS,
                        "501": _resp("this store cannot make online backups", _ref("Error")),
                    },
                }
            },
            "/api/v1/ha/status": {
                "get": {
                    "summary": "Role, term, replication state and lag, failover state "
                    "(admin, dispatcher); answered by primary and standby alike",
                    "responses": {
                        "200": _resp(
                            "the node's HA status",
                            _object(
                                {
                                    "role": _ROLE,
                                    "term": _INT,
                                    "replication": {"type": ["object", "null"]},
                                },
                                {
                                    "node": _STR,
                                    "lsn": _INT,
                                    "db_id": _STR,
                                    "primary": {"type": ["string", "null"]},
                                    "switching": _BOOL,
                                    "degraded": {"type": ["string", "null"]},
                                    "failover": _OBJ,
                                    "events": {"type": "array"},
                                },
                            ),
                        ),
                        **_ERRORS,
                    },
                }
            },
            "/api/v1/ha/switchover": {
                "post": {
                    "summary": "Hand the primary role to the connected standby with no "
                    "acknowledged write lost (admin; on the primary)",
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "timeout": {"type": "number", "minimum": 1, "maximum": 600}
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _resp(
                            "the new term and primary",
                            _object({"term": _INT, "primary": _STR, "lsn": _INT, "seconds": _NUM}),
                        ),
                        "409": _resp("not the primary, or no standby", _ref("Error")),
                        **_ERRORS,
                        **_TOO_LARGE,
                    },
                }
            },
            "/api/v1/ha/promote": {
                "post": {
                    "summary": "Promote this standby to primary of the next term (admin; "
                    "force: even if it may lack acknowledged writes)",
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"force": {"type": "boolean"}},
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _resp(
                            "the new role and term", _object({"role": _ROLE, "term": _INT})
                        ),
                        "409": _resp("already primary, or stale", _ref("Error")),
                        **_ERRORS,
                        **_TOO_LARGE,
                    },
                }
            },
            "/api/v1/whoami": {
                "get": {
                    "summary": "The caller's subject, role and what the role may do (any role)",
                    "responses": {
                        "200": _resp(
                            "who the token is",
                            {
                                "type": "object",
                                "required": ["subject", "role", "token_id", "can"],
                                "properties": {
                                    "subject": {"type": "string"},
                                    "role": {"type": "string"},
                                    "token_id": {"type": ["string", "null"]},
                                    "can": {
                                        "type": "object",
                                        "additionalProperties": {"type": "boolean"},
                                    },
                                },
                            },
                        ),
                        **_ERRORS,
                    },
                }
            },
            "/ui": {
                "get": {
                    "summary": "The web dashboard (redirects to /ui/)",
                    "security": [],
                    "responses": {"302": {"description": "to /ui/"}},
                }
            },
            "/ui/": {
                "get": {
                    "summary": "The web dashboard's page; it logs in with a token and then "
                    "uses this API",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "HTML",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/ui/{asset}": {
                "get": {
                    "summary": "The dashboard's script, style sheet and icon",
                    "security": [],
                    "parameters": [
                        {
                            "name": "asset",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "enum": ["app.js", "app.css", "icon.svg"]},
                        }
                    ],
                    "responses": {
                        "200": {"description": "the asset"},
                        "404": _resp("no such asset", _ref("Error")),
                    },
                }
            },
            "/api/v1/openapi.json": {
                "get": {
                    "summary": "This document (any role)",
                    "responses": {"200": _resp("OpenAPI 3.1", obj), **_UNAUTHORIZED},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text exposition format)",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {
                        "200": _resp(
                            "alive (degraded: replication is impaired, `degraded_reason` says how)",
                            _object(
                                {
                                    "status": {"type": "string", "enum": ["healthy", "degraded"]},
                                    "version": _STR,
                                    "uptime_seconds": _INT,
                                    "role": _ROLE,
                                    "term": _INT,
                                },
                                {"degraded_reason": _STR},
                            ),
                        ),
                        "503": _resp(
                            "the database is unusable, or the dispatcher failed",
                            _object({"status": {"const": "unhealthy"}, "message": _STR}),
                        ),
                    },
                }
            },
            "/ready": {
                "get": {
                    "summary": "200 only on the node that accepts writes",
                    "security": [],
                    "responses": {
                        "200": _resp(
                            "ready",
                            _object({"ready": {"const": True}, "role": _ROLE, "term": _INT}),
                        ),
                        "503": _resp(
                            "not ready (a standby, switching over, or the database is unusable)",
                            _object(
                                {
                                    "ready": {"const": False},
                                    "role": _ROLE,
                                    "term": _INT,
                                    "message": _STR,
                                }
                            ),
                        ),
                    },
                }
            },
        }
    )
    for operations in paths.values():
        for method, operation in operations.items():
            if method != "parameters":
                operation["responses"].setdefault("400", _HTTP_400)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "octaskly",
            "version": __version__,
            "description": "Distributed task runner REST API",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": [{"bearer": []}],
    }
