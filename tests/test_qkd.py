"""QKD gating: the ``qkd`` filter against the tenant policy (engine and service over HTTP), the
backends' ``qkd_link`` shape, the policy values, and the ETSI GS QKD 014 client against the mock
KME on a real listening socket."""

from __future__ import annotations

import copy
import json
import random
import uuid
from typing import Any

import httpx
import pytest

from harness.backends import import_snapshot
from harness.catalog import BackendInfo, backend_info, catalog, catalog_snapshot
from kms.qkd import MOCK_SAE_HEADER, KmeStatus, QkdClient, QkdKey, link_status, mock_kme_app
from orchestrator.app import create_app
from orchestrator.auth import Principal, Role, check_crypto_policy, create_tenant, issue_token
from orchestrator.db import Database
from orchestrator.services import Services
from scheduler.engine import PRIORITY_CLASSES, SchedulingError, decide, rejections
from scheduler.plugins import BUILTIN, resolve
from scheduler.replay import replay
from scheduler.service import Scheduler
from sdk.canonical import canonical_json
from sdk.errors import QaiError
from tests.conftest import LiveServer, free_port
from tests.test_jobs import svc  # noqa: F401  (the PostgreSQL+S3 and SQLite+local fixture)
from tests.test_scheduler_engine import MODES, _backend, _inputs
from tests.test_scheduler_service import CATALOG, _submit, data_path, ready  # noqa: F401  (fixtures)

REQUIRED_REASON = "qkd: has no QKD link; the tenant's policy requires one"
EXCLUDED_REASON = "qkd: is reachable only over its QKD link; the tenant's policy excludes QKD"


def _link(only: bool, sae_id: str = "backend", kme_url: str = "https://kme.example.invalid") -> dict[str, Any]:
    return {"kme_url": kme_url, "sae_id": sae_id, "only": only}


def _qkd_backend(name: str, *, only: bool, **over: Any) -> dict[str, Any]:
    caps = {"qkd": True, "qkd_link": _link(only, sae_id=f"sae-{name}"), **over.pop("capabilities", {})}
    return _backend(name, capabilities=caps, **over)


def _chosen(body: dict[str, Any]) -> str | None:
    return None if body["chosen"] is None else str(body["chosen"]["backend_id"])


# ------------------------------------------------------------------------------------------ engine


def test_the_qkd_filter_is_version_2_in_every_new_decision() -> None:
    assert [(p.name, p.version) for p in BUILTIN if p.name.startswith("qkd")] == [("qkd", "2"),
                                                                                   ("qkd-preference", "1")]
    recorded = _inputs([_backend("a")])["profile"]["plugins"]
    assert {"name": "qkd", "version": "2", "kind": "filter"} in recorded


def test_required_with_no_qkd_backend_fits_nothing_and_every_reason_names_the_filter() -> None:
    backends = [_backend("a"), _backend("b", cost_per_shot=0.001), _backend("c", capabilities={"qkd": False})]
    body = decide(_inputs(backends, policy={"qkd": "required"}), BUILTIN)
    assert body["chosen"] is None
    assert rejections(body) == [{"backend_id": b, "reasons": [REQUIRED_REASON]} for b in ("a", "b", "c")]


def test_excluded_never_picks_a_qkd_only_backend_even_when_it_scores_best() -> None:
    backends = [_qkd_backend("qonly", only=True, cost_per_shot=0.00001),  # ten times better per cost
                _qkd_backend("dual", only=False, cost_per_shot=0.0001),
                _backend("plain", cost_per_shot=0.0002)]
    for policy in ({}, {"qkd": "excluded"}):  # excluded is the default
        body = decide(_inputs(backends, policy=policy), BUILTIN)
        # the dual-stack QKD backend is fine: the job goes over its classical PQC channel
        assert _chosen(body) == "dual"
        assert rejections(body) == [{"backend_id": "qonly", "reasons": [EXCLUDED_REASON]}]
    # the QKD-only backend is the best one: required and preferred tenants get it
    assert _chosen(decide(_inputs(backends, policy={"qkd": "required"}), BUILTIN)) == "qonly"
    assert _chosen(decide(_inputs(backends, policy={"qkd": "preferred"}), BUILTIN)) == "qonly"
    # ... and a tenant that excludes QKD gets nothing rather than it
    alone = decide(_inputs(backends[:1]), BUILTIN)
    assert alone["chosen"] is None and rejections(alone)[0]["reasons"] == [EXCLUDED_REASON]


