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
                           "endpoint /ws/events and Socket.IO at /socket.io/ (see README).",
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
                                           "bearerFormat": "JWT"}},
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
                            "socketio": {"type": "integer"}}},
                    },
                },
            },
        },
    }
