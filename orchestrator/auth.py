"""Tenants, bearer tokens and roles.

A token is ``qai_<token_id>_<secret>``. Only SHA-256 of the secret is stored (the secret has 256
bits of entropy, so a slow hash adds nothing). A token maps to one role and, except for the
platform-wide roles ``admin`` and ``auditor``, one tenant.

Roles:
* ``submitter`` submits and reads its tenant's jobs;
* ``signer`` signs with its tenant's keys;
* ``operator`` manages its tenant's keys and policies;
* ``auditor`` reads everything, in every tenant, and changes nothing;
* ``admin`` does anything.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from orchestrator.db import Database, utcnow
from orchestrator.models import ApiToken, Tenant
from sdk.errors import QaiError

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


class Role(StrEnum):
    SUBMITTER = "submitter"
    SIGNER = "signer"
    OPERATOR = "operator"
    AUDITOR = "auditor"
    ADMIN = "admin"


PLATFORM_ROLES = frozenset({Role.ADMIN, Role.AUDITOR})


@dataclass(frozen=True)
class Principal:
    """Who is calling: the subject recorded in audit logs, its tenant and its role."""

    subject: str
    role: Role
    tenant: str | None = None

    @classmethod
    def system(cls, subject: str) -> Principal:
        """An in-process administrator (the CLI, start-up tasks)."""
        return cls(subject=subject, role=Role.ADMIN)

    def can_act_for(self, tenant: str, *roles: Role) -> bool:
        if self.role == Role.ADMIN:
            return True
        return self.role in roles and self.tenant == tenant

    def require(self, tenant: str, *roles: Role, action: str) -> None:
        if not self.can_act_for(tenant, *roles):
            raise QaiError(
                "auth.forbidden",
                f"{action} for tenant {tenant!r} needs role {' or '.join(r.value for r in roles)} "
                f"of that tenant, or admin",
                status=403,
                details={"role": self.role.value, "tenant": self.tenant, "needed": [r.value for r in roles]},
            )

    def can_read(self, tenant: str) -> bool:
        return self.role in PLATFORM_ROLES or self.tenant == tenant


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# -- tenants ----------------------------------------------------------------------------------


def check_crypto_policy(policy: dict[str, Any]) -> None:
    """A tenant's crypto policy must use known values: a misspelt minimum mode must not read as
    none at all (it would fail open at ingest and in the scheduler)."""
    from scheduler.engine import CRYPTO_RANK, QKD_POLICIES

    def bad(field: str, message: str) -> QaiError:
        return QaiError("tenant.bad_policy", f"crypto_policy.{field} {message}", status=422, details={"field": field})

    if policy.get("min_crypto_mode") is not None and policy["min_crypto_mode"] not in CRYPTO_RANK:
        raise bad("min_crypto_mode", f"must be one of {list(CRYPTO_RANK)}")
    if policy.get("qkd") is not None and policy["qkd"] not in QKD_POLICIES:
        raise bad("qkd", f"must be one of {list(QKD_POLICIES)}")
    for field in ("allowed_suites", "allowed_backends"):
        value = policy.get(field)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise bad(field, "must be a list of strings")
    if policy.get("scheduler") is not None and not isinstance(policy["scheduler"], dict):
        raise bad("scheduler", "must be an object")


def create_tenant(db: Database, name: str, *, crypto_policy: dict[str, Any] | None = None) -> Tenant:
    if not TENANT_NAME.match(name):
        raise QaiError("tenant.bad_name", "tenant names are 1-64 chars of a-z, 0-9 and '-'",
                       status=422, details={"name": name})
    check_crypto_policy(crypto_policy or {})
    try:
        with db.write() as s:
            tenant = Tenant(name=name, created_at=utcnow(), crypto_policy=crypto_policy or {})
            s.add(tenant)
    except IntegrityError as exc:
        raise QaiError("tenant.exists", f"tenant {name!r} already exists", status=409) from exc
    return tenant


def ensure_tenant(db: Database, name: str) -> None:
    """Create tenant ``name`` unless it exists (set-up code that may run more than once)."""
    try:
        create_tenant(db, name)
    except QaiError as exc:
        if exc.code != "tenant.exists":
            raise


def get_tenant(db: Database, name: str) -> Tenant:
    with db.read() as s:
        tenant = s.get(Tenant, name)
    if tenant is None:
        raise QaiError("tenant.not_found", f"no tenant named {name!r}", status=404)
    return tenant


def list_tenants(db: Database) -> list[Tenant]:
    with db.read() as s:
        return list(s.scalars(select(Tenant).order_by(Tenant.name)))


# -- tokens -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once
    token_id: str
    role: Role
    tenant: str | None
    expires_at: datetime | None


def issue_token(
    db: Database,
    *,
    role: Role | str,
    tenant: str | None,
    label: str = "",
    ttl: timedelta | None = None,
) -> IssuedToken:
    role = Role(role)
    if role in PLATFORM_ROLES:
        tenant = None
    elif tenant is None:
        raise QaiError("token.tenant_required", f"role {role.value} needs a tenant", status=422)
    else:
        get_tenant(db, tenant)
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    expires = utcnow() + ttl if ttl is not None else None
    with db.write() as s:
        s.add(ApiToken(token_id=token_id, secret_sha256=_hash_secret(secret), tenant=tenant,
                       role=role.value, label=label, created_at=utcnow(), expires_at=expires))
    return IssuedToken(f"qai_{token_id}_{secret}", token_id, role, tenant, expires)


def revoke_token(db: Database, token_id: str) -> None:
    with db.write() as s:
        row = s.get(ApiToken, token_id)
        if row is None:
            raise QaiError("token.not_found", f"no token {token_id!r}", status=404)
        row.revoked_at = row.revoked_at or utcnow()
    forget_verified_tokens()


# token sha256 -> (monotonic expiry of the cache entry, token expiry, principal)
_verified: dict[str, tuple[float, datetime | None, Principal]] = {}
_verified_lock = threading.Lock()


def forget_verified_tokens() -> None:
    with _verified_lock:
        _verified.clear()


def authenticate(
    db: Database,
    authorization: str | None,
    *,
    bootstrap: str | None = None,
    cache_seconds: float = 0.0,
) -> Principal:
    """Resolve an ``Authorization: Bearer …`` header to a principal, or raise 401.

    With ``cache_seconds`` > 0 a verified token is remembered that long, so a hot API does not
    read the token table on every request; a revocation made by another process then takes
    effect within ``cache_seconds`` (one made by this process, at once). Expiry is always exact.
    """
    if cache_seconds > 0:
        hit = remembered(db, authorization)
        if hit is not None:
            return hit
    principal, expires = _authenticate(db, authorization, bootstrap)
    if cache_seconds > 0 and authorization:
        with _verified_lock:
            _verified[_cache_key(db, authorization)] = (time.monotonic() + cache_seconds, expires, principal)
    return principal


def _cache_key(db: Database, authorization: str) -> str:
    # keyed by database too: one process may serve several (tests do)
    return hashlib.sha256(f"{db.url}|{db.schema}|{authorization}".encode()).hexdigest()


def remembered(db: Database, authorization: str | None) -> Principal | None:
    """The principal of a token verified within the cache time and not expired, else None. Reads
    no database, so the HTTP layer calls it on the event loop and goes to a thread only on a miss."""
    if not authorization:
        return None
    with _verified_lock:
        hit = _verified.get(_cache_key(db, authorization))
    if hit is not None and hit[0] > time.monotonic() and (hit[1] is None or hit[1] > utcnow()):
        return hit[2]
    return None


def _authenticate(db: Database, authorization: str | None,
                  bootstrap: str | None) -> tuple[Principal, datetime | None]:
    if not authorization:
        raise QaiError("auth.missing_token", "an Authorization: Bearer token is required", status=401)
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise QaiError("auth.bad_token", "malformed Authorization header", status=401)
    if bootstrap and hmac.compare_digest(token.encode(), bootstrap.encode()):
        return Principal(subject="bootstrap-admin", role=Role.ADMIN), None
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "qai":
        raise QaiError("auth.bad_token", "unknown token", status=401)
    _, token_id, secret = parts
    with db.read() as s:
        row = s.get(ApiToken, token_id)
    if row is None or not hmac.compare_digest(row.secret_sha256, _hash_secret(secret)):
        raise QaiError("auth.bad_token", "unknown token", status=401)
    now = utcnow()
    if row.revoked_at is not None:
        raise QaiError("auth.token_revoked", "token has been revoked", status=401)
    if row.expires_at is not None and row.expires_at <= now:
        raise QaiError("auth.token_expired", "token has expired", status=401)
    return Principal(subject=f"token:{row.token_id}", role=Role(row.role), tenant=row.tenant), row.expires_at