def test_preferred_picks_the_qkd_backend_on_a_near_tie_and_only_then() -> None:
    # "link" costs 5% more: within the 1.1 bonus for preferred, a loss for everyone else
    backends = [_backend("plain", cost_per_shot=0.0001), _qkd_backend("link", only=False, cost_per_shot=0.000105)]
    body = decide(_inputs(backends, policy={"qkd": "preferred"}), BUILTIN)
    assert _chosen(body) == "link"
    terms = {r["backend_id"]: r["terms"]["qkd_factor"] for r in body["backends"]}
    assert terms == {"link": pytest.approx(1.1), "plain": 1.0}
    assert _chosen(decide(_inputs(backends), BUILTIN)) == "plain"
    # 20% dearer is beyond the bonus: preferred is a preference, not a requirement
    dear = [backends[0], _qkd_backend("link", only=False, cost_per_shot=0.00012)]
    assert _chosen(decide(_inputs(dear, policy={"qkd": "preferred"}), BUILTIN)) == "plain"


def _random_qkd_inputs(rng: random.Random) -> dict[str, Any]:
    """A random field of backends (some with no QKD, some dual-stack, some QKD-only) under a random
    qkd policy; the rest of the job and backends vary as in test_scheduler_engine."""
    backends = []
    for i in range(rng.randint(1, 10)):
        kind = rng.choice(["none", "dual", "only"])
        caps: dict[str, Any] = {"crypto_modes": rng.sample(MODES, rng.randint(1, 3)), "qkd": kind != "none",
                                "num_qubits": rng.choice([5, 27, 127]), "max_shots": rng.choice([20000, 100000])}
        if kind != "none":
            caps["qkd_link"] = _link(kind == "only", sae_id=f"sae-{i}")
        predicted = rng.random() > 0.1
        backends.append(_backend(
            f"b{i:02d}", cost_per_shot=rng.choice([0.00005, 0.0001, 0.0003]) * rng.uniform(0.5, 2),
            availability=rng.uniform(0.7, 1.0), status=rng.choice(["online"] * 8 + ["offline"]),
            queue_wait_seconds=rng.expovariate(1 / 300), capabilities=caps,
            prediction={"shot_multiplier": rng.uniform(1, 8), "expected_fidelity": rng.uniform(0.3, 1.0),
                        "confidence": rng.random(), "estimated_seconds": rng.uniform(1, 600)} if predicted else None,
            prediction_error=None if predicted else {"code": "em_policy.circuit_too_large", "message": "x"}))
    policy = rng.choice([{}, {"qkd": "excluded"}, {"qkd": "required"}, {"qkd": "preferred"},
                         {"qkd": "excluded", "min_crypto_mode": "hybrid"}])
    return _inputs(backends, seed=rng.randint(0, 2**31), policy=policy, crypto_mode=rng.choice(MODES),
                   priority_class=rng.choice(PRIORITY_CLASSES), num_qubits=rng.randint(1, 20))


