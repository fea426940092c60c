"""QKD key delivery in the manner of ETSI GS QKD 014 V1.1.1 (2019-02): a typed client, a mock KME,
and the link check an operator runs against a backend's QKD link.

ETSI GS QKD 014 is the REST interface between a Secure Application Entity (SAE, here qai's control
plane or a backend's) and its Key Management Entity (KME, the box on each end of a QKD link that
holds the keys the link produced). The master SAE asks its KME for new keys for a slave SAE
(``enc_keys``) and sends the key ids to the slave, which fetches the same keys from its own KME by
id (``dec_keys``). A backend's ``capabilities.qkd_link`` (see ``harness.catalog``) names the KME
qai asks (``kme_url``) and the backend's SAE id (``sae_id``).

What this module does **not** do: it does not make QKD secure. The KME is trusted with every key
in plaintext, and the standard requires mutual TLS between SAE and KME, which a caller sets up
through ``verify`` (an ``ssl.SSLContext`` with its client certificate). ``docs/qkd-hardening.md``
is the checklist.

* :class:`QkdClient` — the three calls (§5.1 Get status, §5.2 Get key, §5.3 Get key with key IDs)
  with the data formats of §6 as dataclasses; every failure is a ``QaiError`` with a ``qkd.*`` code.
* :func:`mock_kme_app` — a FastAPI app that plays both KMEs of a link, in memory, with keys derived
  from a seed (the same requests give the same keys). For tests and demos only.
* :func:`link_status` — the KME's view of a backend's link (reachable, stored key count, key size),
  for an operator's periodic check; the scheduler does not call it while deciding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
import ssl
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sdk.errors import QaiError

API_PREFIX = "/api/v1/keys"  # ETSI GS QKD 014 §5: https://{KME_hostname}/api/v1/keys/{SAE_ID}/...
# The mock KME knows its caller by this header. A real KME knows the SAE by its TLS client
# certificate (the standard requires mutual TLS) and ignores the header; it is not part of 014.
MOCK_SAE_HEADER = "X-Qai-Mock-SAE-ID"
DEFAULT_TIMEOUT_SECONDS = 5.0
_SAE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


# --------------------------------------------------------------------------------------- data formats


@dataclass(frozen=True)
class QkdLink:
    """A backend's ``capabilities.qkd_link``."""

    kme_url: str
    sae_id: str  # the backend's SAE: the slave SAE of qai's key requests
    only: bool  # the backend's classical control channel runs only over the QKD-protected link

    @classmethod
    def from_capabilities(cls, capabilities: Mapping[str, Any]) -> QkdLink:
        """The link of a backend's capabilities (registration validated its shape; this checks only
        that there is one, so that a caller gets ``qkd.no_link`` rather than a KeyError)."""
        link = capabilities.get("qkd_link")
        if not capabilities.get("qkd") or not isinstance(link, Mapping):
            raise QaiError("qkd.no_link", "the backend has no QKD link (capabilities.qkd_link)", status=422)
        try:
            return cls(kme_url=str(link["kme_url"]), sae_id=str(link["sae_id"]), only=bool(link["only"]))
        except KeyError as exc:
            raise QaiError("qkd.no_link", f"capabilities.qkd_link lacks {exc.args[0]}", status=422) from exc


