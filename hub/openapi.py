"""The OpenAPI document of hub's HTTP endpoints (WebSocket endpoints are not described by
OpenAPI, as the spec notes; they are documented in the README)."""

from __future__ import annotations

from typing import Any


def openapi_document(version: str, event_types: tuple[str, ...]) -> dict[str, Any]:
    error = {"$ref": "#/components/schemas/Error"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hub",
            "version": version,
            "description": "Real-time event hub. Live events stream over the WebSocket "
                           "endpoint /ws/events and Socket.IO at /socket.io/ (see README), "
                           "and as Server-Sent Events at /events/stream; GET /events "
                           "reads the history.",
        },
        "paths": {
            "/events": {
                "post": {
                    "summary": "Publish an event to every subscribed client on every instance",
                    "operationId": "publishEvent",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/PublishRequest"}}},
                    },
                    "responses": {
                        "202": {"description": "Accepted and stamped",
                                "content": {"application/json": {"schema": {
                                    "$ref": "#/components/schemas/Published"}}}},
                        "400": {"description": "Body is not JSON",
                                "content": {"application/json": {"schema": error}}},
                        "401": {"description": "Missing or invalid token",
                                "content": {"application/json": {"schema": error}}},
                        "403": {"description": "Token's role may not publish",
                                "content": {"application/json": {"schema": error}}},
                        "413": {"description": "Body too large",
                                "content": {"application/json": {"schema": error}}},
                        "422": {"description": "Invalid event; `fields` lists every part at "
                                               "fault, `field` is the first",
                                "content": {"application/json": {"schema": error}}},
                        "503": {"description": "Backend (Redis) unavailable; retry",
                                "content": {"application/json": {"schema": error}}},
                    },
                },
                "get": {
                    "summary": "Retained events (history), oldest first, filtered like a "
                               "live connection of this token",
                    "operationId": "eventHistory",
                    "security": [{"bearer": []}, {"cookie": []}],
                    "parameters": _history_parameters(),
                    "responses": {
                        "200": {"description": "A page of the history",
                                "content": {"application/json": {"schema": {
                                    "$ref": "#/components/schemas/HistoryPage"}}}},
                        "400": {"description": "Malformed parameter (`invalid_filter`, "
                                               "`invalid_parameter`, "
                                               "`invalid_last_event_id`, "
                                               "`invalid_event_types`)",
                                "content": {"application/json": {"schema": error}}},
                        "401": {"description": "Missing or invalid token",
                                "content": {"application/json": {"schema": error}}},
                        "403": {"description": "Origin not allowed",
                                "content": {"application/json": {"schema": error}}},
                        "503": {"description": "History unavailable; retry",
                                "content": {"application/json": {"schema": error}}},
                    },
                },
            },
            "/events/stream": {
                "get": {
                    "summary": "Live events as Server-Sent Events (text/event-stream)",
                    "description": "Each event: `id: <event id>`, `event: <type>`, "
                                   "`data: <envelope JSON>`. Hub messages "
                                   "(connection_established, resumed, history_truncated, "
                                   "token_expired) are events of those names without an id. "
                                   "A comment line is sent as a heartbeat. Resumes from the "
                                   "Last-Event-ID header or `last_event_id`.",
                    "operationId": "eventStream",
                    "security": [{"bearer": []}, {"cookie": []}],
                    "parameters": [
                        *[p for p in _history_parameters()
                          if p["name"] not in ("after", "limit")],
                        {"name": "last_event_id", "in": "query",
                         "schema": {"type": "string"},
                         "description": "Resume after this id (as the header)"},
                        {"name": "Last-Event-ID", "in": "header",
                         "schema": {"type": "string"},
                         "description": "Resume after this id (EventSource sends it)"},
                    ],
                    "responses": {
                        "200": {"description": "The stream",
                                "content": {"text/event-stream": {"schema": {
                                    "type": "string"}}}},
                        "400": {"description": "Malformed parameter",
                                "content": {"application/json": {"schema": error}}},
                        "401": {"description": "Missing or invalid token",
                                "content": {"application/json": {"schema": error}}},
                        "403": {"description": "Origin not allowed",
                                "content": {"application/json": {"schema": error}}},
                        "503": {"description": "Connection limit reached; retry",
                                "content": {"application/json": {"schema": error}}},
                    },
                }
            },
            "/ws/health": {
                "get": {
                    "summary": "Health of this instance",
                    "operationId": "health",
                    "responses": {
                        "200": {"description": "Serving (healthy or degraded)",
                                "content": {"application/json": {"schema": {
                                    "$ref": "#/components/schemas/Health"}}}},
                        "503": {"description": "Cannot serve",
                                "content": {"application/json": {"schema": {
                                    "$ref": "#/components/schemas/Health"}}}},
                    },
                }
            },
            "/admin/reload": {
                "post": {
                    "summary": "Re-read key and origin files on this instance (as SIGHUP)",
                    "description": "Re-reads JWT_SECRET_FILE, JWT_PUBLIC_KEY given as a path "
                                   "and HUB_ALLOWED_ORIGINS_FILE, and refetches JWT_JWKS_URL; "
                                   "new connections use them. A change is announced as "
                                   "`system_status` with `status: config_change` and "
                                   "`changed` naming what changed. A bad file keeps the "
                                   "previous configuration. Needs a role in HUB_ADMIN_ROLES.",
                    "operationId": "adminReload",
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": {"description": "Reloaded; `changed` lists what changed",
                                "content": {"application/json": {"schema": {
                                    "$ref": "#/components/schemas/Reloaded"}}}},
                        "401": {"description": "Missing or invalid token",
                                "content": {"application/json": {"schema": error}}},
                        "403": {"description": "Token has no admin role",
                                "content": {"application/json": {"schema": error}}},
                        "422": {"description": "A file is unreadable or invalid "
                                               "(`reload_failed`); nothing was changed",
                                "content": {"application/json": {"schema": error}}},
                    },
                }
            },
            "/admin/revocations": {
                "get": {
                    "summary": "Revocations in force (on every instance)",
                    "operationId": "listRevocations",
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": {"description": "Revocations, oldest first",
                                "content": {"application/json": {"schema": {
                                    "type": "object", "required": ["revocations"],
                                    "properties": {"revocations": {
                                        "type": "array", "items": {
                                            "$ref": "#/components/schemas/Revocation"}}}}}}},
                        "401": {"description": "Missing, invalid or revoked bearer token",
                                "content": {"application/json": {"schema": error}}},
                        "403": {"description": "Token's role is not in HUB_ADMIN_ROLES",
                                "content": {"application/json": {"schema": error}}},
                    },
                },
                "post": {
                    "summary": "Revoke a user's, a token's (jti) or a tenant's tokens: every "
                               "instance closes the matching connections and refuses the "
                               "tokens until they expire",
                    "operationId": "revoke",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {
                            "$ref": "#/components/schemas/RevocationRequest"}}},
                    },
                    "responses": {
                        "201": {"description": "Revoked",
                                "content": {"application/json": {"schema": {
                                    "$ref": "#/components/schemas/Revocation"}}}},
                        "400": {"description": "Body is not JSON",
                                "content": {"application/json": {"schema": error}}},
                        "401": {"description": "Missing, invalid or revoked bearer token",
                                "content": {"application/json": {"schema": error}}},
                        "403": {"description": "Token's role is not in HUB_ADMIN_ROLES",
                                "content": {"application/json": {"schema": error}}},
                        "413": {"description": "Body too large",
                                "content": {"application/json": {"schema": error}}},
                        "422": {"description": "Not exactly one of user_id, jti, tenant_id, "
                                               "or a value that is not a 1-256 character "
                                               "string (`invalid_revocation`)",
                                "content": {"application/json": {"schema": error}}},
                        "503": {"description": "Redis could not store it; nothing was revoked",
                                "content": {"application/json": {"schema": error}}},
                    },
                },
            },
            "/admin/connections": {
                "get": {
                    "summary": "Connections on every instance (this one live, the others "
                               "as of their last snapshot)",
                    "operationId": "listConnections",
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": {"description": "Connections and the instances they are on",
                                "content": {"application/json": {"schema": {
                                    "$ref": "#/components/schemas/Connections"}}}},
                        "401": {"description": "Missing, invalid or revoked bearer token",
                                "content": {"application/json": {"schema": error}}},
                        "403": {"description": "Token's role is not in HUB_ADMIN_ROLES",
                                "content": {"application/json": {"schema": error}}},
                    },
                }
            },
            "/consumers": {
                "get": {
                    "summary": "Durable consumers: each one's cursor (last acknowledged id) "
                               "and lag",
                    "description": "A durable consumer is named on a subscribe "
                                   "(`\"consumer\": NAME` on /ws/events, `auth.consumer` or "
                                   "the `subscribe` event on Socket.IO) and moved by acks "
                                   "(`{\"action\": \"ack\", \"id\": ID}`, the Socket.IO "
                                   "`ack` event); see README \"Durable consumers\".",
                    "operationId": "listConsumers",
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": {"description": "Every consumer (at most "
                                               "HUB_CONSUMER_MAX_TOTAL)",
                                "content": {"application/json": {"schema": {
                                    "$ref": "#/components/schemas/Consumers"}}}},
                        "401": {"description": "Missing, invalid or revoked bearer token",
                                "content": {"application/json": {"schema": error}}},
                        "403": {"description": "Token's role is not in HUB_ADMIN_ROLES",
                                "content": {"application/json": {"schema": error}}},
                        "503": {"description": "The cursors cannot be read (Redis "
                                               "unavailable; `consumer_unavailable`)",
                                "content": {"application/json": {"schema": error}}},
                    },
                },
                "delete": {
                    "summary": "Forget a durable consumer (a connection still bound to it "
                               "creates it again at its next ack)",
                    "operationId": "deleteConsumer",
                    "security": [{"bearer": []}],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"type": "object", "required": ["user_id", "name"],
                                   "properties": {
                                       "user_id": {"type": "string"},
                                       "tenant_id": {"type": ["string", "null"]},
                                       "name": {"type": "string"}}}}}},
                    "responses": {
                        "200": {"description": "Deleted",
                                "content": {"application/json": {"schema": {
                                    "type": "object", "properties": {
                                        "deleted": {"type": "boolean"},
                                        "user_id": {"type": "string"},
                                        "tenant_id": {"type": ["string", "null"]},
                                        "name": {"type": "string"}}}}}},
                        "401": {"description": "Missing, invalid or revoked bearer token",
                                "content": {"application/json": {"schema": error}}},
                        "403": {"description": "Token's role is not in HUB_ADMIN_ROLES",
                                "content": {"application/json": {"schema": error}}},
                        "404": {"description": "No such consumer (`unknown_consumer`)",
                                "content": {"application/json": {"schema": error}}},
                        "422": {"description": "Malformed body (`invalid_consumer`, "
                                               "`not_an_object`)",
                                "content": {"application/json": {"schema": error}}},
                        "503": {"description": "Redis unavailable (`consumer_unavailable`)",
                                "content": {"application/json": {"schema": error}}},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "operationId": "metrics",
                    "responses": {"200": {"description": "Prometheus text format",
                                          "content": {"text/plain": {"schema": {
                                              "type": "string"}}}}},
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "bearerFormat": "JWT"},
                                "cookie": {"type": "apiKey", "in": "cookie",
                                           "name": "ks_access_token"}},
            "schemas": {
                "PublishRequest": {
                    "type": "object",
                    "required": ["type", "data"],
                    "properties": {
                        "type": {"type": "string", "enum": list(event_types)},
                        "data": {"type": "object", "additionalProperties": True},
                        "timestamp": {"type": "string", "format": "date-time"},
                    },
                },
                "HistoryPage": {
                    "type": "object",
                    "required": ["events", "truncated", "first_retained_id", "next_after"],
                    "properties": {
                        "events": {"type": "array", "items": {
                            "type": "object", "required": ["id", "type", "timestamp", "data"],
                            "properties": {"id": {"type": "string"},
                                           "type": {"type": "string"},
                                           "timestamp": {"type": "string"},
                                           "data": {"type": "object"}}}},
                        "truncated": {"type": "boolean", "description":
                                      "events after `after` were dropped from retention"},
                        "first_retained_id": {"type": ["string", "null"], "description":
                                              "with `after`: the oldest retained id, when "
                                              "truncated (else null); without: the oldest "
                                              "retained id"},
                        "next_after": {"type": ["string", "null"], "description":
                                       "pass as `after` for what follows this page"},
                        "more": {"type": "boolean", "description":
                                 "with `after`: more retained events follow next_after"},
                    },
                },
                "Published": {
                    "type": "object",
                    "required": ["id", "type", "timestamp"],
                    "properties": {"id": {"type": "string"}, "type": {"type": "string"},
                                   "timestamp": {"type": "string", "format": "date-time"}},
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {"code": {"type": "string"},
                                       "message": {"type": "string"},
                                       "field": {"type": "string"},
                                       "fields": {"type": "array",
                                                  "items": {"type": "string"}}},
                    }},
                },
                "RevocationRequest": {
                    "type": "object",
                    "description": "Exactly one of user_id, jti, tenant_id",
                    "properties": {
                        "user_id": {"type": "string", "minLength": 1, "maxLength": 256},
                        "jti": {"type": "string", "minLength": 1, "maxLength": 256},
                        "tenant_id": {"type": "string", "minLength": 1, "maxLength": 256},
                        "reason": {"type": "string", "maxLength": 256},
                    },
                    "oneOf": [{"required": ["user_id"]}, {"required": ["jti"]},
                              {"required": ["tenant_id"]}],
                },
                "Revocation": {
                    "type": "object",
                    "required": ["kind", "value", "at", "expires_at", "by", "instance_id"],
                    "properties": {
                        "kind": {"type": "string", "enum": ["user_id", "jti", "tenant_id"]},
                        "value": {"type": "string"},
                        "at": {"type": "number", "description": "when it was made (epoch "
                               "seconds): user and tenant tokens with a later iat pass"},
                        "expires_at": {"type": "number", "description": "when every token "
                                       "it covers has expired; it is forgotten then"},
                        "by": {"type": "string", "description": "the admin who asked"},
                        "instance_id": {"type": "string"},
                        "reason": {"type": "string"},
                    },
                },
                "Connections": {
                    "type": "object",
                    "required": ["connections", "instances", "problems"],
                    "properties": {
                        "connections": {"type": "array", "items": {
                            "type": "object",
                            "properties": {
                                "connection_id": {"type": "string"},
                                "user_id": {"type": "string"},
                                "tenant_id": {"type": ["string", "null"]},
                                "transport": {"type": "string"},
                                "instance_id": {"type": "string"},
                                "since": {"type": "number"},
                                "expires_at": {"type": ["number", "null"]},
                                "subscription": {"type": ["array", "null"],
                                                 "items": {"type": "string"},
                                                 "description": "null: every type"},
                            }}},
                        "instances": {"type": "object", "additionalProperties": {
                            "type": "object", "properties": {
                                "total": {"type": "integer"}, "listed": {"type": "integer"},
                                "as_of": {"type": "number"}}}},
                        "problems": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "Consumers": {
                    "type": "object",
                    "required": ["consumers", "count", "max_lag", "max_per_user",
                                 "max_total"],
                    "properties": {
                        "consumers": {"type": "array", "items": {
                            "type": "object",
                            "properties": {
                                "user_id": {"type": "string"},
                                "tenant_id": {"type": ["string", "null"]},
                                "name": {"type": "string"},
                                "acked_id": {"type": "string", "description":
                                             "the last acknowledged id: the consumer "
                                             "resumes after it"},
                                "created": {"type": "number"},
                                "acked_at": {"type": ["number", "null"]},
                                "lag_events": {"type": "integer", "description":
                                               "events after the cursor (every type)"},
                                "lag_exact": {"type": "boolean", "description":
                                              "false: the cursor is older than this "
                                              "instance's replay window, lag_events is a "
                                              "lower bound"},
                                "lag_s": {"type": "number"},
                                "connections_here": {"type": "integer", "description":
                                                     "connections bound to it on the "
                                                     "instance that answered"},
                            }}},
                        "count": {"type": "integer"},
                        "max_lag": {"type": "integer",
                                    "description": "HUB_CONSUMER_MAX_LAG"},
                        "max_per_user": {"type": "integer"},
                        "max_total": {"type": "integer"},
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status", "active_connections", "redis_connected",
                                 "instance_id", "version", "uptime_s", "connections"],
                    "properties": {
                        "status": {"type": "string",
                                   "enum": ["healthy", "degraded", "unhealthy"]},
                        "active_connections": {"type": "integer"},
                        "redis_connected": {"type": "boolean"},
                        "backend": {"type": "string", "enum": ["memory", "redis"]},
                        "instance_id": {"type": "string"},
                        "version": {"type": "string"},
                        "uptime_s": {"type": "number"},
                        "connections": {"type": "object", "properties": {
                            "websocket": {"type": "integer"},
                            "socketio": {"type": "integer"},
                            "sse": {"type": "integer"}}},
                        "reasons": {"type": "array", "items": {"type": "string"}},
                        "jwks": {
                            "description": "JWT_JWKS_URL's key set; null without it",
                            "type": ["object", "null"],
                            "properties": {
                                "keys": {"type": "integer"},
                                "ok": {"type": "boolean"},
                                "error": {"type": ["string", "null"]},
                                "fetched_at": {"type": ["number", "null"]},
                                "age_s": {"type": ["number", "null"]}}},
                        "reload": {
                            "description": "The last reload (SIGHUP, POST /admin/reload)",
                            "type": "object",
                            "properties": {
                                "ok": {"type": "boolean"},
                                "error": {"type": ["string", "null"]},
                                "reloads": {"type": "integer"},
                                "last_at": {"type": ["number", "null"]}}},
                    },
                },
                "Reloaded": {
                    "type": "object",
                    "required": ["reloaded", "changed", "instance_id"],
                    "properties": {
                        "reloaded": {"type": "boolean"},
                        "changed": {"type": "array", "items": {
                            "type": "string", "enum": ["jwt_keys", "allowed_origins"]}},
                        "instance_id": {"type": "string"}},
                },
            },
        },
    }


def _history_parameters() -> list[dict[str, Any]]:
    return [
        {"name": "after", "in": "query", "schema": {"type": "string"},
         "description": "Events after this id; without it, the latest `limit` events"},
        {"name": "limit", "in": "query",
         "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
        {"name": "types", "in": "query", "schema": {"type": "string"},
         "description": "Comma-separated event types"},
        {"name": "min_severity", "in": "query",
         "schema": {"type": "string", "enum": ["low", "medium", "high", "critical", "info",
                                               "warning", "error"]},
         "description": "Per type's severity order (see README, Filters)"},
        {"name": "data.FIELD", "in": "query", "schema": {"type": "string"},
         "description": "A field of data and its allowed values, comma-separated "
                        "(e.g. data.provider=openai,azure); any number of fields"},
    ]
