"""Deployment configs: cluster.yaml passes Ray's own cluster-launcher validation, and the KubeRay manifests have
the shape, sizes and references a vqpipe run needs. Offline and fast: nothing here talks to a cloud or a cluster.
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "k8s" / "rayjob.yaml"
CRONJOB_YAML = ROOT / "k8s" / "cronjob.yaml"
MANIFESTS = [RAYJOB_YAML, CRONJOB_YAML]
SOURCES = {"rayjob.yaml": RAYJOB_YAML, "cronjob.yaml template": CRONJOB_YAML}  # each RayJob and its file
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"].get("name") == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def nightly_rayjob() -> dict[str, Any]:
    """The RayJob the CronJob's pod creates, read from the ConfigMap volume its command points at."""
    docs = load_docs(CRONJOB_YAML)
    pod = find(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    manifest = next(a for a in container["command"] if a.endswith((".yaml", ".yml")))
    mount = next(
        m for m in container["volumeMounts"] if manifest.startswith(m["mountPath"].rstrip("/") + "/")
    )
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    data = find(docs, "ConfigMap", volume["configMap"]["name"])["data"]
    return yaml.safe_load(data[manifest[len(mount["mountPath"].rstrip("/")) + 1 :]])


def rayjobs() -> dict[str, dict[str, Any]]:
    return {"rayjob.yaml": find(load_docs(RAYJOB_YAML), "RayJob"), "cronjob.yaml template": nightly_rayjob()}


def job_config_of(label: str) -> dict[str, Any]:
    """The TOML the entrypoint's --config names, parsed: follow head mount -> volume -> ConfigMap key."""
    rayjob, docs = rayjobs()[label], load_docs(SOURCES[label])
    args = shlex.split(rayjob["spec"]["entrypoint"])
    path = args[args.index("--config") + 1]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    for container in head["containers"]:
        for mount in container.get("volumeMounts", []):
            prefix = mount["mountPath"].rstrip("/") + "/"
            if path.startswith(prefix):
                volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
                return tomllib.loads(
                    find(docs, "ConfigMap", volume["configMap"]["name"])["data"][path[len(prefix) :]]
                )
    raise AssertionError(f"--config {path} is not under any volume mounted on the head")


def cpu_cores(quantity: str | int | float) -> float:
    q = str(quantity)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def worker_group(rayjob: dict[str, Any]) -> dict[str, Any]:
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


def container_limits(group: dict[str, Any]) -> dict[str, Any]:
    (container,) = group["template"]["spec"]["containers"]
    return container["resources"]["limits"]


# -- cluster.yaml: Ray's own validation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_util():
    """The checks `ray up` runs before it touches the provider: prepare_config (defaults from Ray's aws
    defaults.yaml, merged setup commands, docker checks, per-type worker bounds) then validate_config
    (ray-schema.json plus cross-field checks). Provider bootstrap (IAM, VPC, AMI) is the part that needs AWS."""
    from ray.autoscaler._private import util

    return util


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(ray_util, cluster) -> dict[str, Any]:
    return ray_util.prepare_config(copy.deepcopy(cluster))


def test_cluster_yaml_passes_ray_validation(ray_util, prepared):
    ray_util.validate_config(prepared)
    assert prepared["cluster_name"] == "vqpipe"
    assert prepared["provider"]["type"] == "aws"


def _set(path: str, value: Any):
    """A mutation of the cluster config: set the dotted key `path` to `value` (a callable gets the config)."""

    def mutate(c: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[last] = value(c) if callable(value) else value

    return mutate


BROKEN = {
    "unknown top-level key": (_set("max_worker", 16), "'max_worker' was unexpected"),
    "GPU count as a string": (
        _set("available_node_types.gpu_worker.resources.GPU", "1"),
        "is not of type 'integer'",
    ),
    "unknown node-type key": (
        _set("available_node_types.gpu_worker.min_replicas", 0),
        "'min_replicas' was unexpected",
    ),
    "undefined head type": (_set("head_node_type", "no-such-type"), "must be one of `available_node_types`"),
    "min_workers above max_workers": (
        _set("available_node_types.gpu_worker.min_workers", lambda c: c["max_workers"] + 1),
        "smaller than the sum of `min_workers`",
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_ray_validation_rejects_a_broken_copy(ray_util, cluster, case):
    import jsonschema

    mutate, message = BROKEN[case]
    broken = copy.deepcopy(cluster)
    mutate(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        ray_util.validate_config(ray_util.prepare_config(broken))


def test_head_has_no_gpu_and_workers_have_one(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    # Explicit, not {}: an empty resources map is filled from the instance type, GPUs included.
    assert head["resources"].get("GPU") == 0
    assert head.get("max_workers", 0) == 0
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert workers, "no worker node type"
    for name, t in workers.items():
        assert t["resources"].get("GPU") == 1, name
        assert t.get("min_workers", 0) == 0, f"{name}: GPU workers should scale from zero"
        assert 0 < t["max_workers"] <= cluster["max_workers"], name
        # The configs this cluster is meant to run: the documented `ray job submit` one and the k8s ones.
        jobs = [tomllib.loads((ROOT / "jobs" / "example.toml").read_text())] + [
            job_config_of(label) for label in SOURCES
        ]
        for job in jobs:
            run = job.get("run", {})
            assert run.get("cpus_per_replica", 1) <= t["resources"]["CPU"], f"{name}: a replica does not fit"
            assert run.get("gpus_per_replica", 1) <= t["resources"]["GPU"], f"{name}: a replica does not fit"
            assert run.get("replicas", 0) <= cluster["max_workers"], "more replicas than workers"


def test_setup_installs_vqpipe_and_the_local_ray_version(prepared):
    import ray

    mounts = prepared["file_mounts"]
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged into both
        text = "\n".join(prepared[key])
        assert f'"ray[default]=={ray.__version__}"' in text, (
            f"{key}: `ray up` needs the same Ray on the cluster"
        )
        assert re.search(r"pip install .*torch", text), key
        m = re.search(r'pip install .*?(?:-e\s+)?"?([^"\s]*vqpipe[^"\s]*)"?\s*$', text, re.M)
        assert m, f"{key}: nothing installs vqpipe"
        target = m.group(1)
        from_mount = any(
            target.startswith(remote.rstrip("/") + "/") or target.startswith(remote + "[")
            for remote in mounts
        )
        assert from_mount or "git+" in target, f"{key}: {target} is neither a mounted path nor a git URL"
    assert "." in mounts.values() or any(Path(v).resolve() == ROOT for v in mounts.values())


def _ray_start_args(commands: list[str]) -> list[str]:
    starts = [shlex.split(part) for cmd in commands for part in re.split(r";|&&", cmd) if "ray start" in part]
    assert len(starts) == 1, commands
    return starts[0]


def test_start_commands_bind_what_they_should(cluster):
    head_cmds, worker_cmds = cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]
    assert head_cmds[0] == "ray stop" and worker_cmds[0] == "ray stop"
    head = _ray_start_args(head_cmds)
    for flag in (
        "--head",
        "--port=6379",
        "--dashboard-host=0.0.0.0",
        "--autoscaling-config=~/ray_bootstrap_config.yaml",
        "--metrics-export-port=8080",
    ):
        assert flag in head, flag
    worker = _ray_start_args(worker_cmds)
    assert "--address=$RAY_HEAD_IP:6379" in worker
    assert "--head" not in worker


# -- Kubernetes manifests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_document_parses_and_is_named(path):
    docs = load_docs(path)
    assert docs
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"]
        name = doc["metadata"].get("name")
        assert name and DNS_1123.match(name), f"{doc['kind']}: bad name {name!r}"


@pytest.mark.parametrize("label", SOURCES)
def test_rayjob_shape(label):
    job = rayjobs()[label]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    name = job["metadata"].get("name") or job["metadata"].get("generateName", "").rstrip("-")
    assert DNS_1123.match(name) and len(name) <= 42, name  # KubeRay caps RayJob names at 47 (+5 generated)
    spec = job["spec"]
    args = shlex.split(spec["entrypoint"])
    assert args[0] == "python" and args[1].endswith("jobs/run_tokenize.py") and "--config" in args
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    for key in ("ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds"):
        assert isinstance(spec[key], int) and spec[key] >= 0, key

    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["template"]["spec"]["containers"]
    for c in head["template"]["spec"]["containers"]:
        for section in ("requests", "limits"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(section, {}), "GPU on the head"

    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups + [head]:
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), (
            "rayStartParams: strings"
        )
    for group in groups:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (c,) = group["template"]["spec"]["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        # Kubernetes requires requests == limits for extended resources such as GPUs.
        assert c["resources"]["requests"].get("nvidia.com/gpu", 1) == 1


def test_entrypoint_script_is_in_the_repo():
    for job in rayjobs().values():
        script = shlex.split(job["spec"]["entrypoint"])[1]
        rel = script[script.index("jobs/") :]
        assert (ROOT / rel).is_file(), f"{rel} (the image copies the repo to {script[: -len(rel)]})"


def test_entry_points_shadow_no_standard_module():
    """`python jobs/x.py` puts jobs/ first on sys.path: a jobs/tokenize.py once hid the standard library's
    tokenize (which logging and traceback import) and the job died on a circular import."""
    names = [p.stem for p in (ROOT / "jobs").glob("*.py")]
    assert names and not [n for n in names if n in sys.stdlib_module_names]


@pytest.mark.parametrize("label", SOURCES)
def test_job_config_is_valid_and_fits_the_workers(label):
    from vqpipe.config import build_config

    job = rayjobs()[label]
    data = job_config_of(label)
    assert data["inputs"] and data["output"] and data["model"]["preset"]
    cfg = build_config(data)  # vqpipe's own validation: unknown keys and bad values are errors
    group = worker_group(job)
    limits = container_limits(group)
    assert cfg.run.cpus_per_replica <= cpu_cores(limits["cpu"]), "a replica's CPUs do not fit a worker pod"
    # Workers scale from zero, so the job must ask for its replicas (0 means "as many as the cluster hosts now").
    assert 1 <= cfg.run.replicas <= group["maxReplicas"]
    assert cfg.run.gpus_per_replica == limits["nvidia.com/gpu"]


def test_nightly_rayjob_is_the_rayjob_with_its_own_config():
    jobs = copy.deepcopy(rayjobs())
    one_off, nightly = jobs["rayjob.yaml"], jobs["cronjob.yaml template"]
    for job in (one_off, nightly):
        for volume in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]:
            if "configMap" in volume:
                volume["configMap"]["name"] = "<job config>"
    assert nightly["spec"] == one_off["spec"], "k8s/cronjob.yaml's RayJob drifted from k8s/rayjob.yaml"

    once, nightly_cfg = job_config_of("rayjob.yaml"), job_config_of("cronjob.yaml template")
    # vqpipe refuses a brace range with names that do not exist yet; a growing prefix needs a glob/directory.
    assert not any("{" in i for i in nightly_cfg["inputs"])
    nightly_cfg.pop("inputs"), once.pop("inputs")
    assert nightly_cfg == once, "the nightly job config differs from k8s/rayjob.yaml's in more than inputs"


CRON_FIELDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def valid_cron(schedule: str) -> bool:
    fields = schedule.split()
    if len(fields) != 5:
        return False
    for text, (low, high) in zip(fields, CRON_FIELDS):
        for item in text.split(","):
            m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", item)
            if not m:
                return False
            nums = [int(g) for g in m.groups()[1:3] if g is not None]
            if any(not low <= n <= high for n in nums) or (len(nums) == 2 and nums[0] > nums[1]):
                return False
            if m.group(4) is not None and int(m.group(4)) == 0:
                return False
    return True


def test_cron_validator_can_say_no():
    assert valid_cron("0 2 * * *") and valid_cron("*/15 1-5 * * 1,3")
    for bad in ("0 2 * *", "61 2 * * *", "0 24 * * *", "0 2 0 * *", "0 2 * * 8", "@daily", "0 5-2 * * *"):
        assert not valid_cron(bad), bad


def test_cronjob_creates_the_rayjob_with_just_enough_rights():
    docs = load_docs(CRONJOB_YAML)
    cron = find(docs, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    assert valid_cron(cron["spec"]["schedule"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job_spec = cron["spec"]["jobTemplate"]["spec"]
    pod = job_spec["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    assert container["command"][:2] == ["kubectl", "create"], (
        "apply would reuse one name; create makes a new one"
    )

    rayjob = nightly_rayjob()  # follows command -> mount -> ConfigMap -> manifest
    assert rayjob["kind"] == "RayJob" and rayjob["apiVersion"] == "ray.io/v1"
    assert "generateName" in rayjob["metadata"] and "name" not in rayjob["metadata"], (
        "needs a unique name per run"
    )
    assert job_spec["backoffLimit"] == 0, "a retried pod would create a second RayJob for the same night"
    # Daily schedule: the run must be stopped before the next night's starts.
    assert rayjob["spec"]["activeDeadlineSeconds"] + rayjob["spec"]["ttlSecondsAfterFinished"] < 24 * 3600

    account = pod["serviceAccountName"]
    find(docs, "ServiceAccount", account)
    binding = next(
        d for d in docs if d["kind"] == "RoleBinding" and any(s["name"] == account for s in d["subjects"])
    )
    role = find(docs, "Role", binding["roleRef"]["name"])
    assert any(
        "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"]
        for r in role["rules"]
    )
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in role["rules"])


# -- no credentials in any file -----------------------------------------------------------------------------------

KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_ASSIGNMENT = re.compile(r"(?i)aws_secret_access_key\W{1,4}[A-Za-z0-9/+=]{40}\b")
SECRET_NAMES = re.compile(r"(?i)secret|token|password|passwd|credential|private_key|access_key")


def credential_problems(text: str) -> list[str]:
    problems = [f"literal access key id {m.group(0)[:6]}…" for m in KEY_ID.finditer(text)]
    problems += ["literal secret access key" for _ in SECRET_ASSIGNMENT.finditer(text)]

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("kind") == "Secret" and ("data" in node or "stringData" in node):
                problems.append(f"{where}: a Secret with data in the manifest")
            for env in node.get("env", []) if isinstance(node.get("env"), list) else []:
                if SECRET_NAMES.search(env.get("name", "")) and "value" in env:
                    problems.append(f"{where}: env {env['name']} has a literal value; use valueFrom/envFrom")
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
        elif isinstance(node, str) and "\n" in node and node.lstrip().startswith("apiVersion"):
            for doc in yaml.safe_load_all(node):  # manifests embedded in ConfigMaps
                walk(doc, f"{where}(embedded)")

    for doc in yaml.safe_load_all(text):
        walk(doc, "")
    return problems


@pytest.mark.parametrize("path", MANIFESTS + [CLUSTER_YAML], ids=lambda p: p.name)
def test_no_literal_credentials(path):
    assert credential_problems(path.read_text()) == []


def test_credential_check_can_say_no():
    fake_id = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documented example, split so scanners ignore this file
    assert credential_problems(f"x: {fake_id}\n")
    assert credential_problems("aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY" + "\n")
    leaked = yaml.safe_dump({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]})
    assert credential_problems(leaked)
    embedded = yaml.safe_dump({"kind": "ConfigMap", "data": {"j.yaml": "apiVersion: v1\n" + leaked}})
    assert credential_problems(embedded)
    assert credential_problems("apiVersion: v1\nkind: Secret\nstringData: {k: v}\n")
    assert not credential_problems(yaml.safe_dump({"envFrom": [{"secretRef": {"name": "vqpipe-aws"}}]}))
