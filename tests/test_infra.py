"""Deployment artefacts: the Dockerfile, the Kubernetes manifests (kustomize base and overlays) and
the Prometheus configuration, alert rules and their unit tests.

promtool (Debian's ``prometheus`` package, installed by ``make setup``) is required: a missing
promtool fails these tests, it never skips them. kubectl is optional: when present, its built-in
kustomize renders every overlay and must agree with the minimal renderer below, which the
assertions run on either way.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "infra" / "k8s"
PROM = ROOT / "infra" / "prometheus"
DOCKERFILE = ROOT / "Dockerfile"

KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "dev", K8S / "overlays" / "prod"]
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}

# The HSM endpoint placeholder of infra/k8s/base/networkpolicy.yaml.
HSM_IP, HSM_PORT = ipaddress.ip_address("192.0.2.10"), 1792
# Every component that signs (ingest and ledger, decisions, results, models, lineage) does so
# through the KMS API (kms/remote.py).
KMS_CLIENTS = {"orchestrator", "scheduler", "worker", "em-policy", "nightly"}
# Every Deployment serves its probes (`qai worker --http-port` included).
NO_HTTP_PROBES: set[str] = set()
SECRET_ENV_WORDS = ("PIN", "PASSWORD", "SECRET", "TOKEN", "KEY", "DATABASE_URL", "REDIS_URL", "WEBHOOK_URL")
SECRET_CONFIG_KEY = re.compile(r"(PIN|PASSWORD|SECRET\w*|TOKENS?|KEY|KEY_ID|DATABASE_URL|REDIS_URL|WEBHOOK_URL)$")
REQUIRED_SECRET_REFS = {"QAI_DATABASE_URL", "QAI_REDIS_URL", "QAI_S3_ACCESS_KEY_ID", "QAI_S3_SECRET_ACCESS_KEY"}


# ------------------------------------------------------------------------------------------ promtool
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is required and missing: install Debian's 'prometheus' package "
                    "(make setup does: apt-get install prometheus)", pytrace=False)
    return path


def run_promtool(*args: str, cwd: Path = PROM) -> str:
    proc = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


RULE_FILES = sorted((PROM / "rules").glob("*.yml"))


def test_rule_files_exist() -> None:
    assert {p.name for p in RULE_FILES} >= {"services.yml", "nightly.yml"}
    # Every rule file lives under rules/, where prometheus.yml's rule_files glob finds it.
    assert not list(PROM.glob("*rules*.yml")), "rule files belong in infra/prometheus/rules/"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    out = run_promtool("check", "rules", str(path))
    assert "SUCCESS" in out


def test_promtool_check_config() -> None:
    out = run_promtool("check", "config", "prometheus.yml")
    assert "is valid prometheus config file syntax" in out
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules/*.yml"]


def test_promtool_unit_tests() -> None:
    out = run_promtool("test", "rules", "rules_test.yml", cwd=PROM / "tests")
    assert "SUCCESS" in out


def alert_rules() -> dict[str, dict[str, Any]]:
    rules: dict[str, dict[str, Any]] = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["alert"] not in rules, f"duplicate alert {rule['alert']}"
                    rules[rule["alert"]] = rule
    return rules


def test_alerts_of_the_spec_are_present() -> None:
    """../shared/spec/CONTEXT.md's alerts worth having, and the issue's list, each on its metric."""
    rules = alert_rules()
    expected = {
        "QaiNightlyDrift": "qai_nightly_drift_alert",
        "QaiHighErrorRate": "qai_http_request_duration_seconds_count",
        "QaiLedgerCheckpointStale": "qai_ledger_checkpoint_age_seconds",
        "QaiBackendOffline": "qai_backend_up",
        "QaiQueueBacklog": "qai_dispatch_queue_depth",
        "QaiOutboxBacklog": "qai_outbox_pending_envelopes",
        "QaiReplayFailure": "qai_scheduler_replay_failures_total",
        "QaiCryptoViolation": "qai_scheduler_crypto_violations_total",
        "QaiNightlyStepFailed": "qai_nightly_step_ok",
        "QaiNightlyStale": "qai_nightly_last_run_timestamp_seconds",
        "QaiBackendErrorRate": "qai_backend_runs_total",
    }
    for alert, metric in expected.items():
        assert alert in rules, f"missing alert {alert}"
        assert metric in rules[alert]["expr"], f"{alert} does not use {metric}"
        assert rules[alert]["labels"]["severity"] in {"warning", "critical"}
        assert rules[alert]["annotations"]["summary"]
    assert rules["QaiBackendOffline"]["for"] == "1m"
    for cls in ("critical", "essential", "standard", "background"):
        assert f'priority_class="{cls}"' in rules["QaiQueueBacklog"]["expr"]
    # Every qai metric a rule reads is documented in docs/operations.md.
    ops = (ROOT / "docs" / "operations.md").read_text()
    for rule in rules.values():
        for metric in set(re.findall(r"\bqai_[a-z0-9_]+", rule["expr"])):
            base = re.sub(r"_(count|sum|bucket)$", "", metric)
            assert base in ops, f"{metric} ({rule['alert']}) is not in docs/operations.md"


def test_every_setting_is_documented() -> None:
    """docs/operations.md's configuration reference names every QAI_ setting of the server."""
    from orchestrator.settings import Settings

    ops = (ROOT / "docs" / "operations.md").read_text()
    for name in Settings.model_fields:
        assert f"`QAI_{name.upper()}`" in ops, f"QAI_{name.upper()} is missing from docs/operations.md"
    for extra in ("QAI_NIGHTLY_CRON", "QAI_NIGHTLY_WEBHOOK_URL", "QAI_URL", "QAI_TOKEN", "QAI_POLICY_TEST_DATA"):
        assert extra in ops