def test_400_random_decisions_keep_the_qkd_policy_and_replay_byte_identically() -> None:
    rng = random.Random(9)
    best_excluded = 0  # decisions where a QKD-only backend would have won but the policy excluded it
    for _ in range(400):
        inputs = _random_qkd_inputs(rng)
        body = decide(inputs, BUILTIN)
        by_id = {b["backend_id"]: b for b in inputs["backends"]}
        chosen = _chosen(body)
        mode = inputs["tenant_policy"].get("qkd", "excluded")
        only = {i for i, b in by_id.items() if b["capabilities"].get("qkd_link", {}).get("only")}
        if mode == "excluded":
            assert chosen not in only
            for row in body["backends"]:
                verdict = next(f for f in row["filters"] if f["plugin"] == "qkd")
                assert (verdict["verdict"] == "reject") == (row["backend_id"] in only)
            unrestricted = {**inputs, "tenant_policy": {**inputs["tenant_policy"], "qkd": "required"}}
            best_excluded += _chosen(decide(unrestricted, BUILTIN)) in only
        elif mode == "required":
            assert chosen is None or by_id[chosen]["capabilities"]["qkd"]
        else:  # preferred: the qkd filter passes every backend
            assert all(f["verdict"] == "pass" for r in body["backends"] for f in r["filters"] if f["plugin"] == "qkd")
        stored = json.loads(canonical_json(inputs))  # what the decision envelope carries
        assert canonical_json(decide(stored, resolve([p.name for p in BUILTIN]))) == canonical_json(body)
    assert best_excluded > 10  # the generator does put the best backend behind a QKD-only link


def test_a_decision_recorded_by_qkd_filter_v1_replays_with_v1() -> None:
    """Bumping the filter must not break the replay (and the audit) of decisions signed before."""
    backends = [_qkd_backend("qonly", only=True, cost_per_shot=0.00001), _backend("plain")]
    recorded = _inputs(backends)
    for p in recorded["profile"]["plugins"]:
        if p["name"] == "qkd":
            p["version"] = "1"  # as the scheduler recorded it before version 2
    old = decide(recorded, BUILTIN)
    assert _chosen(old) == "qonly"  # version 1 had no exclusion: the recorded decision stands
    assert canonical_json(decide(json.loads(canonical_json(recorded)), BUILTIN)) == canonical_json(old)
    assert _chosen(decide(_inputs(backends), BUILTIN)) == "plain"  # a new decision uses version 2
    unknown = copy.deepcopy(recorded)
    next(p for p in unknown["profile"]["plugins"] if p["name"] == "qkd")["version"] = "0"
    with pytest.raises(SchedulingError, match="recorded with plugins"):
        decide(unknown, BUILTIN)


# ----------------------------------------------------------------------------- capability shape


def test_catalog_qkd_links_are_dual_stack_and_round_trip() -> None:
    infos = catalog()
    linked = [i for i in infos if i.capabilities["qkd"]]
    assert linked and all(i.capabilities["qkd_link"]["only"] is False for i in linked)
    assert all("qkd_link" not in i.capabilities for i in infos if not i.capabilities["qkd"])
    for info in infos:
        assert BackendInfo.from_json(info.to_json()) == info


