"""Telemetry: a live app (real uvicorn, PostgreSQL, S3 over HTTP, SoftHSM) runs a demo-sized workload,
then ``/metrics`` is scraped and parsed. Every metric the operations issue names is there with sane
values, the labels stay bounded (route templates, never ids), and every Grafana panel query in
``infra/grafana/dashboards/`` uses only series the app really exports. No mocks."""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.app import create_app
from orchestrator.auth import Role, issue_token
from orchestrator.services import Services
from orchestrator.settings import Settings
from sdk.manifest import qasm_sha256
from tests.conftest import LiveServer, storage_settings
from tests.ledger_helpers import ledger_services
from tests.test_jobs import _sign
from tests.test_manifest import manifest
from tests.test_policy import GHZ3
from tests.test_scheduler_service import _wait_for, data_path, ready  # noqa: F401  (the trained-model fixture)

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "infra" / "grafana" / "dashboards").glob("*.json"))
NIGHTLY_BACKENDS = ("fake_manila", "fake_nairobi", "fake_guadalupe")

# Every metric the issue names, by family (the parser drops a counter's _total).
REQUIRED = {
    "qai_http_request_duration_seconds": "histogram",  # request latency per route and status
    "qai_jobs_ingested": "counter",
    "qai_jobs_rejected": "counter",  # by reason
    "qai_signatures": "counter",  # by suite and outcome
    "qai_ledger_size_entries": "gauge",
    "qai_ledger_append_duration_seconds": "histogram",
    "qai_ledger_checkpoint_age_seconds": "gauge",
    "qai_policy_predictions": "counter",  # by method
    "qai_nightly_predicted_fidelity_ratio": "gauge",
    "qai_nightly_observed_fidelity_ratio": "gauge",
    "qai_policy_shot_multiplier_ratio": "histogram",
    "qai_scheduler_decisions": "counter",  # by backend
    "qai_scheduler_filter_rejections": "counter",  # by plugin
    "qai_scheduler_crypto_violations": "counter",
    "qai_scheduler_replay_failures": "counter",
    "qai_scheduler_replays": "counter",
    "qai_tls_handshakes": "counter",  # by group
    "qai_nightly_step_ok": "gauge",
    "qai_nightly_step_duration_seconds": "gauge",
    "qai_hsm_session_pool_size_sessions": "gauge",
    "qai_hsm_session_pool_in_use_sessions": "gauge",
    "qai_hsm_session_errors": "counter",
}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "untyped": ("",), "info": ("_info",)}
ID_LIKE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-|[0-9a-f]{32,}")


@pytest.fixture(params=["postgresql+s3"])
def svc(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Services]:
    """Overrides ``tests.test_jobs.svc`` for ``ready``: PostgreSQL with S3 over HTTP, as deployed."""
    yield from ledger_services(*storage_settings(request, settings, "metrics"))


class Scrape:
    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, name: str, suffix: str = "", **labels: str) -> list[tuple[dict[str, str], float]]:
        family = self.families[name]
        return [(s.labels, s.value) for s in family.samples
                if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())]

    def total(self, name: str, suffix: str = "_total", **labels: str) -> float:
        return sum(v for _, v in self.samples(name, suffix, **labels))

    def exported_series(self) -> set[str]:
        """Every series name a PromQL query can select: sample names, plus the names each family's
        type implies (a labelled gauge with no children yet, say, is still exported)."""
        names = set()
        for f in self.families.values():
            names.update(s.name for s in f.samples)
            names.update(f.name + suffix for suffix in SUFFIXES.get(f.type, ("",)))
        return names


def scrape(url: str) -> Scrape:
    r = httpx.get(url + "/metrics", timeout=60)  # no credentials: like the probes
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    return Scrape(r.text)