@dataclass(frozen=True)
class KmeStatus:
    """ETSI GS QKD 014 §6.1 Status data format. Sizes are in bits; counts in keys of ``key_size``."""

    source_kme_id: str
    target_kme_id: str
    master_sae_id: str
    slave_sae_id: str
    key_size: int  # the default size of a key delivered by §5.2
    stored_key_count: int  # keys the KME holds for this pair now: the figure to alert on
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_sae_id_count: int  # additional slave SAEs a key request may name (0: none)

    @classmethod
    def from_json(cls, data: Any) -> KmeStatus:
        d = _object(data, "status")
        return cls(source_kme_id=_text(d, "source_KME_ID"), target_kme_id=_text(d, "target_KME_ID"),
                   master_sae_id=_text(d, "master_SAE_ID"), slave_sae_id=_text(d, "slave_SAE_ID"),
                   key_size=_count(d, "key_size"), stored_key_count=_count(d, "stored_key_count"),
                   max_key_count=_count(d, "max_key_count"), max_key_per_request=_count(d, "max_key_per_request"),
                   max_key_size=_count(d, "max_key_size"), min_key_size=_count(d, "min_key_size"),
                   max_sae_id_count=_count(d, "max_SAE_ID_count"))

    def to_json(self) -> dict[str, Any]:
        return {"source_KME_ID": self.source_kme_id, "target_KME_ID": self.target_kme_id,
                "master_SAE_ID": self.master_sae_id, "slave_SAE_ID": self.slave_sae_id, "key_size": self.key_size,
                "stored_key_count": self.stored_key_count, "max_key_count": self.max_key_count,
                "max_key_per_request": self.max_key_per_request, "max_key_size": self.max_key_size,
                "min_key_size": self.min_key_size, "max_SAE_ID_count": self.max_sae_id_count}


@dataclass(frozen=True)
class QkdKey:
    """One key of an ETSI GS QKD 014 §6.3 Key container. ``key`` is kept out of ``repr`` so that a
    logged or printed key object does not leak the key."""

    key_id: str  # a UUID (§6.3)
    key: bytes = field(repr=False)

    @property
    def size(self) -> int:
        """In bits, as the standard counts."""
        return 8 * len(self.key)


def _object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _bad_response(f"the KME's {what} is not a JSON object")
    return data


def _text(d: Mapping[str, Any], name: str) -> str:
    value = d.get(name)
    if not isinstance(value, str):
        raise _bad_response(f"the KME's {name} is not a string")
    return value


def _count(d: Mapping[str, Any], name: str) -> int:
    value = d.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad_response(f"the KME's {name} is not a non-negative integer")
    return value


def _bad_response(message: str) -> QaiError:
    return QaiError("qkd.bad_response", message, status=502)


def _keys(data: Any) -> list[QkdKey]:
    """ETSI GS QKD 014 §6.3 Key container: ``{"keys": [{"key_ID", "key"}]}`` with base64 keys."""
    items = _object(data, "key container").get("keys")
    if not isinstance(items, list):
        raise _bad_response("the KME's key container has no list of keys")
    out = []
    for item in items:
        d = _object(item, "key")
        try:
            key = base64.b64decode(_text(d, "key"), validate=True)
        except binascii.Error as exc:
            raise _bad_response(f"a key from the KME is not base64: {exc}") from exc
        out.append(QkdKey(key_id=_text(d, "key_ID"), key=key))
    return out


# ------------------------------------------------------------------------------------------- client


