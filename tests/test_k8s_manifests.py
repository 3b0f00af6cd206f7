"""deploy/k8s: the Kubernetes manifests validate against the API schemas of the Kubernetes versions they target
(kubernetes-validate ships the schemas: no cluster, no network) and agree with each other and with the services:
their command lines, ports, probes, selectors, draining times, the encoder pool's address; and a decoder
spreads its encoder calls over every address of the pool, as the headless encoder Service needs."""
from __future__ import annotations

import argparse
import asyncio
import copy
import re

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from conftest import REPO
from worldstream.cli import build_parser
from worldstream.encoder.client import ENCODER_SERVICE, EncoderClient
from worldstream.engine.action_track import config_layout
from worldstream.engine.config import config_from_args
from worldstream.serving.metrics import ServiceMetrics
from worldstream.v1 import session_pb2

K8S = REPO / "deploy" / "k8s"
# The oldest Kubernetes they need (the preStop `sleep` action is on by default from 1.30) and the newest the
# validator knows.
VERSIONS = ["1.30", kubernetes_validate.latest_version()]
NAMESPACE = "worldstream"
SESSION_SERVICE = session_pb2.DESCRIPTOR.services_by_name["WorldSessionService"].full_name
LONGEST_BLOCK_SECONDS = 0.5
# kubectl apply -f deploy/k8s/ takes the files in name order and does not descend into extras/ (its CRDs are
# optional: the Prometheus Operator, the Gateway API).
CORE_FILES = sorted(K8S.glob("*.yaml"))
EXTRA_FILES = sorted((K8S / "extras").glob("*.yaml"))


def load(paths) -> list[dict]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


CORE = load(CORE_FILES)
EXTRAS = load(EXTRA_FILES)


def the(kind: str, name: str, resources=CORE) -> dict:
    [found] = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def deployments() -> list[dict]:
    return [r for r in CORE if r["kind"] == "Deployment"]


def pods_matching(labels: dict) -> list[dict]:
    """The Deployments whose pods carry all these labels (a Service's selector)."""
    return [d for d in deployments() if labels.items() <= d["spec"]["template"]["metadata"]["labels"].items()]


def pods_selected(selector: dict) -> list[dict]:
    """The same for a LabelSelector (Deployments, budgets, policies, monitors)."""
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are used here"
    return pods_matching(selector["matchLabels"])


def container(deployment: dict) -> dict:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


def expanded_args(deployment: dict) -> list[str]:
    """The container's args with $(VAR) references expanded as the kubelet does (from env and the ConfigMap)."""
    c = container(deployment)
    env = {}
    for source in c.get("envFrom", []):
        env.update(the("ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", [])})
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in c["args"]]


def service_args(deployment: dict) -> argparse.Namespace:
    """The container's command line as the `worldstream` program parses it: a flag the services do not have, or
    a bad value, fails here."""
    c = container(deployment)
    assert c["command"] == ["worldstream"]
    return build_parser().parse_args(expanded_args(deployment))


def port_named(deployment: dict, name: str) -> int:
    [port] = [p["containerPort"] for p in container(deployment)["ports"] if p["name"] == name]
    return port


# ---- the schemas --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_every_core_resource_validates_strictly(version):
    """Strict: an unknown or misspelled field is an error, not silently dropped."""
    assert {r["kind"] for r in CORE} >= {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                                        "PodDisruptionBudget", "NetworkPolicy"}
    for resource in CORE:
        kubernetes_validate.validate(resource, version, strict=True)


def test_the_validation_catches_mistakes():
    decoder = the("Deployment", "decoder")
    misspelled = copy.deepcopy(decoder)
    c = container(misspelled)
    c["readinesProbe"] = c.pop("readinessProbe")
    named_port = copy.deepcopy(decoder)
    container(named_port)["startupProbe"]["grpc"]["port"] = "grpc"  # grpc probes take a number only
    for broken in (misspelled, named_port):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def _definitions_validator(definition: str) -> Draft202012Validator:
    """A validator for one type of the Kubernetes API definitions (for the parts of custom resources that are
    Kubernetes types: metadata, label selectors)."""
    version = kubernetes_validate.latest_version()
    definitions = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ Registry()
    return Draft202012Validator({"$ref": f"{definitions['$id']}#/$defs/{definition}"}, registry=registry)