def test_qkd_link_shape_is_validated_on_registration() -> None:
    snap = catalog_snapshot("fake_manila")
    good = backend_info("fake_manila").to_json()
    link = _link(True, sae_id="sae-manila", kme_url="https://kme.local:8443/kme-a")

    def caps(**over: Any) -> dict[str, Any]:
        return {**good, "capabilities": {**good["capabilities"], **over}}

    info = BackendInfo.from_json(caps(qkd=True, qkd_link=link), snap)
    assert info.capabilities["qkd_link"] == link
    for loopback in ("http://127.0.0.1:8080", "http://localhost:9", "http://[::1]:80/kme"):
        BackendInfo.from_json(caps(qkd=True, qkd_link={**link, "kme_url": loopback}), snap)
    bad = [
        (caps(qkd=True), "capabilities.qkd_link"),  # a QKD link with no key delivery
        (caps(qkd=False, qkd_link=link), "capabilities.qkd_link"),  # a link the flag denies
        (caps(qkd=True, qkd_link="https://kme"), "capabilities.qkd_link"),
        (caps(qkd=True, qkd_link={"kme_url": link["kme_url"], "sae_id": "x"}), "capabilities.qkd_link"),
        (caps(qkd=True, qkd_link={**link, "extra": 1}), "capabilities.qkd_link"),
        (caps(qkd=True, qkd_link={**link, "kme_url": "http://kme.example.com"}), "capabilities.qkd_link.kme_url"),
        (caps(qkd=True, qkd_link={**link, "kme_url": "ftp://kme"}), "capabilities.qkd_link.kme_url"),
        (caps(qkd=True, qkd_link={**link, "kme_url": "https://u:p@kme"}), "capabilities.qkd_link.kme_url"),
        (caps(qkd=True, qkd_link={**link, "kme_url": "https://kme/?x=1"}), "capabilities.qkd_link.kme_url"),
        (caps(qkd=True, qkd_link={**link, "kme_url": "https://kme:port"}), "capabilities.qkd_link.kme_url"),
        (caps(qkd=True, qkd_link={**link, "kme_url": 7}), "capabilities.qkd_link.kme_url"),
        (caps(qkd=True, qkd_link={**link, "sae_id": "../status"}), "capabilities.qkd_link.sae_id"),
        (caps(qkd=True, qkd_link={**link, "sae_id": ""}), "capabilities.qkd_link.sae_id"),
        (caps(qkd=True, qkd_link={**link, "only": "yes"}), "capabilities.qkd_link.only"),
    ]
    for data, where in bad:
        with pytest.raises(QaiError) as exc:
            BackendInfo.from_json(data, snap)
        assert (exc.value.code, exc.value.details.get("field")) == ("backends.bad_info", where), data


# ---------------------------------------------------------------------------------- tenant policy


def test_the_policy_takes_the_three_qkd_values_and_nothing_else(sqlite_db: Database) -> None:
    for value in ("required", "preferred", "excluded", None):
        check_crypto_policy({"qkd": value})
    for value in ("maybe", "Required", "", True, ["required"]):
        with pytest.raises(QaiError) as caught:
            check_crypto_policy({"qkd": value})
        assert (caught.value.code, caught.value.details) == ("tenant.bad_policy", {"field": "qkd"})
    with pytest.raises(QaiError) as refused:
        create_tenant(sqlite_db, "org-maybe", crypto_policy={"qkd": "maybe"})
    assert refused.value.code == "tenant.bad_policy" and refused.value.status == 422
    create_tenant(sqlite_db, "org-sure", crypto_policy={"qkd": "required"})


# ------------------------------------------------------------------------------ service and HTTP


def _register(db: Database, backend_id: str, **capabilities: Any) -> None:
    """Re-register a catalog backend with other QKD capabilities, through the validation an
    operator's ``qai backends import --backend-info`` goes through."""
    data = backend_info(backend_id).to_json()
    caps = {k: v for k, v in data["capabilities"].items() if k != "qkd_link"} | capabilities
    import_snapshot(db, catalog_snapshot(backend_id), BackendInfo.from_json({**data, "capabilities": caps}))


def _tenant(services: Services, name: str, policy: dict[str, Any]) -> str:
    create_tenant(services.db, name, crypto_policy=policy)
    services.kms.create_key(f"{name}.manifests", tenant=name, principal=Principal.system("test"))
    return issue_token(services.db, role=Role.SUBMITTER, tenant=name).token


