"""deploy/k8s: every overlay renders with ``kubectl kustomize`` and validates offline.

Built-in kinds (Deployment, Service, PVC, autoscaling/v2 HPA) are validated against the
Kubernetes 1.37 OpenAPI schemas bundled in ``kubernetes-validate``, strictly (unknown
fields fail). Custom resources (PodMonitor, KServe's ServingRuntime and InferenceService)
have no schema there: they are checked structurally below, field by field, and against the
objects they must agree with (ports, labels, metric names).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra)")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.37.0"
OVERLAYS = ["overlays/cpu", "overlays/gpu", "overlays/gpu-s3", "overlays/cpu-s3"]
BUILTIN = {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler"}
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) not found")


def render(path: str) -> list[dict]:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


def strict_validate(doc: dict) -> None:
    kv.validate(doc, K8S_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schemas(overlay):
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodMonitor"} <= kinds
    for doc in docs:
        if doc["kind"] in BUILTIN:
            strict_validate(doc)
        else:
            with pytest.raises(kv.SchemaNotFoundError):  # a CRD: checked structurally below
                strict_validate(doc)


@needs_kubectl
def test_validation_catches_a_misspelt_field():
    dep = by_kind(render("overlays/gpu"))["Deployment"]
    probe = dep["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    probe["httpGet"]["paht"] = probe["httpGet"].pop("path")
    with pytest.raises(kv.ValidationError, match="paht"):
        strict_validate(dep)


def container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_ports_and_wiring(overlay):
    k = by_kind(render(overlay))
    dep, svc, pm, hpa = k["Deployment"], k["Service"], k["PodMonitor"], k["HorizontalPodAutoscaler"]
    c = container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    # Startup: Triton's readiness, with a window long enough for a 7B model to load.
    sp = c["startupProbe"]
    assert sp["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert sp["periodSeconds"] * sp["failureThreshold"] >= 15 * 60
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # The grace period outlasts the preStop sleep plus Triton's own drain.
    args = " ".join(c.get("args", []))
    pod = dep["spec"]["template"]["spec"]
    flag = "--exit-timeout-secs=" if "--exit-timeout-secs=" in args else "--drain-timeout="
    drain = float(args.split(flag)[1].split()[0])
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop
    # The Service and the PodMonitor select exactly the Deployment's pods, by port name.
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    # Every volume a container mounts exists; a claim it uses is rendered with it.
    vols = {v["name"]: v for v in pod["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} <= set(vols)
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in vols.values()
        if "persistentVolumeClaim" in v
    }
    rendered = (
        {k["PersistentVolumeClaim"]["metadata"]["name"]} if "PersistentVolumeClaim" in k else set()
    )
    assert claims == rendered
    repo = next(e["value"] for e in c["env"] if e["name"] == "MODEL_REPOSITORY")
    assert any(repo.startswith(m["mountPath"]) for m in c["volumeMounts"])
    if not claims:
        check_fetched_repository(pod, c, repo)


def check_fetched_repository(pod: dict, c: dict, repo: str) -> None:
    """Object storage: an init container fetches the repository into the pod's own volume
    and links the server's --model-repository path to it, with our own parser's flags."""
    from trace_rt.cli import build_parser

    (init,) = pod["initContainers"]
    assert init["image"] == c["image"]  # the overlay's image, trace-rt inside
    assert init["command"] == ["trace-rt", "fetch-repo"]
    assert {"secretRef": {"name": "trace-rt-s3"}} in init["envFrom"]
    url = next(e["value"] for e in init["env"] if e["name"] == "MODEL_URL")
    assert url.startswith("s3://")
    argv = [a.replace("$(MODEL_URL)", url) for a in init["args"]]
    args = build_parser().parse_args(["fetch-repo", *argv])
    assert str(args.link) == repo  # the path the server reads is the verified copy
    (mount,) = init["volumeMounts"]
    assert args.cache_dir == Path(mount["mountPath"]) and not mount.get("readOnly")
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in vol
    assert any(m["name"] == mount["name"] and repo.startswith(m["mountPath"])
               for m in c["volumeMounts"])  # fmt: skip


@needs_kubectl
def test_overlays_differ_where_they_should():
    gpu = container(by_kind(render("overlays/gpu"))["Deployment"])
    cpu = container(by_kind(render("overlays/cpu"))["Deployment"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["command"] == ["tritonserver"]
    assert gpu["image"].endswith("-gpu")
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert cpu["command"] == ["trace-rt", "serve"]
    assert "--host=0.0.0.0" in cpu["args"]
    # Only flags `trace-rt serve` knows: the command line is parsed by our own parser.
    from trace_rt.cli import build_parser

    argv = [a.replace("$(MODEL_REPOSITORY)", "/models/repo") for a in cpu["args"]]
    args = build_parser().parse_args(["serve", *argv])
    assert args.host == "0.0.0.0" and args.timeout >= 15 * 60
    assert args.log_format == "json" and args.drain_timeout > 0


@needs_kubectl
def test_hpa_metric_is_the_prometheus_adapter_rule():
    hpa = by_kind(render("overlays/gpu"))["HorizontalPodAutoscaler"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    # Triton's queue time counter over its completed requests, grouped per pod.
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    q = rule["metricsQuery"]
    assert "nv_inference_queue_duration_us{<<.LabelMatchers>>}" in q
    assert "nv_inference_request_success{<<.LabelMatchers>>}" in q
    assert q.count("by (<<.GroupBy>>)") == 2
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


@needs_kubectl
def test_kserve_runtime_and_inference_service():
    k = by_kind(render("kserve"))
    rt, isvc = k["ServingRuntime"], k["InferenceService"]
    for doc in (rt, isvc):
        with pytest.raises(kv.SchemaNotFoundError):
            strict_validate(doc)
    assert rt["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    (c,) = rt["spec"]["containers"]
    assert c["name"] == "kserve-container"  # the name KServe looks for
    assert "--model-store=/mnt/models" in c["args"]  # where the storage initializer copies
    assert {"v2", "grpc-v2"} <= set(rt["spec"]["protocolVersions"])
    grpc = int(next(a for a in c["args"] if a.startswith("--grpc-port=")).split("=")[1])
    assert [p["containerPort"] for p in c["ports"]] == [grpc]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == rt["metadata"]["name"]
    formats = {f["name"] for f in rt["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["storageUri"].split("://")[0] in {"s3", "gs", "pvc", "https"}
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The container part of each CRD is a core/v1 Container: validated as one, in a Pod.
    predictor = {"name": "kserve-container", "image": "x", "resources": model["resources"]}
    for cont in (c, predictor):
        spec = {"containers": [cont]}
        strict_validate(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}
        )


def test_dockerfiles_install_the_runtime_without_torch():
    gpu = (ROOT / "deploy" / "docker" / "Dockerfile.gpu").read_text()
    cpu = (ROOT / "deploy" / "docker" / "Dockerfile.cpu").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3" in gpu
    # s3: `trace-rt fetch-repo` in the object-storage component's init container.
    assert '".[tensorrt,s3]"' in gpu and '".[serve,s3]"' in cpu
    for text in (gpu, cpu):
        assert "torch leaked" in text and "COPY trace_rt ./trace_rt" in text