# ---------------------------------------------------------------------------------------- Dockerfile
def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), split by FROM."""
    lines: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip() if current else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    stages: list[list[str]] = [[]]
    for line in lines:
        if line.split()[0].upper() == "FROM":
            stages.append([])
        stages[-1].append(line)
    return stages  # stages[0]: global ARGs before the first FROM


def test_dockerfile_is_multi_stage_and_pinned() -> None:
    preamble, *stages = dockerfile_stages()
    assert len(stages) >= 2, "the Dockerfile must be multi-stage"
    base = next(line for line in preamble if line.startswith("ARG PYTHON_IMAGE="))
    # An exact patch version (or a digest), never a floating tag such as 3.11-slim.
    assert re.fullmatch(r"ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    for stage in stages:
        assert stage[0].startswith("FROM ${PYTHON_IMAGE} AS "), stage[0]
    builder = " ".join(stages[0])
    assert "pip wheel" in builder and "--require-hashes" in builder and "requirements.lock" in builder


def test_dockerfile_final_stage() -> None:
    final = dockerfile_stages()[-1]
    text = "\n".join(final)
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid not in {"0", "root"} and uid == "10001"
    assert any(line.startswith("HEALTHCHECK ") and "/healthz" in line for line in final)
    assert 'ENTRYPOINT ["qai"]' in final
    assert any(line.startswith("CMD [\"serve\"") for line in final)
    assert "COPY --from=builder /opt/qai /opt/qai" in final
    for tool in ("gcc", "g++", "build-essential", "make ", "clang", "python3-dev", "libc6-dev", "curl", "wget"):
        runs = " ".join(line for line in final if line.startswith("RUN "))
        assert tool not in runs, f"{tool!r} is installed in the final stage"
    assert "softhsm2" in text


def test_dockerignore_keeps_local_state_out() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "the build context is an allow-list"
    assert "!.qai" not in lines and "!.venv" not in lines
    assert "**/.qai" in lines


# ------------------------------------------------------------------------- kustomize (minimal renderer)
def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge sufficient for these overlays: maps merge, lists of named maps merge by
    name, anything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out_list = [copy.deepcopy(x) for x in base]
        for item in patch:
            idx = next((i for i, x in enumerate(out_list) if x["name"] == item["name"]), None)
            if idx is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[idx] = merge(out_list[idx], item)
        return out_list
    return copy.deepcopy(patch)


def containers_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def pod_template(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    template: dict[str, Any] = spec["template"]
    return template


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = pod_template(doc)["spec"]
    return spec


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = pod_template(doc)["metadata"]["labels"]
    return labels


def image_name(image: str) -> str:
    ref = image.split("@")[0]
    last = ref.rsplit("/", 1)[-1]
    return ref.rsplit(":", 1)[0] if ":" in last else ref


def render(directory: Path) -> list[dict[str, Any]]:
    """kustomize build, for the features these kustomizations use."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        assert path.exists(), f"{directory}: resource {res} does not exist"
        docs.extend(render(path) if path.is_dir() else load_docs(path))
    for patch in kust.get("patches", []):
        for pdoc in load_docs(directory / patch["path"]):
            idx = [i for i, d in enumerate(docs) if d["kind"] == pdoc["kind"]
                   and d["metadata"]["name"] == pdoc["metadata"]["name"]]
            assert len(idx) == 1, f"{directory}: patch target {pdoc['kind']}/{pdoc['metadata']['name']} not found"
            if pdoc["kind"] in POD_KINDS:  # a patch must not invent containers the base lacks
                names = {c["name"] for c in containers_of(docs[idx[0]])}
                assert {c["name"] for c in containers_of(pdoc)} <= names, f"{directory}: {patch['path']}"
            docs[idx[0]] = merge(docs[idx[0]], pdoc)
    for rep in kust.get("replicas", []):
        targets = [d for d in docs if d["metadata"]["name"] == rep["name"] and d["kind"] == "Deployment"]
        assert len(targets) == 1, f"{directory}: replicas for unknown {rep['name']}"
        targets[0]["spec"]["replicas"] = rep["count"]
    for img in kust.get("images", []):
        for doc in docs:
            if doc["kind"] in POD_KINDS:
                for c in containers_of(doc):
                    if image_name(c["image"]) == img["name"]:
                        c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    for pair in kust.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(pair["pairs"])
    if "namespace" in kust:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kust["namespace"]
    return docs