def test_custom_resources_have_the_fields_their_crds_define():
    """The CRDs' schemas do not ship with the validator: check their Kubernetes parts against the API types and
    the rest field by field (against the CRDs' documented fields)."""
    meta = _definitions_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    label_selector = _definitions_validator("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector")
    assert {(r["apiVersion"], r["kind"]) for r in EXTRAS} == {
        ("monitoring.coreos.com/v1", "PodMonitor"), ("gateway.networking.k8s.io/v1", "Gateway"),
        ("gateway.networking.k8s.io/v1", "GRPCRoute")}
    for resource in EXTRAS:
        assert set(resource) == {"apiVersion", "kind", "metadata", "spec"}
        meta.validate(resource["metadata"])
        assert resource["metadata"]["namespace"] == NAMESPACE

    monitor = the("PodMonitor", "worldstream", EXTRAS)
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    label_selector.validate(monitor["spec"]["selector"])
    scraped = pods_selected(monitor["spec"]["selector"])
    assert {d["metadata"]["name"] for d in scraped} == {"encoder", "decoder"}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert re.fullmatch(r"(\d+(ms|s|m|h))+", endpoint["interval"])
        for deployment in scraped:
            assert port_named(deployment, endpoint["port"]) == service_args(deployment).metrics_port

    gateway = the("Gateway", "worldstream", EXTRAS)
    assert set(gateway["spec"]) == {"gatewayClassName", "listeners"}
    [listener] = gateway["spec"]["listeners"]
    assert listener["protocol"] == "HTTPS" and listener["tls"]["mode"] == "Terminate"
    route = the("GRPCRoute", "decoder", EXTRAS)
    assert set(route["spec"]) == {"parentRefs", "hostnames", "rules"}
    assert route["spec"]["parentRefs"] == [{"name": gateway["metadata"]["name"], "sectionName": listener["name"]}]
    assert route["spec"]["hostnames"] == [listener["hostname"]]
    for rule in route["spec"]["rules"]:
        assert set(rule) == {"matches", "backendRefs"}
        assert [m["method"]["service"] for m in rule["matches"]] == [SESSION_SERVICE]
        for backend in rule["backendRefs"]:
            service = the("Service", backend["name"])
            assert backend["port"] in [p["port"] for p in service["spec"]["ports"]]
            assert [d["metadata"]["name"] for d in pods_matching(service["spec"]["selector"])] == ["decoder"]


# ---- consistency ------------------------------------------------------------------------------------------

def test_applied_in_order_into_one_namespace():
    assert CORE[0] == the("Namespace", NAMESPACE)
    assert all(r["metadata"]["namespace"] == NAMESPACE for r in CORE[1:])
    assert the("Namespace", NAMESPACE)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_services_budgets_and_policies_select_one_deployment_by_named_ports():
    for resource in CORE:
        spec = resource.get("spec", {})
        if resource["kind"] == "Service":
            [target] = pods_matching(spec["selector"])
            for port in spec["ports"]:
                assert port_named(target, port["targetPort"]) == port["port"]
        elif resource["kind"] == "PodDisruptionBudget":
            [target] = pods_selected(spec["selector"])
            assert spec["maxUnavailable"] == 1 and spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        elif resource["kind"] == "NetworkPolicy":
            [target] = pods_selected(spec["podSelector"])
            for rule in spec["ingress"]:
                for port in rule["ports"]:
                    port_named(target, port["port"])
    assert {pdb["metadata"]["name"] for pdb in CORE if pdb["kind"] == "PodDisruptionBudget"} == {"encoder", "decoder"}
    for deployment in deployments():
        assert pods_selected(deployment["spec"]["selector"]) == [deployment]


def test_ports_probes_and_metrics_agree_with_the_command_line():
    for deployment in deployments():
        c, args = container(deployment), service_args(deployment)
        assert (args.command, args.service) == ("serve", c["name"])
        config_from_args(args)  # the config exists and loads (strictly)
        assert (port_named(deployment, "grpc"), port_named(deployment, "metrics")) == (args.port, args.metrics_port)
        # Listening on loopback (the services' default) would hide both from the kubelet and from Prometheus.
        assert args.host == args.metrics_host == "0.0.0.0"
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == args.metrics_port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == args.port
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 10 * 60, "cold torch.compile takes minutes"
        assert c["readinessProbe"]["periodSeconds"] * c["readinessProbe"]["failureThreshold"] <= 15
    # The decoder's readiness is the session service's status, which includes reaching the encoder pool.
    assert container(the("Deployment", "decoder"))["readinessProbe"]["grpc"]["service"] == SESSION_SERVICE


def test_decoders_reach_every_encoder_pod_through_a_headless_service():
    """A ClusterIP balances per connection, and a decoder has one channel to the encoders: it would pin to one
    pod. A headless Service resolves to every ready pod, and the channel spreads streams over them."""
    decoder = service_args(the("Deployment", "decoder"))
    match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", decoder.encoder_address)
    assert match, decoder.encoder_address
    service = the("Service", match.group(1))
    assert match.group(2) == service["metadata"]["namespace"]
    assert service["spec"]["clusterIP"] == "None"
    [encoder] = pods_matching(service["spec"]["selector"])
    assert encoder["metadata"]["name"] == "encoder"
    assert int(match.group(3)) == service_args(encoder).port
    assert service_args(encoder).config == decoder.config, "both serve the same config (mode)"