def test_required_with_no_qkd_backend_is_a_422_naming_the_qkd_filter_over_http(ready: Services) -> None:  # noqa: F811
    services = ready
    for info in catalog():  # a catalog with no QKD link at all
        if info.capabilities["qkd"]:
            _register(services.db, info.backend_id, qkd=False)
    token = _tenant(services, "org-qkd", {"qkd": "required"})
    job_id = _submit(services, tenant="org-qkd")
    with LiveServer(create_app(services)) as srv, httpx.Client(base_url=srv.url, timeout=120, headers={
            "Authorization": f"Bearer {token}"}) as c:
        r = c.post("/v1/schedule", json={"job_id": job_id})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "scheduler.no_backend"
        listed = {b["backend_id"]: b["reasons"] for b in err["details"]["backends"]}
        assert len(listed) == CATALOG
        assert all(REQUIRED_REASON in reasons for reasons in listed.values()), listed
        # the refusal is a recorded, signed decision like any other, and it replays
        decision_id = err["details"]["decision_id"]
        assert c.get(f"/v1/decisions/{decision_id}").status_code == 200
        rep = c.post(f"/v1/decisions/{decision_id}/replay").json()
        assert rep["ok"] and rep["identical"], rep
        profile = c.get(f"/v1/decisions/{decision_id}").json()["document"]["inputs"]["profile"]
        assert {"name": "qkd", "version": "2", "kind": "filter"} in profile["plugins"]


def test_excluded_never_routes_to_a_qkd_only_backend_the_service_would_pick(ready: Services) -> None:  # noqa: F811
    services = ready
    system = Principal.system("test")
    _tenant(services, "org-qkd", {"qkd": "required"})
    # A fresh Scheduler per decision reads the registry afresh (the service caches it for seconds).
    first = Scheduler(services).schedule(_submit(services), system)
    best = _chosen(first.body)
    assert best is not None
    # the backend the default tenant was given becomes reachable only over its QKD link
    _register(services.db, best, qkd=True, qkd_link=_link(True, sae_id=f"sae-{best}"))
    again = Scheduler(services).schedule(_submit(services), system).body
    assert _chosen(again) not in (None, best)  # the test model predicts for several backends
    row = next(r for r in again["backends"] if r["backend_id"] == best)
    assert not row["eligible"] and [f.get("reason") for f in row["filters"] if f["plugin"] == "qkd"] == [
        EXCLUDED_REASON.removeprefix("qkd: ")]
    # a tenant that requires QKD gets it
    required = Scheduler(services).schedule(_submit(services, tenant="org-qkd"), system)
    inputs = {b["backend_id"]: b for b in required.document["inputs"]["backends"]}
    assert inputs[_chosen(required.body) or ""]["capabilities"]["qkd"] is True
    assert replay(services, required.decision_id).ok


# ------------------------------------------------------------------- ETSI GS QKD 014 client and mock


def test_014_client_against_the_mock_kme_over_http() -> None:
    app = mock_kme_app(master_sae_id="qai", slave_sae_ids=("backend",), seed=5)
    with LiveServer(app) as srv, QkdClient(srv.url) as master, QkdClient(srv.url, sae_id="backend") as slave:
        # §5.1 Get status
        status = master.status("backend")
        assert isinstance(status, KmeStatus)
        assert (status.master_sae_id, status.slave_sae_id, status.key_size, status.stored_key_count) == (
            "qai", "backend", 256, 1000)
        # §5.2 Get key, both forms; a 512-bit key uses two stored 256-bit keys
        keys = master.enc_keys("backend", number=3, size=512)
        posted = master.enc_keys("backend", number=2, method="POST")
        assert [k.size for k in keys + posted] == [512] * 3 + [256] * 2
        assert len({k.key_id for k in keys + posted}) == 5 and all(uuid.UUID(k.key_id) for k in keys)
        assert master.status("backend").stored_key_count == 1000 - 3 * 2 - 2
        # §5.3 Get key with key IDs: the slave gets the same keys, by id, once
        assert slave.dec_keys("qai", [keys[0].key_id]) == [keys[0]]
        rest = keys[1:] + posted
        assert slave.dec_keys("qai", [k.key_id for k in rest]) == rest
        with pytest.raises(QaiError) as again:
            slave.dec_keys("qai", [keys[0].key_id])
        assert again.value.code == "qkd.rejected" and again.value.details["kme_status"] == 400
        # unknown SAEs, and an SAE asking for what is not its to ask
        for call in (lambda: master.status("nobody"), lambda: master.enc_keys("nobody"),
                     lambda: slave.dec_keys("nobody", [keys[1].key_id])):
            with pytest.raises(QaiError) as unknown:
                call()
            assert unknown.value.code == "qkd.rejected" and "unknown" in unknown.value.details["kme_message"]
        with pytest.raises(QaiError) as foreign:
            slave.enc_keys("backend")
        assert foreign.value.code == "qkd.unauthorized"
        # requests outside the KME's limits are refused by it (§5.1 status states them)
        with pytest.raises(QaiError) as big:
            master.enc_keys("backend", size=2048)
        assert big.value.code == "qkd.rejected"
        with pytest.raises(QaiError) as local:
            master.enc_keys("backend", number=0)
        assert local.value.code == "qkd.bad_request"
        for sae in ("../backend", "..", "a/b", ""):
            with pytest.raises(QaiError) as path:
                master.status(sae)
            assert path.value.code == "qkd.bad_request"
        # a link's status is its master's to ask; the answer is a §6.5 Error body
        raw = httpx.get(f"{srv.url}/api/v1/keys/backend/status", headers={MOCK_SAE_HEADER: "backend"})
        assert raw.status_code == 401 and set(raw.json()) == {"message"}
    assert "key=" not in repr(keys[0])  # a logged key object does not carry the key