def _tls_handshake(services: Services, tmp_path: Path) -> None:
    """One real handshake on the qai TLS server (its counter lives in this process's registry)."""
    from kms.tls import CaFiles, serve
    from kms.tls.client import connect_stdlib

    tls_dir = tmp_path / "tls"
    with serve("dual", "127.0.0.1", 0, db=services.db, kms=services.kms, tls_dir=tls_dir) as server:
        connect_stdlib("127.0.0.1", server.port, keys=server.signer.public_key(),
                       ca_files=[CaFiles(tls_dir, "ECDSA-P256").ca_cert])


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every panel target, rows' nested panels included."""
    out = []
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        panels = list(doc["panels"])
        while panels:
            p = panels.pop()
            panels.extend(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((path.name, p["title"], t["expr"]))
    return out


def test_metrics_after_a_demo_workload(ready: Services, tmp_path: Path) -> None:  # noqa: F811
    from em_policy.nightly import NightlyConfig, run_once
    from tests.test_nightly import SMALL as NIGHTLY_WORKLOAD

    services = ready
    token = issue_token(services.db, role=Role.SUBMITTER, tenant="org-a").token
    signer = {"Authorization": f"Bearer {issue_token(services.db, role=Role.SIGNER, tenant='org-a').token}"}
    with LiveServer(create_app(services)) as srv, httpx.Client(base_url=srv.url, timeout=120,
                                                          headers={"Authorization": f"Bearer {token}"}) as c:
        before = scrape(srv.url)

        # ingest: three signed jobs stored, one tampered envelope rejected
        envs = [_sign(services, "org-a.manifests", "org-a", manifest(
            job_id=str(uuid.uuid4()), circuit={"qasm": GHZ3}, artifact_hash=qasm_sha256(GHZ3))) for _ in range(3)]
        job_ids = []
        for env in envs:
            r = c.post("/v1/jobs", content=env)
            assert r.status_code == 201, r.text
            job_ids.append(r.json()["job_id"])
        tampered = json.loads(envs[0])
        tampered["payload"] = base64.b64encode(manifest(job_id=job_ids[0], shots=1).to_bytes()).decode()
        bad = c.post("/v1/jobs", json=tampered)
        assert (bad.status_code, bad.json()["error"]["code"]) == (422, "signature.invalid")

        # the KMS: a signature made and checked over HTTP
        msg = base64.b64encode(b"metrics demo").decode()
        bundle = c.post("/v1/keys/org-a.manifests/sign", json={"message": msg}, headers=signer)
        assert bundle.status_code == 200, bundle.text
        verified = c.post("/v1/verify", json={"bundle": bundle.json(), "message": msg}, headers=signer)
        assert verified.status_code == 200 and verified.json()["valid"], verified.text

        # the EM policy
        p = c.post("/v1/predict", json={"qasm": GHZ3, "backend_id": "fake_nairobi", "shot_budget": 400000})
        assert p.status_code == 200, p.text
        prediction = p.json()

        # the scheduler: one job decided, run by the embedded worker, and its decision replayed
        r = c.post("/v1/schedule", json={"job_id": job_ids[0]})
        assert r.status_code == 201, r.text
        decision = r.json()
        chosen = decision["decision"]["chosen"]["backend_id"]
        _wait_for(c, job_ids[0], "completed")
        rep = c.post(f"/v1/decisions/{decision['decision_id']}/replay")
        assert rep.status_code == 200 and rep.json()["ok"], rep.text
        assert c.get(f"/v1/decisions/{uuid.uuid4()}").status_code == 404  # a 4xx for the latency histogram

        # the ledger, the TLS server and a nightly run (its gauges: predicted vs observed, steps)
        services.ledger.checkpoint()
        _tls_handshake(services, tmp_path)
        nightly = run_once(services, NightlyConfig(backends=NIGHTLY_BACKENDS, workload=NIGHTLY_WORKLOAD))
        assert nightly["status"] == "ok", nightly.get("error")

        after = scrape(srv.url)
        text = httpx.get(srv.url + "/metrics", timeout=60).text

    # every metric named in the issue is exported, with its type
    for name, kind in REQUIRED.items():
        assert name in after.families, f"{name} is not exported"
        assert after.families[name].type == kind, (name, after.families[name].type)

    def delta(name: str, suffix: str = "_total", **labels: str) -> float:
        return after.total(name, suffix, **labels) - before.total(name, suffix, **labels)

    # request latency: per route template and status, never a raw URL with an id in it
    routes = {(s["route"], s["status"]) for s, _ in after.samples("qai_http_request_duration_seconds", "_count")}
    for expected in (("/v1/jobs", "201"), ("/v1/jobs", "422"), ("/v1/jobs/{job_id}", "200"), ("/v1/predict", "200"),
                     ("/v1/schedule", "201"), ("/v1/decisions/{decision_id}/replay", "200"),
                     ("/v1/decisions/{decision_id}", "404"), ("/v1/keys/{name}/sign", "200"), ("/v1/verify", "200")):
        assert expected in routes, (expected, sorted(routes))
    assert delta("qai_http_request_duration_seconds", "_count", route="/v1/jobs") == 4
    assert after.total("qai_http_request_duration_seconds", "_bucket", route="/v1/predict", status="200",
                       le="+Inf") >= 1
    # bounded labels: no job, decision or key id anywhere in a label value
    for family in after.families.values():
        for sample in family.samples:
            for v in sample.labels.values():
                assert not ID_LIKE.search(v), (sample.name, sample.labels)
    assert not any(j in text for j in job_ids) and decision["decision_id"] not in text

    # ingest
    assert delta("qai_jobs_ingested") == 3
    assert delta("qai_jobs_rejected", reason="signature.invalid") == 1
    # signatures: by suite and outcome (manifests signed by the tests, the API sign, checkpoints, decisions)
    suite = services.kms.public_key("org-a.manifests").suite
    assert delta("qai_signatures", operation="sign", suite=suite, outcome="ok") >= 4
    assert delta("qai_signatures", operation="verify", suite=suite, outcome="ok") >= 4  # 3 ingests + /v1/verify
    assert delta("qai_signatures", operation="verify", suite=suite, outcome="error") == 1  # the tampered one
    assert delta("qai_kms_audit_records", operation="sign", result="ok") >= 4
    # ledger
    size = after.total("qai_ledger_size_entries", "")
    assert size == services.ledger.size() and size >= 5  # 3 jobs, a decision, a result
    assert delta("qai_ledger_append_duration_seconds", "_count") >= 3
    assert delta("qai_ledger_appended_entries") >= 5
    age = after.total("qai_ledger_checkpoint_age_seconds", "")
    assert 0 <= age < 600
    # EM policy
    assert delta("qai_policy_predictions", method=prediction["method"]) >= 1
    assert delta("qai_policy_shot_multiplier_ratio", "_count") >= 1
    mean = delta("qai_policy_shot_multiplier_ratio", "_sum") / delta("qai_policy_shot_multiplier_ratio", "_count")
    assert mean >= 1.0  # a multiplier never saves shots
    # nightly: predicted vs observed fidelity per backend, step status and duration
    predicted = after.samples("qai_nightly_predicted_fidelity_ratio")
    observed = after.samples("qai_nightly_observed_fidelity_ratio")
    assert predicted and {s["backend_id"] for s, _ in predicted} <= set(NIGHTLY_BACKENDS)
    assert {tuple(sorted(s.items())) for s, _ in predicted} == {tuple(sorted(s.items())) for s, _ in observed}
    assert all(0 <= v <= 1 for _, v in predicted + observed)
    steps = {s["step"]: v for s, v in after.samples("qai_nightly_step_ok")}
    assert set(steps) >= {"refresh", "workload", "store", "drift", "retrain", "publish"} and all(
        v == 1 for v in steps.values())
    assert all(v >= 0 for _, v in after.samples("qai_nightly_step_duration_seconds"))
    assert after.samples("qai_nightly_step_duration_seconds", step="workload")[0][1] > 0
    # scheduler
    assert delta("qai_scheduler_decisions", backend_id=chosen) == 1
    assert {s["backend_id"] for s, _ in after.samples("qai_scheduler_decisions", "_total")} <= {
        b["backend_id"] for b in decision["decision"]["backends"]} | {"none"}
    rejected = sum(1 for b in decision["decision"]["backends"] for f in b["filters"] if f["verdict"] == "reject")
    assert delta("qai_scheduler_filter_rejections") == rejected
    plugins = {s["plugin"] for s, _ in after.samples("qai_scheduler_filter_rejections", "_total")}
    assert all(re.fullmatch(r"[a-z0-9-]+", p) for p in plugins), plugins  # plugin names, not free text
    assert after.total("qai_scheduler_crypto_violations") == 0
    assert {s["stage"] for s, _ in after.samples("qai_scheduler_crypto_violations", "_total")} == {
        "schedule", "dispatch"}
    assert delta("qai_scheduler_replays", outcome="ok") == 1
    assert delta("qai_scheduler_replay_failures") == 0
    # TLS handshakes by group
    assert delta("qai_tls_handshakes") >= 1
    assert all(s["group"] for s, _ in after.samples("qai_tls_handshakes", "_total"))
    # HSM session pool: its size, sessions borrowed within it, sessions used, no errors in this workload
    assert after.total("qai_hsm_session_pool_size_sessions", "") == services.hsm.config.pool_size
    assert 0 <= after.total("qai_hsm_session_pool_in_use_sessions", "") <= services.hsm.config.pool_size
    assert delta("qai_hsm_session_acquisitions") >= 1
    assert delta("qai_hsm_session_errors") == 0
    # the queue per priority class: every class has its series (alerts need them), the job ran
    depth = {s["priority_class"]: v for s, v in after.samples("qai_dispatch_queue_depth")}
    assert set(depth) == {"critical", "essential", "standard", "background"} and all(v >= 0 for v in depth.values())
    # backends as the state collector reads them
    up = {s["backend_id"]: v for s, v in after.samples("qai_backend_up")}
    assert up[chosen] == 1

    # every Grafana panel query uses only series this app exports
    exported = after.exported_series()
    exprs = dashboard_exprs()
    assert len(DASHBOARDS) == 4 and len(exprs) >= 30
    used = set()
    for file, title, expr in exprs:
        names = set(re.findall(r"\b(qai_[a-z0-9_]+)", expr))
        assert names, (file, title, expr)
        missing = names - exported
        assert not missing, f"{file} / {title}: {sorted(missing)} not exported"
        used |= names
    # ... and together they show every metric the issue names
    for name in REQUIRED:
        assert any(u == name or u.startswith(name + "_") for u in used), f"no panel shows {name}"


def test_dashboards_are_provisioned_grafana_json() -> None:
    import yaml

    titles = set()
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        assert doc["uid"] and doc["schemaVersion"] >= 36 and doc["panels"]
        titles.add(doc["title"])
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids))
        for p in doc["panels"]:
            assert p["datasource"]["uid"] == "qai-prometheus" and p["targets"]
            assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    assert titles == {"qai / Quantum SRE", "qai / Scheduler compliance", "qai / Provenance", "qai / Platform"}
    provisioning = ROOT / "infra" / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources.yaml").read_text())
    assert [d["uid"] for d in sources["datasources"]] == ["qai-prometheus"]
    providers = yaml.safe_load((provisioning / "dashboards.yaml").read_text())
    assert providers["providers"][0]["type"] == "file"