class QkdClient:
    """An SAE's client of its KME (ETSI GS QKD 014 §5).

    ``verify`` is passed to httpx: for a real KME an ``ssl.SSLContext`` holding the KME's CA and
    this SAE's client certificate (014 requires both sides of the TLS connection to authenticate).
    ``sae_id`` is this SAE's id, sent in :data:`MOCK_SAE_HEADER` for the mock KME only. Redirects
    are not followed: a KME answer that moves elsewhere must not take a key request with it.
    """

    def __init__(self, kme_url: str, *, sae_id: str | None = None, verify: ssl.SSLContext | bool = True,
                 timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.kme_url = kme_url.rstrip("/")
        headers = {"Accept": "application/json"}
        if sae_id is not None:
            headers[MOCK_SAE_HEADER] = sae_id
        self._http = httpx.Client(base_url=self.kme_url + API_PREFIX, headers=headers, verify=verify,
                                  timeout=timeout, follow_redirects=False)

    def __enter__(self) -> QkdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def status(self, slave_sae_id: str) -> KmeStatus:
        """ETSI GS QKD 014 §5.1 Get status: ``GET /api/v1/keys/{slave_SAE_ID}/status``."""
        return KmeStatus.from_json(self._call("GET", f"/{_segment(slave_sae_id)}/status"))

    def enc_keys(self, slave_sae_id: str, *, number: int = 1, size: int | None = None,
                 method: Literal["GET", "POST"] = "GET") -> list[QkdKey]:
        """ETSI GS QKD 014 §5.2 Get key: ``number`` new keys of ``size`` bits (the KME's default
        ``key_size`` when None) shared with ``slave_sae_id``. ``GET .../enc_keys?number=&size=`` or
        ``POST .../enc_keys`` with a §6.2 Key request; the answer is a §6.3 Key container."""
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise QaiError("qkd.bad_request", "number must be a positive integer", status=422)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 8):
            raise QaiError("qkd.bad_request", "size must be a positive multiple of 8 bits", status=422)
        path = f"/{_segment(slave_sae_id)}/enc_keys"
        request: dict[str, int] = {"number": number, **({} if size is None else {"size": size})}
        # the query form and the §6.2 Key request body carry the same two fields here
        as_query = method == "GET"
        keys = _keys(self._call(method, path, params=request if as_query else None,
                                json=None if as_query else request))
        if len(keys) != number:
            raise _bad_response(f"asked the KME for {number} keys, got {len(keys)}")
        if size is not None and any(k.size != size for k in keys):
            raise _bad_response(f"asked the KME for {size}-bit keys, got {sorted({k.size for k in keys})}")
        return keys

    def dec_keys(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QkdKey]:
        """ETSI GS QKD 014 §5.3 Get key with key IDs, as the slave SAE: the keys ``master_sae_id``
        obtained by §5.2, by the ids it passed on. One id goes as ``GET .../dec_keys?key_ID=``,
        several as ``POST .../dec_keys`` with a §6.4 Key IDs body. Note the path names the
        *master* SAE here (the slave calls its own KME about its master)."""
        if isinstance(key_ids, str) or not key_ids or not all(isinstance(k, str) and k for k in key_ids):
            raise QaiError("qkd.bad_request", "key_ids must be a non-empty list of key ids", status=422)
        path = f"/{_segment(master_sae_id)}/dec_keys"
        if len(key_ids) == 1:
            data = self._call("GET", path, params={"key_ID": key_ids[0]})
        else:
            data = self._call("POST", path, json={"key_IDs": [{"key_ID": k} for k in key_ids]})
        keys = _keys(data)
        if sorted(k.key_id for k in keys) != sorted(key_ids):
            raise _bad_response("the KME answered with other key ids than were asked for")
        return keys

    def _call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
              json: Any = None) -> Any:
        try:
            response = self._http.request(method, path, params=params, json=json)
        except httpx.HTTPError as exc:  # refused, reset, timed out, TLS failure: no answer from the KME
            raise QaiError("qkd.unreachable", f"the KME at {self.kme_url} did not answer: {exc}", status=503,
                           details={"kme_url": self.kme_url}) from exc
        if response.status_code != 200:
            raise _kme_error(self.kme_url, response)
        try:
            return response.json()
        except ValueError as exc:
            raise _bad_response(f"the KME at {self.kme_url} answered with no JSON") from exc


def _segment(sae_id: str) -> str:
    """An SAE id as one URL path segment. Registration keeps ids to this charset (the same rule as
    ``harness.catalog.SAE_ID``); anything else is refused rather than encoded, so an id can never
    name another KME path (no '/', and no leading '.' that would make '..')."""
    if not isinstance(sae_id, str) or not _SAE_ID.fullmatch(sae_id):
        raise QaiError("qkd.bad_request", f"{sae_id!r} is not an SAE id (1-128 of A-Z, a-z, 0-9, '.', '_', "
                       "':', '-', starting with a letter or digit)", status=422)
    return sae_id


# ETSI GS QKD 014 §5 lists 400 (bad request format), 401 (unauthorized) and 503 (error on the
# server side) for every method; the answer carries a §6.5 Error body ({"message", "details"}).
_STATUS_CODES = {400: ("qkd.rejected", 422), 401: ("qkd.unauthorized", 403), 503: ("qkd.kme_unavailable", 503)}


def _kme_error(kme_url: str, response: httpx.Response) -> QaiError:
    code, status = _STATUS_CODES.get(response.status_code, ("qkd.kme_error", 502))
    try:
        body = response.json()
    except ValueError:
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    kme_message = message if isinstance(message, str) else response.text[:200]
    return QaiError(code, f"the KME at {kme_url} answered {response.status_code}: {kme_message}", status=status,
                    details={"kme_url": kme_url, "kme_status": response.status_code, "kme_message": kme_message})