def test_the_mock_is_deterministic_from_its_seed_and_runs_dry() -> None:
    def first_keys(seed: int) -> list[QkdKey]:
        with LiveServer(mock_kme_app(seed=seed)) as srv, QkdClient(srv.url) as c:
            return c.enc_keys("backend", number=2)

    assert first_keys(1) == first_keys(1) != first_keys(2)
    with LiveServer(mock_kme_app(stored_key_count=2)) as srv, QkdClient(srv.url) as c:
        c.enc_keys("backend", number=2)
        with pytest.raises(QaiError) as dry:
            c.enc_keys("backend")
        assert dry.value.code == "qkd.kme_unavailable" and dry.value.details["kme_status"] == 503
        assert c.status("backend").stored_key_count == 0


def test_link_status_reports_the_link_and_never_raises_for_a_dead_one() -> None:
    with LiveServer(mock_kme_app(slave_sae_ids=("sae-kyiv",), stored_key_count=40)) as srv:
        caps = {"qkd": True, "qkd_link": _link(True, sae_id="sae-kyiv", kme_url=srv.url)}
        assert link_status(caps) == {"kme_url": srv.url, "sae_id": "sae-kyiv", "only": True, "reachable": True,
                                     "stored_key_count": 40, "key_size": 256, "healthy": True, "error": None}
        low = link_status(caps, min_stored_keys=100)
        assert low["reachable"] and not low["healthy"]
        wrong = link_status({**caps, "qkd_link": _link(True, sae_id="sae-other", kme_url=srv.url)})
        assert not wrong["reachable"] and wrong["error"]["code"] == "qkd.rejected"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    down = link_status({"qkd": True, "qkd_link": _link(False, kme_url=dead)})
    assert (down["reachable"], down["healthy"], down["stored_key_count"]) == (False, False, None)
    assert down["error"]["code"] == "qkd.unreachable"
    for caps in ({"qkd": False}, {"qkd": True}, backend_info("fake_manila").capabilities):
        with pytest.raises(QaiError) as none:
            link_status(caps)
        assert none.value.code == "qkd.no_link"


def test_link_status_of_a_catalog_link_is_a_result_not_an_error() -> None:
    kyiv = backend_info("fake_kyiv").capabilities  # an assumed KME under .invalid (RFC 2606)
    out = link_status(kyiv, timeout=2.0)
    assert out["reachable"] is False and out["error"]["code"] == "qkd.unreachable"