def test_every_manifest_parses() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        for doc in load_docs(path):
            assert "apiVersion" in doc and "kind" in doc, f"{path}: a document without apiVersion/kind"


def test_every_manifest_is_in_a_kustomization() -> None:
    listed: set[Path] = set()
    for directory in KUSTOMIZATIONS:
        kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
        listed |= {(directory / r).resolve() for r in kust.get("resources", [])}
        listed |= {(directory / p["path"]).resolve() for p in kust.get("patches", [])}
    for path in K8S.rglob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert path.resolve() in listed, f"{path} is in no kustomization"


RENDERED = {d.relative_to(K8S).as_posix(): d for d in KUSTOMIZATIONS}


@pytest.fixture(scope="module", params=sorted(RENDERED))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(RENDERED[request.param])


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (d for d in docs if d["kind"] in POD_KINDS)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_the_components(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == {"qai-kms", "qai-orchestrator", "qai-em-policy", "qai-scheduler", "qai-worker"}
    args = {tuple(c["args"]) for d in deployments.values() for c in containers_of(d)}
    for component in ("kms", "jobs", "ledger", "em-policy", "scheduler"):
        assert any(a[:2] == ("serve", component) and "0.0.0.0" in a for a in args), component
    assert ("worker", "--http-port", "8000", "--http-host", "0.0.0.0") in args  # probes and /metrics
    cron = by_kind(docs, "CronJob")["qai-nightly"]
    assert cron["spec"]["schedule"] == "0 2 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert containers_of(cron)[0]["args"][:2] == ["nightly", "run-once"]
    # PostgreSQL and Redis are external.
    services = by_kind(docs, "Service")
    for name in ("qai-postgres", "qai-redis"):
        assert services[name]["spec"]["type"] == "ExternalName"
    assert not by_kind(docs, "StatefulSet"), "data stores are external, not run in the cluster"


def quantity(value: str | int | float) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_pod_specs_are_hardened(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    found = list(workloads(docs))
    assert len(found) == 6
    for doc in found:
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
        spec = pod_spec(doc)
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in containers_of(doc):
            cwhere = f"{where} container {c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, cwhere
            assert sc["readOnlyRootFilesystem"] is True, cwhere
            assert sc.get("privileged", False) is False, cwhere
            assert sc.get("runAsUser", 10001) != 0, cwhere
            assert "ALL" in sc["capabilities"]["drop"] and not sc["capabilities"].get("add"), cwhere
            res = c["resources"]
            for kind in ("cpu", "memory"):
                assert kind in res["requests"] and kind in res["limits"], f"{cwhere}: {kind} request/limit"
                assert quantity(res["requests"][kind]) <= quantity(res["limits"][kind]), f"{cwhere}: {kind}"
            # A read-only root: /tmp and QAI_HOME are the writable emptyDirs.
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            for path in ("/tmp", "/var/lib/qai"):
                assert path in mounts and "emptyDir" in volumes[mounts[path]], f"{cwhere}: {path}"
            assert c["image"].split("/")[-1].startswith("qai:"), cwhere


def test_deployments_have_probes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    for name, doc in by_kind(docs, "Deployment").items():
        for c in containers_of(doc):
            where = f"{overlay}: {name}/{c['name']}"
            if name in NO_HTTP_PROBES:
                # The exemption holds only while the container serves nothing.
                assert not c.get("ports") and "readinessProbe" not in c, where
                continue
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
            assert live["path"] == "/healthz" and ready["path"] == "/readyz", where
            assert live["port"] in ports and ready["port"] in ports, where
            assert str(ports[live["port"]]) in " ".join(c["args"]), f"{where}: probes a port it does not serve"


def test_deployments_have_disruption_budgets_and_services(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    pdbs = list(by_kind(docs, "PodDisruptionBudget").values())
    services = [s for s in by_kind(docs, "Service").values() if s["spec"].get("type") != "ExternalName"]
    for name, doc in by_kind(docs, "Deployment").items():
        labels = pod_labels(doc)
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        matching = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, f"{overlay}: {name} needs exactly one PodDisruptionBudget"
        ports = {p["name"] for c in containers_of(doc) for p in c.get("ports", [])}
        for svc in services:
            if svc["spec"]["selector"].items() <= labels.items():
                for port in svc["spec"]["ports"]:
                    assert port["targetPort"] in ports, f"{overlay}: {svc['metadata']['name']} -> {port}"
        if ports:
            assert any(s["spec"]["selector"].items() <= labels.items() for s in services), name


def test_no_inline_secrets(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    for doc in docs:
        assert doc["kind"] != "Secret", f"{overlay}: a Secret is in the manifests ({doc['metadata']['name']})"
    for cm in by_kind(docs, "ConfigMap").values():
        for key in cm.get("data", {}):
            assert not SECRET_CONFIG_KEY.search(key), f"{overlay}: secret-looking {key} in ConfigMap"
    for doc in workloads(docs):
        for c in containers_of(doc):
            env = {e["name"]: e for e in c.get("env", [])}
            for name, entry in env.items():
                if any(word in name for word in SECRET_ENV_WORDS):
                    assert "value" not in entry, f"{overlay}: {name} has an inline value"
                    assert "secretKeyRef" in entry["valueFrom"], f"{overlay}: {name} is not from a Secret"
            assert set(env) >= REQUIRED_SECRET_REFS, f"{overlay}: {doc['metadata']['name']}/{c['name']}"
            # The HSM PIN is the KMS's alone; every other component signs through the KMS API.
            where = f"{overlay}: {doc['metadata']['name']}/{c['name']}"
            if pod_labels(doc)["app.kubernetes.io/component"] == "kms":
                assert "QAI_PKCS11_USER_PIN" in env and "QAI_KMS_URL" not in env, where
            else:
                assert "QAI_PKCS11_USER_PIN" not in env, where
                assert env["QAI_KMS_URL"]["value"] == "http://qai-kms:8000", where
                assert env["QAI_KMS_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "qai-kms-client", where
    text = "\n".join(p.read_text() for p in K8S.rglob("*.yaml"))
    assert "PRIVATE KEY" not in text


# ----------------------------------------------------------------------------------- NetworkPolicies
def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        op = expr["operator"]
        ok = {"In": value in expr.get("values", []), "NotIn": value not in expr.get("values", []),
              "Exists": value is not None, "DoesNotExist": value is None}[op]
        if not ok:
            return False
    return True


def policies_for(docs: list[dict[str, Any]], labels: dict[str, str], kind: str) -> list[dict[str, Any]]:
    return [p for p in by_kind(docs, "NetworkPolicy").values()
            if kind in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)]


def port_allowed(rule: dict[str, Any], port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") in (port, None) or
                            (isinstance(p.get("port"), int) and p["port"] <= port <= p.get("endPort", p["port"]))
                            for p in ports)


def peer_allows_ip(peer: dict[str, Any], ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    block = peer.get("ipBlock")
    if block is None:
        return False  # pod and namespace selectors select pods, not the HSM
    if ip not in ipaddress.ip_network(block["cidr"]):
        return False
    return not any(ip in ipaddress.ip_network(e) for e in block.get("except", []))


def test_network_policies(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    policies = by_kind(docs, "NetworkPolicy")
    # Default deny, both directions, for every pod of the namespace.
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies.values())
    pods = {d["metadata"]["name"]: pod_labels(d) for d in workloads(docs)}
    kms = pods["qai-kms"]

    # Only the KMS may reach the HSM endpoint.
    for name, labels in pods.items():
        reach = any(port_allowed(rule, HSM_PORT) and (not rule.get("to") or
                                                      any(peer_allows_ip(p, HSM_IP) for p in rule["to"]))
                    for pol in policies_for(docs, labels, "Egress") for rule in pol["spec"].get("egress", []))
        assert reach == (name == "qai-kms"), f"{overlay}: {name} HSM egress is {reach}"

    # KMS ingress: the signing components' pods, and Prometheus for /metrics.
    rules = [r for pol in policies_for(docs, kms, "Ingress") for r in pol["spec"].get("ingress", [])]
    assert rules
    allowed: set[str] = set()
    for rule in rules:
        assert rule.get("from"), f"{overlay}: a KMS ingress rule admits everyone"
        for peer in rule["from"]:
            assert "ipBlock" not in peer, f"{overlay}: KMS ingress by IP"
            if "namespaceSelector" in peer:
                assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
                assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
                continue
            allowed |= {labels["app.kubernetes.io/component"] for labels in pods.values()
                        if selects(peer["podSelector"], labels)}
    assert allowed == KMS_CLIENTS, f"{overlay}: KMS reachable from {allowed}"
    # ...and those clients (only) have the matching egress.
    for name, labels in pods.items():
        reach = any(any("podSelector" in peer and "namespaceSelector" not in peer
                        and selects(peer["podSelector"], kms) for peer in rule.get("to", []))
                    for pol in policies_for(docs, labels, "Egress") for rule in pol["spec"].get("egress", []))
        assert reach == (labels["app.kubernetes.io/component"] in KMS_CLIENTS), f"{overlay}: {name} -> KMS {reach}"


def test_overlays(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    deployments = by_kind(docs, "Deployment")
    images = {c["image"] for d in workloads(docs) for c in containers_of(d)}
    assert len(images) == 1, f"{overlay}: one image for every component, got {images}"
    if overlay == "base":
        return
    expected_ns = {"overlays/dev": "qai-dev", "overlays/prod": "qai"}[overlay]
    assert {d["metadata"].get("namespace") for d in docs} == {expected_ns}
    image = images.pop()
    assert not image.endswith(":latest"), f"{overlay}: a moving tag"
    replicas = {name: d["spec"]["replicas"] for name, d in deployments.items()}
    if overlay == "overlays/prod":
        assert min(replicas.values()) >= 2, "prod runs at least two replicas of each Deployment"
        assert by_kind(docs, "ConfigMap")["qai-config"]["data"]["QAI_SOFTHSM_AUTO_INIT"] == "false"
    else:
        assert set(replicas.values()) == {1}


def kubectl_render(directory: Path) -> list[dict[str, Any]] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {directory}:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def summary(docs: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {}
    for d in docs:
        key = (d["kind"], d["metadata"]["name"])
        item: dict[str, Any] = {"namespace": d["metadata"].get("namespace")}
        if d["kind"] in POD_KINDS:
            item["replicas"] = d["spec"].get("replicas")
            item["containers"] = {c["name"]: (c["image"], c["resources"]) for c in containers_of(d)}
        if d["kind"] == "ConfigMap":
            item["data"] = d.get("data")
        if d["kind"] == "Service":
            item["spec"] = d["spec"]
        out[key] = item
    return out


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_kubectl_kustomize_agrees(name: str) -> None:
    """With kubectl on the machine, the real kustomize must build each overlay and agree with the
    minimal renderer the other tests use; without it, the minimal renderer alone is checked."""
    ours = render(RENDERED[name])
    theirs = kubectl_render(RENDERED[name])
    if theirs is not None:
        assert summary(theirs) == summary(ours)
