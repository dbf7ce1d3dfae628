"""deploy/: the Kubernetes manifests validate offline against the Kubernetes 1.33 schemas
(kubernetes-validate ships them), agree with each other (selectors, names, the Secret), and
name only metrics and probe paths difforge really serves; the Dockerfile runs as non-root."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.33"


def load_all(name: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S / name).read_text()))


def load(name: str) -> dict:
    return load_all(name)[0]


def manifests() -> list[str]:
    return sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("name", manifests())
def test_a_manifest_validates_strictly_against_the_kubernetes_schemas(name):
    for doc in load_all(name):
        kv.validate(doc, KUBERNETES, strict=True)


def test_strict_validation_rejects_an_unknown_field():
    bad = copy.deepcopy(load("deployment.yaml"))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}  # lower-case p
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBERNETES, strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret():
    listed = set(load("kustomization.yaml")["resources"])
    assert listed == set(manifests()) - {"secret.example.yaml"}


def test_the_keda_alternative_has_no_shipped_schema_and_is_checked_by_hand():
    # KEDA's ScaledObject is a CRD: kubernetes-validate has no schema for it (as with
    # `kubeconform -ignore-missing-schemas`), so its references are checked here instead
    so = yaml.safe_load((K8S / "keda" / "scaledobject.yaml").read_text())
    with pytest.raises(kv.utils.SchemaNotFoundError):
        kv.validate(so, KUBERNETES, strict=True)
    assert so["spec"]["scaleTargetRef"]["name"] == load("deployment.yaml")["metadata"]["name"]
    for trigger in so["spec"]["triggers"]:
        assert set(_metric_names(trigger["metadata"]["query"])) <= exported_metrics()


def exported_metrics() -> set[str]:
    """The metric names difforge/serving/metrics.py registers."""
    text = (ROOT / "difforge" / "serving" / "metrics.py").read_text()
    return set(re.findall(r'"(difforge_[a-z_]+)"', text))


def _metric_names(text: str) -> list[str]:
    return re.findall(r"\bdifforge_[a-z_]+", text)


def test_the_autoscaler_reads_metrics_difforge_exports():
    hpa = load("hpa.yaml")
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names and set(names) <= exported_metrics()
    rules = yaml.safe_load(load("prometheus-adapter-rules.yaml")["data"]["config.yaml"])["rules"]
    served = {r["name"]["as"] for r in rules}
    assert set(names) <= served  # every metric the HPA reads, the adapter serves
    for r in rules:
        assert set(_metric_names(r["seriesQuery"])) <= exported_metrics()
    assert hpa["spec"]["scaleTargetRef"]["name"] == load("deployment.yaml")["metadata"]["name"]


def test_selectors_probes_and_the_secret_fit_together():
    dep = load("deployment.yaml")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for name in ("service.yaml", "pdb.yaml"):
        selector = load(name)["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= pod_labels.items(), name
    assert load("networkpolicy.yaml")["spec"]["podSelector"]["matchLabels"].items() <= (
        pod_labels.items()
    )
    app = (ROOT / "difforge" / "serving" / "app.py").read_text()
    c = dep["spec"]["template"]["spec"]["containers"][0]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert f'"{c[probe]["httpGet"]["path"]}"' in app, probe
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    secrets = {d["metadata"]["name"]: d for d in load_all("secret.example.yaml")}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    config_secret = secrets[volumes["service-config"]["secret"]["secretName"]]
    service_json = json.loads(config_secret["stringData"]["service.json"])
    assert {k["id"] for k in service_json["api_keys"]} == {"clients", "prometheus"}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}  # the root file system is read-only
    assert str(Path(service_json["audit_db"]).parent) in mounts
    assert c["args"][c["args"].index("--config") + 1].startswith("/etc/difforge/")
    secret = secrets["difforge-db"]
    ref = next(e for e in c["env"] if e["name"] == "DIFFORGE_REGISTRY_URL")["valueFrom"]
    assert ref["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert ref["secretKeyRef"]["key"] in secret["stringData"]
    assert "$(DIFFORGE_REGISTRY_URL)" in c["args"]
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_image_runs_as_non_root_with_the_pinned_torch():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0"))
    torch_pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"torch=={torch_pin}" in text
    assert "torchvision" not in text
    assert "/v2/health/live" in text
