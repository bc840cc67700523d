"""The k8s/ manifests, validated offline: KubeRay resources against KubeRay's CRD schemas
(from ../shared/kuberay-crds when present, else the copy derived into k8s/schemas/), core
Kubernetes objects against the Kubernetes 1.30 schemas bundled with kubernetes-validate.

CRD schemas do not forbid unknown fields (the API server prunes them silently), so a typo
would pass; like `kubectl apply --validate=strict`, we reject fields a schema does not declare.
"""

import copy
import shlex
import gzip
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SHARED_CRDS = ROOT.parent / "shared" / "kuberay-crds"
KUBERNETES_VERSION = "1.30.0"


def crd_schema(kind: str) -> dict:
    shared = SHARED_CRDS / f"ray.io_{kind.lower()}s.yaml"
    if shared.is_file():
        crd = yaml.safe_load(shared.read_text())
        return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    with gzip.open(K8S / "schemas" / f"{kind}.v1.json.gz", "rt") as f:
        return json.load(f)


def strict(schema):
    """Every object schema with declared properties rejects the undeclared ones."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


VALIDATORS = {kind: jsonschema.Draft7Validator(strict(crd_schema(kind))) for kind in ("RayCluster", "RayJob")}


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def errors(doc: dict) -> list[str]:
    if doc["apiVersion"] == "ray.io/v1":
        return [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in VALIDATORS[doc["kind"]].iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


def test_the_manifests_cover_a_cluster_a_job_and_storage():
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds


@pytest.mark.parametrize("name, doc", manifests(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_manifest_is_valid(name, doc):
    assert errors(doc) == [], name


def cluster() -> dict:
    return copy.deepcopy(next(doc for _, doc in manifests() if doc["kind"] == "RayCluster"))


def test_a_misspelled_field_fails():
    doc = cluster()
    group = doc["spec"]["workerGroupSpecs"][1]
    group["replica"] = group.pop("replicas")  # the typo a person makes
    assert any("'replica' was unexpected" in e for e in errors(doc)), errors(doc)
    doc = cluster()
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert any("'volumeMount' was unexpected" in e for e in errors(doc))


def test_a_wrong_type_fails():
    doc = cluster()
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "one"
    assert any("workerGroupSpecs.0.replicas" in e and "'one' is not of type 'integer'" in e for e in errors(doc))
    pvc = copy.deepcopy(next(doc for _, doc in manifests() if doc["kind"] == "PersistentVolumeClaim"))
    pvc["spec"]["accessModes"] = "ReadWriteMany"
    assert errors(pvc)


def all_containers() -> list[tuple[str, dict]]:
    spec = cluster()["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    containers = [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]
    job = next(doc for _, doc in manifests() if doc["kind"] == "RayJob")
    return containers + [("submitter", c) for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]]


def test_the_wandb_key_is_a_secret_file_only_on_the_head_and_no_manifest_holds_one():
    text = "\n".join(p.read_text() for p in K8S.glob("*.yaml"))
    head_pod = cluster()["spec"]["headGroupSpec"]["template"]["spec"]
    head = head_pod["containers"][0]
    (key_file,) = [e["value"] for e in head["env"] if e["name"] == "WANDB_API_KEY_FILE"]
    (volume,) = [v for v in head_pod["volumes"] if "secret" in v]
    assert volume["secret"] == {"secretName": "wandb", "optional": True, "defaultMode": 0o440}
    (mount,) = [m for m in head["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] and key_file == f"{mount['mountPath']}/api-key"  # the Secret's key
    assert "kind: Secret" not in text
    # The driver (on the head) is the only process that talks to W&B: no other pod gets the
    # key, and no pod as an environment variable.
    assert not [group for group, c in all_containers() if any(e["name"] == "WANDB_API_KEY" for e in c.get("env", []))]
    with_file = [group for group, c in all_containers() if any(e["name"] == "WANDB_API_KEY_FILE" for e in c.get("env", []))]
    assert with_file == ["head"]


def mappings() -> list[tuple[str, dict]]:
    """(where, mapping) for every mapping in every manifest, the documents themselves included."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            found.append((where, node))
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    for name, doc in manifests():
        walk(doc, f"{name}:{doc['kind']}")
    return found


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod template in every manifest: any object with containers."""
    return [(where, node) for where, node in mappings() if isinstance(node.get("containers"), list)]


def containers_of(pod: dict) -> list[dict]:
    return pod["containers"] + pod.get("initContainers", []) + pod.get("ephemeralContainers", [])


def secret_file(secret: dict, key: str, pod: dict) -> tuple[str, int, int, int]:
    """(path in the volume, uid, gid, mode) the kubelet gives a Secret volume's file: owned by
    root:root (kubernetes#57923) with the item's mode, else defaultMode (0644 unset). With a pod
    fsGroup it is chowned to that group and, the volume being read-only, given mode | 0440
    (SetVolumeOwnership, pkg/volume/volume_linux.go)."""
    items = secret.get("items")
    if items is not None:
        (item,) = [i for i in items if i["key"] == key]
        path, mode = item["path"], item.get("mode", secret.get("defaultMode", 0o644))
    else:
        path, mode = key, secret.get("defaultMode", 0o644)
    fs_group = pod.get("securityContext", {}).get("fsGroup")
    if fs_group is None:
        return path, 0, 0, mode
    return path, 0, fs_group, mode | 0o440


def identity(container: dict, pod: dict) -> tuple[int | None, set[int]]:
    """The uid and the gids a container's processes run with, as far as the manifest says (the
    image's primary group, unknown here, is left out)."""
    pod_ctx, ctx = pod.get("securityContext", {}), container.get("securityContext", {})
    uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    group = ctx.get("runAsGroup", pod_ctx.get("runAsGroup"))
    gids = {g for g in [group, pod_ctx.get("fsGroup"), *pod_ctx.get("supplementalGroups", [])] if g is not None}
    return uid, gids


def can_read(uid: int, gids: set[int], owner: int, group: int, mode: int) -> bool:
    if uid == 0:
        return True
    if uid == owner:
        return bool(mode & 0o400)
    if group in gids:
        return bool(mode & 0o040)
    return bool(mode & 0o004)


def test_every_container_that_mounts_the_wandb_secret_can_read_the_key():
    """Read as the kubelet writes it: a root-owned 0400 file is unreadable for uid 1000, and the
    driver would log every run offline."""
    mounted = []
    for where, pod in pod_specs():
        for volume in pod.get("volumes", []):
            sources = volume.get("projected", {}).get("sources", [])
            assert not [s for s in sources if s.get("secret", {}).get("name") == "wandb"], where  # modelled: secret volumes
            if volume.get("secret", {}).get("secretName") != "wandb":
                continue
            path, owner, group, mode = secret_file(volume["secret"], "api-key", pod)
            for container in containers_of(pod):
                for mount in container.get("volumeMounts", []):
                    if mount["name"] != volume["name"]:
                        continue
                    uid, gids = identity(container, pod)
                    assert uid is not None, (where, container["name"], "runAsUser unset: the file's reader is unknown")
                    assert can_read(uid, gids, owner, group, mode), (
                        where, container["name"], f"uid {uid} groups {sorted(gids)} vs {owner}:{group} {mode:o}")
                    key_files = [e["value"] for e in container.get("env", []) if e["name"] == "WANDB_API_KEY_FILE"]
                    assert key_files in ([], [f"{mount['mountPath']}/{path}"]), (where, container["name"])
                    mounted.append(container["name"])
    assert mounted == ["ray-head"]


def test_no_manifest_puts_the_wandb_key_in_an_environment_variable():
    for where, pod in pod_specs():
        for container in containers_of(pod):
            for env in container.get("env", []):
                assert env["name"] != "WANDB_API_KEY", (where, container["name"])
                assert env.get("valueFrom", {}).get("secretKeyRef", {}).get("name") != "wandb", (where, container["name"])
            for source in container.get("envFrom", []):
                assert source.get("secretRef", {}).get("name") != "wandb", (where, container["name"])


# NetworkPolicy semantics, evaluated on the manifests. Ours are applied in one namespace (OURS);
# a pod is {"namespace", "labels"}, an address outside the cluster is {"ip"}.
OURS = "carla"
HEAD = {"namespace": OURS, "labels": {"ray.io/cluster": "carla-td3", "ray.io/node-type": "head"}}
WORKER = {"namespace": OURS, "labels": {"ray.io/cluster": "carla-td3", "ray.io/node-type": "worker", "ray.io/group": "carla-rollout"}}
SUBMITTER = {"namespace": OURS, "labels": {"carla-td3/submits-jobs": "true", "job-name": "carla-td3-train"}}
# The operator's pod labels as its Helm chart and its kustomize manifests set them.
OPERATORS = [
    {"namespace": "kuberay-system", "labels": {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/component": "kuberay-operator"}},
    {"namespace": "ray-system", "labels": {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"}},
]
KUBE_DNS = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}}
NEIGHBOUR = {"namespace": OURS, "labels": {"app": "web"}}
ELSEWHERE = {"namespace": "other", "labels": {"app": "db"}}
INTERNET = {"ip": "35.186.228.49"}
METADATA_SERVER = {"ip": "169.254.169.254"}


def selects(selector: dict | None, labels: dict) -> bool:
    ops = {
        "In": lambda k, v: k in labels and labels[k] in v,
        "NotIn": lambda k, v: k not in labels or labels[k] not in v,
        "Exists": lambda k, v: k in labels,
        "DoesNotExist": lambda k, v: k not in labels,
    }
    selector = selector or {}
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
        ops[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", [])
    )


def peer_matches(peer: dict, endpoint: dict) -> bool:
    if "ipBlock" in peer:  # addresses outside the cluster (pod IPs: up to the network plugin)
        if "ip" not in endpoint:
            return False
        import ipaddress

        ip = ipaddress.ip_address(endpoint["ip"])
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(c) for c in block.get("except", []))
    if "ip" in endpoint:
        return False
    namespace_labels = {"kubernetes.io/metadata.name": endpoint["namespace"]}
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], namespace_labels)
    else:
        in_namespace = endpoint["namespace"] == OURS
    return in_namespace and selects(peer.get("podSelector"), endpoint["labels"])