def test_the_encoder_api_is_reachable_from_decoder_pods_only():
    encoder = the("Deployment", "encoder")
    for service in (r for r in CORE if r["kind"] == "Service"):
        if pods_matching(service["spec"]["selector"]) == [encoder]:
            assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert all(r["kind"] != "Ingress" for r in CORE)
    policy = the("NetworkPolicy", "encoder")
    assert pods_selected(policy["spec"]["podSelector"]) == [encoder]
    grpc_rules = [rule for rule in policy["spec"]["ingress"] if {"port": "grpc"} in rule["ports"]]
    assert grpc_rules == [{"from": [{"podSelector": the("Deployment", "decoder")["spec"]["selector"]}],
                           "ports": [{"port": "grpc"}]}]


def secret_file(deployment: dict, path) -> tuple[str, str]:
    """(Secret, key) of a file that the container reads from a read-only Secret volume."""
    pod = deployment["spec"]["template"]["spec"]
    [mount] = [m for m in container(deployment)["volumeMounts"] if path.parent.as_posix() == m["mountPath"]]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] and "items" not in volume["secret"]
    return volume["secret"]["secretName"], path.name


def test_decoders_present_the_token_the_encoders_check():
    encoder, decoder = service_args(the("Deployment", "encoder")), service_args(the("Deployment", "decoder"))
    assert (secret_file(the("Deployment", "encoder"), encoder.token_file)
            == secret_file(the("Deployment", "decoder"), decoder.encoder_token_file))


def test_draining_outlasts_preStop_grace_and_a_block():
    for deployment in deployments():
        spec = deployment["spec"]["template"]["spec"]
        pre_stop = container(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
        grace = service_args(deployment).grace
        assert spec["terminationGracePeriodSeconds"] > pre_stop + grace + LONGEST_BLOCK_SECONDS
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_a_draining_encoder_feeds_its_sessions_to_the_end():
    """A stopping encoder keeps its running Encode streams, and each one feeds a decoder session to its end:
    --grace covers the longest session at realtime pace (max_blocks blocks of frames at the config's fps)."""
    args = service_args(the("Deployment", "encoder"))
    cfg = config_from_args(args)
    session_seconds = config_layout(cfg).track_frames(int(cfg.limits.max_blocks)) / cfg.video.fps
    assert session_seconds < args.grace < session_seconds * 1.25


def test_gpus_security_and_volumes():
    cache = the("PersistentVolumeClaim", "worldstream-compile-cache")
    assert cache["spec"]["accessModes"] == ["ReadWriteMany"], "every pod shares one warm compile cache"
    for deployment in deployments():
        pod, c = deployment["spec"]["template"]["spec"], container(deployment)
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}
        env = {e["name"]: e["value"] for e in c["env"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        checkpoints = mounts[env["WORLDSTREAM_CHECKPOINTS"]]
        assert checkpoints["readOnly"] and volumes[checkpoints["name"]]["persistentVolumeClaim"]["readOnly"]
        compile_cache = mounts[env["TORCHINDUCTOR_CACHE_DIR"]]
        assert volumes[compile_cache["name"]]["persistentVolumeClaim"]["claimName"] == cache["metadata"]["name"]
        # The root filesystem is read-only: what Python, torch and Triton write goes to an emptyDir.
        assert "emptyDir" in volumes[mounts[env["HOME"]]["name"]]


def test_a_decoder_spreads_its_encoder_calls_over_every_address_of_the_pool():
    """What the headless Service gives a decoder is one name with an address per encoder pod. The decoder's
    channel must use them all (gRPC's default policy, pick_first, sends everything to the first address).
    Here two real gRPC servers stand for two encoder pods behind one multi-address target."""
    class CountingHealth(health_aio.HealthServicer):
        def __init__(self):
            super().__init__()
            self.checks = 0

        async def Check(self, request, context):
            self.checks += 1
            return await super().Check(request, context)

    async def run() -> list[int]:
        pods, ports = [], []
        for _ in range(2):
            server, servicer = grpc.aio.server(), CountingHealth()
            await servicer.set(ENCODER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            ports.append(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
            pods.append((server, servicer))
        client = EncoderClient("ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports), ServiceMetrics("decoder"))
        try:
            for _ in range(40):  # the second connection may still be coming up for the first calls
                assert await client.serving(timeout=5.0)
                if all(servicer.checks >= 3 for _, servicer in pods):
                    break
        finally:
            await client.close()
            for server, _ in pods:
                await server.stop(None)
        return [servicer.checks for _, servicer in pods]

    checks = asyncio.run(run())
    assert min(checks) >= 3, f"health checks per encoder address: {checks}"