# -------------------------------------------------------------------------------------- link check


def link_status(capabilities: Mapping[str, Any], *, sae_id: str | None = None,
                verify: ssl.SSLContext | bool = True, timeout: float = DEFAULT_TIMEOUT_SECONDS,
                min_stored_keys: int = 1) -> dict[str, Any]:
    """The state of a backend's QKD link as its KME reports it (ETSI GS QKD 014 §5.1 Get status).

    Returns ``kme_url``, ``sae_id``, ``only``, ``reachable`` (the KME answered with a status),
    ``stored_key_count`` and ``key_size`` (None when unreachable), ``healthy`` (reachable with at
    least ``min_stored_keys`` keys stored) and ``error`` (``{"code", "message"}`` or None). A
    failure of the link is a result, not an exception; a backend with no link is ``qkd.no_link``.

    An operator (or a monitor) calls it per QKD backend and acts on it: alert on a falling
    ``stored_key_count``, and mark a backend whose link is not healthy out of service (``qai backends
    status ID maintenance``) so that the scheduler, which does not call the KME while deciding,
    stops routing ``qkd: required`` work to it. See ``docs/qkd-hardening.md``.
    """
    link = QkdLink.from_capabilities(capabilities)
    out: dict[str, Any] = {"kme_url": link.kme_url, "sae_id": link.sae_id, "only": link.only, "reachable": False,
                           "stored_key_count": None, "key_size": None, "healthy": False, "error": None}
    try:
        with QkdClient(link.kme_url, sae_id=sae_id, verify=verify, timeout=timeout) as client:
            status = client.status(link.sae_id)
    except QaiError as exc:
        out["error"] = {"code": exc.code, "message": exc.message}
        return out
    out.update(reachable=True, stored_key_count=status.stored_key_count, key_size=status.key_size,
               healthy=status.stored_key_count >= min_stored_keys)
    return out


# ---------------------------------------------------------------------------------------- mock KME