def test_observe_many_counts_as_observe_one_by_one() -> None:
    """The batch observation the EM policy uses fills the same buckets, count and sum as observing
    each value (bucket boundaries, negative values, infinity and NaN included)."""
    from prometheus_client import CollectorRegistry, Histogram

    from orchestrator.metrics import observe_many

    rng = np.random.default_rng(7)
    finite = [*rng.uniform(0, 5, 200).tolist(), 0.5, 1.0, 2.0, 4.0, 4.0001, -1.0, 0.0]
    for values in (finite, [*finite, float("inf")], [*finite, float("nan")]):
        registry = CollectorRegistry()
        one, many = (Histogram(name, "test", buckets=(0.5, 1.0, 2.0, 4.0), registry=registry)
                     for name in ("one_by_one", "batched"))
        for v in values:
            one.observe(v)
        observe_many(many, values[:100])
        observe_many(many, values[100:])
        observe_many(many, [])

        def samples(name: str, registry: CollectorRegistry = registry) -> dict[tuple[str, str], float]:
            family = next(f for f in registry.collect() if f.name == name)
            return {(s.name.removeprefix(name), s.labels.get("le", "")): s.value for s in family.samples
                    if not s.name.endswith("_created")}

        got, want = samples("batched"), samples("one_by_one")
        assert got.keys() == want.keys()
        for key, value in want.items():
            if key[0] == "_sum":  # the same terms, added in another order
                assert got[key] == pytest.approx(value, nan_ok=True)
            else:
                assert got[key] == value, key
        nan = any(math.isnan(v) for v in values)
        assert want[("_bucket", "+Inf")] == len(values) - nan  # NaN is counted in no bucket