def port_matches(ports: list | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    return any(
        p.get("protocol", "TCP") == protocol
        and ("port" not in p or p["port"] <= port <= p.get("endPort", p["port"]))
        for p in ports
    )


def policies() -> list[dict]:
    return [doc for _, doc in manifests() if doc["kind"] == "NetworkPolicy"]


def allowed(direction: str, pod: dict, other: dict, port: int, protocol: str = "TCP") -> bool:
    """Whether the policies let `pod` take a connection from `other` (Ingress) or open one to
    it (Egress): a pod no policy of that direction selects is open; else any rule may allow."""
    isolating = [
        p for p in policies()
        if pod["namespace"] == OURS and selects(p["spec"]["podSelector"], pod["labels"])
        and direction in p["spec"].get("policyTypes", ["Ingress"])
    ]
    peers = "from" if direction == "Ingress" else "to"
    return not isolating or any(
        (not rule.get(peers) or any(peer_matches(peer, other) for peer in rule[peers]))
        and port_matches(rule.get("ports"), port, protocol)
        for p in isolating for rule in p["spec"].get(direction.lower(), [])
    )


RAY_PORTS = [6379, 8265, 10001, 20000]  # GCS, dashboard, client, a worker's port


def test_the_head_takes_requests_only_with_the_clusters_token_and_only_from_its_own_pods():
    assert cluster()["spec"]["authOptions"] == {"mode": "token", "secretName": "carla-td3-ray-token"}
    job = next(doc for _, doc in manifests() if doc["kind"] == "RayJob")
    assert SUBMITTER["labels"].items() >= job["spec"]["submitterPodTemplate"]["metadata"]["labels"].items()
    for pod in (HEAD, WORKER):
        for port in RAY_PORTS:
            assert allowed("Ingress", pod, HEAD, port) and allowed("Ingress", pod, WORKER, port)
            for stranger in (NEIGHBOUR, ELSEWHERE, {**ELSEWHERE, "labels": HEAD["labels"]}):
                assert not allowed("Ingress", pod, stranger, port), (stranger, port)
    assert allowed("Ingress", HEAD, SUBMITTER, 8265) and not allowed("Ingress", HEAD, SUBMITTER, 6379)


def test_the_kuberay_operator_reaches_the_dashboard_which_rayjobs_need():
    """KubeRay follows and retries a RayJob through the head's dashboard (8265)."""
    for operator in OPERATORS:
        assert allowed("Ingress", HEAD, operator, 8265), operator
        assert not allowed("Ingress", HEAD, operator, 6379), operator
        assert not allowed("Ingress", HEAD, {**operator, "labels": {}}, 8265)  # only the operator's pods


def test_the_pods_reach_each_other_dns_and_https_and_nothing_else():
    for pod in (HEAD, WORKER):
        for port in RAY_PORTS:
            assert allowed("Egress", pod, HEAD, port) and allowed("Egress", pod, WORKER, port)
        assert allowed("Egress", pod, KUBE_DNS, 53, "UDP") and allowed("Egress", pod, KUBE_DNS, 53, "TCP")
        assert allowed("Egress", pod, INTERNET, 443)  # W&B: no fixed addresses, any IP on 443
        for other, port, protocol in [
            (INTERNET, 80, "TCP"), (INTERNET, 53, "UDP"), (INTERNET, 22, "TCP"), (METADATA_SERVER, 80, "TCP"),
            (NEIGHBOUR, 8080, "TCP"), (ELSEWHERE, 5432, "TCP"), (KUBE_DNS, 9153, "TCP"),
        ]:
            assert not allowed("Egress", pod, other, port, protocol), (other, port, protocol)
    # The submitter: the head's dashboard and DNS only; nothing may connect to it.
    assert allowed("Egress", SUBMITTER, HEAD, 8265) and allowed("Egress", SUBMITTER, KUBE_DNS, 53, "UDP")
    for other, port in [(HEAD, 6379), (WORKER, 10001), (INTERNET, 443), (NEIGHBOUR, 80)]:
        assert not allowed("Egress", SUBMITTER, other, port), (other, port)
    for other in (HEAD, NEIGHBOUR):
        assert not allowed("Ingress", SUBMITTER, other, 8080)


def test_every_container_runs_unprivileged_and_our_image_is_always_pulled():
    for group, container in all_containers():
        context = container.get("securityContext", {})
        assert context.get("runAsNonRoot") and context.get("runAsUser", 0) != 0, (group, container["name"])
        assert context.get("allowPrivilegeEscalation") is False, (group, container["name"])
        if container["image"].startswith("ghcr.io/carla-td3/"):  # a tag we re-push
            assert container["imagePullPolicy"] == "Always", (group, container["name"])


# The "restricted" Pod Security Standard (with the "baseline" one it includes), as of Kubernetes
# 1.30: https://kubernetes.io/docs/concepts/security/pod-security-standards/
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t"}


def restricted_violations(pod: dict, annotations: dict | None = None) -> list[str]:
    bad = []
    pod_ctx = pod.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            bad.append(field)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    for sysctl in pod_ctx.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            bad.append(f"sysctl {sysctl['name']}")
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            bad.append(f"{key}: {value}")
    pod_non_root = pod_ctx.get("runAsNonRoot") is True
    pod_seccomp = pod_ctx.get("seccompProfile", {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        bad.append(f"pod seccompProfile {pod_seccomp}")
    for ctx, who in [(pod_ctx, "pod")] + [(c.get("securityContext", {}), c["name"]) for c in containers_of(pod)]:
        if ctx.get("windowsOptions", {}).get("hostProcess"):
            bad.append(f"{who}: hostProcess")
        if ctx.get("runAsUser") == 0:
            bad.append(f"{who}: runAsUser 0")
        if ctx.get("appArmorProfile", {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            bad.append(f"{who}: appArmorProfile")
        selinux = ctx.get("seLinuxOptions", {})
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            bad.append(f"{who}: seLinuxOptions {selinux}")
    for container in containers_of(pod):
        name, ctx = container["name"], container.get("securityContext", {})
        if ctx.get("privileged"):
            bad.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation not false")
        if ctx.get("runAsNonRoot", pod_non_root) is not True:
            bad.append(f"{name}: runAsNonRoot not true")
        if ctx.get("seccompProfile", {}).get("type", pod_seccomp) not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile not RuntimeDefault or Localhost")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: capabilities add {caps['add']}")
        if ctx.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            bad.append(f"{name}: hostPort")
    return bad


def pod_templates() -> list[tuple[str, dict, dict]]:
    """(where, pod spec, annotations) for every pod template in every manifest."""
    templates = [
        (f"{where}.spec", node["spec"], node.get("metadata", {}).get("annotations", {}))
        for where, node in mappings()
        if isinstance(node.get("spec"), dict) and isinstance(node["spec"].get("containers"), list)
    ]
    assert [w for w, _, _ in templates] == [w for w, _ in pod_specs()]  # no pod spec outside a template
    return templates


def test_every_pod_template_meets_the_restricted_pod_security_standard():
    templates = pod_templates()
    assert len(templates) == 4  # head, learner, carla-rollout, the RayJob's submitter
    for where, pod, annotations in templates:
        assert restricted_violations(pod, annotations) == [], where


def test_the_restricted_check_catches_what_it_is_for():
    _, pod, _ = pod_templates()[2]  # the rollout pod: three containers
    for change in [
        lambda p: p.update(hostNetwork=True),
        lambda p: p.setdefault("securityContext", {}).pop("seccompProfile", None),
        lambda p: p["containers"][1]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        lambda p: p["containers"][1]["securityContext"].pop("capabilities", None),
        lambda p: p["containers"][0]["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
        lambda p: p["containers"][2]["securityContext"].update(runAsNonRoot=False),
        lambda p: p["containers"][2]["securityContext"].update(allowPrivilegeEscalation=True),
        lambda p: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        lambda p: p.setdefault("initContainers", []).append({"name": "init", "image": "busybox"}),
    ]:
        changed = copy.deepcopy(pod)
        change(changed)
        assert restricted_violations(changed), change


def test_root_file_systems_are_read_only_with_scratch_mounts_and_no_service_account_token():
    """readOnlyRootFilesystem everywhere but the CARLA server, whose exception k8s/README.md
    gives; what our processes write goes to emptyDir mounts (and /runs)."""
    readme = (K8S / "README.md").read_text()
    writable = []
    for where, pod, _ in pod_templates():
        assert pod.get("automountServiceAccountToken") is False, where
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in containers_of(pod):
            if container.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
                writable.append(container["name"])
                continue
            mounts = {m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in empty_dirs}
            assert "/tmp" in mounts, (where, container["name"])
            if container["name"] != "carla-probe":  # Ray, pip, torch and W&B write under $HOME
                assert {"/home/ray/.cache", "/home/ray/.config"} <= mounts, (where, container["name"])
    assert writable == ["carla-server"]
    assert "`carla-server`" in readme and "readOnlyRootFilesystem" in readme


def test_every_image_names_a_version_and_the_readme_says_how_to_pin_digests():
    for where, pod, _ in pod_templates():
        for container in containers_of(pod):
            image = container["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2].partition("@")[0]
            assert "@sha256:" in image or tag not in ("", "latest"), (where, image)
    assert "@sha256:" in (K8S / "README.md").read_text()


def test_the_image_leaves_out_local_environments_results_and_history():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "wandb", "benchmarks/results"} <= set(ignored)


def test_the_carla_config_puts_the_learner_on_a_gpu_pod_not_in_the_driver_on_the_head():
    from rl.config import load_config

    res = load_config(ROOT / "configs" / "driving_carla_td3.yaml").resources
    assert res.num_learners >= 1 and res.num_gpus_per_learner == 1  # its own actor, with a GPU
    spec = cluster()["spec"]
    assert spec["headGroupSpec"]["rayStartParams"].get("num-gpus", "0") == "0"
    (learner,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "learner"]
    assert int(learner["rayStartParams"]["num-gpus"]) * learner["replicas"] >= res.num_learners * res.num_gpus_per_learner


def test_each_rollout_pod_runs_carla_next_to_its_ray_worker_on_the_pods_gpu():
    (rollout,) = [g for g in cluster()["spec"]["workerGroupSpecs"] if g["groupName"] == "carla-rollout"]
    containers = {c["name"]: c for c in rollout["template"]["spec"]["containers"]}
    assert containers["carla-server"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "-RenderOffScreen" in " ".join(containers["carla-server"]["args"])
    for container in containers.values():  # requests and limits on every container
        assert {"requests", "limits"} <= set(container["resources"]), container["name"]


@pytest.mark.skipif(not SHARED_CRDS.is_dir(), reason="the published CRDs are not next to this checkout")
def test_the_schemas_carried_in_k8s_schemas_are_those_of_the_published_crds():
    for kind in ("RayCluster", "RayJob"):
        with gzip.open(K8S / "schemas" / f"{kind}.v1.json.gz", "rt") as f:
            assert json.load(f) == crd_schema(kind), f"{kind}: rerun python k8s/derive_schemas.py"


def rollout_group() -> dict:
    (rollout,) = [g for g in cluster()["spec"]["workerGroupSpecs"] if g["groupName"] == "carla-rollout"]
    return rollout


def test_the_carla_sidecar_can_render_runs_unprivileged_and_is_probed_through_its_game_thread():
    containers = {c["name"]: c for c in rollout_group()["template"]["spec"]["containers"]}
    carla = containers["carla-server"]
    assert {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "all"} in carla["env"]  # Vulkan: "graphics"
    assert carla["securityContext"]["runAsNonRoot"] and carla["securityContext"]["runAsUser"] != 0
    # By number: a port name in a probe refers to the probed container's own ports.
    health_ports = {p["containerPort"] for p in containers["carla-probe"]["ports"]}
    for probe in (carla["livenessProbe"], carla["readinessProbe"]):
        assert "tcpSocket" not in probe and probe["httpGet"]["port"] in health_ports
    assert containers["carla-probe"]["command"][:3] == ["python", "-m", "carla_env.probe"]
    assert "--serve" in containers["carla-probe"]["command"]


def test_one_env_runner_per_carla_pod_and_a_pod_for_evaluation():
    """The driver (head pod) has no CARLA server: evaluation runs on a rollout pod too."""
    from rl.config import parse_config

    rollout = rollout_group()
    assert yaml.safe_load(yaml.safe_load(rollout["rayStartParams"]["resources"])) == {"carla_server": 1}
    job = next(doc for _, doc in manifests() if doc["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    config = yaml.safe_load((ROOT / argv[argv.index("--config") + 1]).read_text())
    exp = parse_config(config, "rayjob.yaml", overrides)
    assert exp.resources.custom_resources_per_env_runner == {"carla_server": 1}
    assert exp.evaluation.num_env_runners >= 1 and exp.evaluation.interval_iters > 0
    assert rollout["replicas"] == exp.resources.num_env_runners + exp.evaluation.num_env_runners
    assert exp.env.kwargs["server"]["mode"] == "external"


def test_runs_is_writable_only_where_run_files_are_written():
    """The driver (head) writes the run directory, the learner its replay shards with each
    checkpoint; env runners write nothing there, so their pods mount /runs read-only (a
    checkpoint is a pickle: fewer writers, fewer ways to plant one)."""
    spec = cluster()["spec"]
    groups = {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
    read_only = {}
    for name, group in groups.items():
        for container in group["template"]["spec"]["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["mountPath"] == "/runs":
                    read_only[name] = mount.get("readOnly", False)
    assert read_only == {"head": False, "learner": False, **{n: True for n in groups if n not in ("head", "learner")}}
    assert len(read_only) == len(groups) >= 3