class _MockError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class MockKme:
    """The state of a mock QKD link: a master SAE linked to each of ``slave_sae_ids``, each pair
    with a pool of ``stored_key_count`` keys of ``key_size`` bits. Key *i* of a pair is
    SHAKE-256(seed, master, slave, i), so a run is reproducible; it is no secret at all."""

    def __init__(self, *, master_sae_id: str, slave_sae_ids: Sequence[str], seed: int, kme_id: str,
                 peer_kme_id: str, key_size: int, stored_key_count: int, max_key_count: int,
                 max_key_per_request: int, max_key_size: int, min_key_size: int) -> None:
        if key_size % 8 or not min_key_size <= key_size <= max_key_size:
            raise ValueError("key_size must be a multiple of 8 within [min_key_size, max_key_size]")
        self.master_sae_id, self.slave_sae_ids = master_sae_id, tuple(slave_sae_ids)
        self.seed, self.kme_id, self.peer_kme_id = seed, kme_id, peer_kme_id
        self.key_size, self.max_key_count = key_size, max_key_count
        self.max_key_per_request, self.max_key_size, self.min_key_size = max_key_per_request, max_key_size, min_key_size
        self.stored = {s: min(stored_key_count, max_key_count) for s in self.slave_sae_ids}
        self.issued = dict.fromkeys(self.slave_sae_ids, 0)  # keys derived so far, per slave
        # keys the master took and the slave has not yet fetched: (master, slave) -> {key_ID: key}
        self.pending: dict[tuple[str, str], dict[str, bytes]] = {}
        self.lock = threading.Lock()  # handlers run in uvicorn's thread pool

    def _pair(self, caller: str, slave: str) -> None:
        if slave not in self.slave_sae_ids:
            raise _MockError(400, f"unknown slave SAE {slave!r}: this KME has no link to it")
        if caller != self.master_sae_id:
            raise _MockError(401, f"SAE {caller!r} is not the master SAE of this KME")

    def status(self, caller: str, slave: str) -> KmeStatus:
        """ETSI GS QKD 014 §5.1 Get status."""
        self._pair(caller, slave)
        with self.lock:
            stored = self.stored[slave]
        return KmeStatus(source_kme_id=self.kme_id, target_kme_id=self.peer_kme_id, master_sae_id=caller,
                         slave_sae_id=slave, key_size=self.key_size, stored_key_count=stored,
                         max_key_count=self.max_key_count, max_key_per_request=self.max_key_per_request,
                         max_key_size=self.max_key_size, min_key_size=self.min_key_size, max_sae_id_count=0)

    def enc_keys(self, caller: str, slave: str, request: Mapping[str, Any]) -> list[QkdKey]:
        """ETSI GS QKD 014 §5.2 Get key, on a §6.2 Key request already read from the query or body."""
        self._pair(caller, slave)
        unknown = sorted(set(request) - {"number", "size", "additional_slave_SAE_IDs", "extension_mandatory",
                                         "extension_optional"})
        if unknown:
            raise _MockError(400, f"unknown key request fields {unknown}")
        if request.get("additional_slave_SAE_IDs"):  # max_SAE_ID_count is 0: key multicast is not offered
            raise _MockError(400, "additional_slave_SAE_IDs is not supported by this KME (max_SAE_ID_count 0)")
        if request.get("extension_mandatory"):  # §6.2: a KME refuses mandatory extensions it does not know
            raise _MockError(400, "this KME supports no mandatory extensions")
        number, size = request.get("number", 1), request.get("size", self.key_size)
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= self.max_key_per_request:
            raise _MockError(400, f"number must be an integer from 1 to {self.max_key_per_request}")
        if (isinstance(size, bool) or not isinstance(size, int) or size % 8
                or not self.min_key_size <= size <= self.max_key_size):
            raise _MockError(400, f"size must be a multiple of 8 from {self.min_key_size} to {self.max_key_size}")
        cost = number * math.ceil(size / self.key_size)  # a longer key uses up several stored keys
        with self.lock:
            if self.stored[slave] < cost:
                raise _MockError(503, f"not enough key material for {slave!r}: {self.stored[slave]} keys stored, "
                                      f"{cost} needed")
            self.stored[slave] -= cost
            first, self.issued[slave] = self.issued[slave], self.issued[slave] + number
            keys = [self._derive(slave, first + i, size) for i in range(number)]
            self.pending.setdefault((caller, slave), {}).update((k.key_id, k.key) for k in keys)
        return keys

    def dec_keys(self, caller: str, master: str, key_ids: Sequence[str]) -> list[QkdKey]:
        """ETSI GS QKD 014 §5.3 Get key with key IDs: the slave fetches what its master took. Each
        key is handed to the slave once, then forgotten (a KME keeps no delivered key)."""
        if master != self.master_sae_id:
            raise _MockError(400, f"unknown master SAE {master!r}: this KME has no link to it")
        if caller not in self.slave_sae_ids:
            raise _MockError(401, f"SAE {caller!r} is not a slave SAE of this KME")
        if not key_ids:
            raise _MockError(400, "no key_ID given")
        with self.lock:
            pending = self.pending.get((master, caller), {})
            missing = sorted(set(key_ids) - set(pending))
            if missing:
                raise _MockError(400, f"no key with key_ID {missing} for this pair of SAEs")
            return [QkdKey(key_id=k, key=pending.pop(k)) for k in key_ids]

    def _derive(self, slave: str, index: int, size: int) -> QkdKey:
        material = b"\0".join([b"qai-mock-kme", str(self.seed).encode(), self.master_sae_id.encode(),
                               slave.encode(), str(index).encode()])
        key_id = uuid.UUID(bytes=hashlib.sha256(b"id\0" + material).digest()[:16], version=4)
        return QkdKey(key_id=str(key_id), key=hashlib.shake_256(b"key\0" + material).digest(size // 8))


def mock_kme_app(*, master_sae_id: str = "qai", slave_sae_ids: Sequence[str] = ("backend",), seed: int = 0,
                 kme_id: str = "KME-QAI", peer_kme_id: str = "KME-BACKEND", key_size: int = 256,
                 stored_key_count: int = 1000, max_key_count: int = 100_000, max_key_per_request: int = 128,
                 max_key_size: int = 1024, min_key_size: int = 64) -> FastAPI:
    """A mock KME speaking ETSI GS QKD 014 §5 over HTTP, for tests and demos. It plays both KMEs of
    the links from ``master_sae_id`` to each of ``slave_sae_ids``: the master's calls (§5.1, §5.2)
    and the slaves' (§5.3) reach the same in-memory store. The caller is named by
    :data:`MOCK_SAE_HEADER` (the master when absent) where a real KME reads a client certificate.
    Its keys come from ``seed`` and protect nothing. ``app.state.kme`` is the :class:`MockKme`.
    (FastAPI resolves the handlers' ``Request`` annotations in this module's globals, hence the
    module-level import.)"""
    kme = MockKme(master_sae_id=master_sae_id, slave_sae_ids=slave_sae_ids, seed=seed, kme_id=kme_id,
                  peer_kme_id=peer_kme_id, key_size=key_size, stored_key_count=stored_key_count,
                  max_key_count=max_key_count, max_key_per_request=max_key_per_request, max_key_size=max_key_size,
                  min_key_size=min_key_size)
    app = FastAPI(title="qai mock KME (ETSI GS QKD 014)", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kme = kme

    @app.exception_handler(_MockError)
    async def error(request: Request, exc: _MockError) -> JSONResponse:
        return JSONResponse({"message": exc.message}, status_code=exc.status)  # §6.5 Error data format

    def caller(request: Request) -> str:
        return request.headers.get(MOCK_SAE_HEADER, master_sae_id)

    def container(keys: list[QkdKey]) -> dict[str, Any]:  # §6.3 Key container
        return {"keys": [{"key_ID": k.key_id, "key": base64.b64encode(k.key).decode()} for k in keys]}

    def query_ints(request: Request, *names: str) -> dict[str, int]:
        out = {}
        for name in names:
            raw = request.query_params.get(name)
            if raw is not None:
                try:
                    out[name] = int(raw)
                except ValueError:
                    raise _MockError(400, f"{name} must be an integer") from None
        return out

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise _MockError(400, "the request body is not JSON") from None
        if not isinstance(data, dict):
            raise _MockError(400, "the request body must be a JSON object")
        return data

    @app.get(API_PREFIX + "/{slave_sae_id}/status")
    def get_status(slave_sae_id: str, request: Request) -> dict[str, Any]:  # §5.1 Get status
        return kme.status(caller(request), slave_sae_id).to_json()

    @app.get(API_PREFIX + "/{slave_sae_id}/enc_keys")
    def get_enc_keys(slave_sae_id: str, request: Request) -> dict[str, Any]:  # §5.2 Get key (GET)
        return container(kme.enc_keys(caller(request), slave_sae_id, query_ints(request, "number", "size")))

    @app.post(API_PREFIX + "/{slave_sae_id}/enc_keys")
    async def post_enc_keys(slave_sae_id: str, request: Request) -> dict[str, Any]:  # §5.2 Get key (POST)
        return container(kme.enc_keys(caller(request), slave_sae_id, await body(request)))

    @app.get(API_PREFIX + "/{master_sae_id}/dec_keys")
    def get_dec_keys(master_sae_id: str, request: Request) -> dict[str, Any]:  # §5.3 (GET)
        return container(kme.dec_keys(caller(request), master_sae_id, request.query_params.getlist("key_ID")))

    @app.post(API_PREFIX + "/{master_sae_id}/dec_keys")
    async def post_dec_keys(master_sae_id: str, request: Request) -> dict[str, Any]:  # §5.3 (POST)
        ids = (await body(request)).get("key_IDs")  # §6.4 Key IDs
        if not isinstance(ids, list) or not all(isinstance(i, dict) and isinstance(i.get("key_ID"), str)
                                                for i in ids):
            raise _MockError(400, 'key_IDs must be a list of {"key_ID": "..."}')
        return container(kme.dec_keys(caller(request), master_sae_id, [i["key_ID"] for i in ids]))

    return app
