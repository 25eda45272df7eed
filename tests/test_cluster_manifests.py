"""The cluster definitions in ``cluster/`` validate against the schemas that will judge them.

``cluster/ray-up.yaml`` is checked against the JSON schema shipped inside the installed ``ray``
package, the way ``ray up`` checks it. The KubeRay manifests are checked against the operator's
CRDs in ``shared/kuberay``, tightened the way ``kubectl apply`` with strict field validation
treats them: an unknown or misspelled field, a duplicated key or a ``status`` is an error, not
something the API server silently drops. Negative tests break each manifest on purpose to prove
the validators can fail. The rest pin the facts the files exist for: GPUs only on the workers,
token authentication everywhere, nothing listening beyond loopback or the cluster network.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import json
import re
import shlex
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from helpers import shared_path

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY_UP = CLUSTER / "ray-up.yaml"
KUBERAY_DIR = CLUSTER / "kuberay"
KUBERAY_MANIFESTS = {"RayCluster": KUBERAY_DIR / "raycluster.yaml",
                     "RayJob": KUBERAY_DIR / "rayjob.yaml"}
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}

GPU = "nvidia.com/gpu"
GPU_INSTANCE_FAMILIES = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p5.")
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


# --- loading -------------------------------------------------------------------------------

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML


class _StrictLoader(_BaseLoader):
    """A safe loader that rejects duplicate mapping keys, as Kubernetes' strict decoding does."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)


@functools.cache
def read_yaml(path: Path) -> Any:
    return load_yaml(path.read_text())


def fresh(path: Path) -> Any:
    """A private copy of a parsed file, safe to break."""
    return copy.deepcopy(read_yaml(path))


def error_report(validator: jsonschema.protocols.Validator, doc: Any) -> str:
    """Every schema violation in ``doc``, one ``path: message`` per line ("" when valid)."""
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return "\n".join(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                     for e in errors)


# --- ray up: the schema inside the ray package ---------------------------------------------

@functools.cache
def ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed, so its cluster-launcher schema is not available")
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def validate_ray_up(config: dict) -> None:
    """What ``ray.autoscaler._private.util.validate_config`` does with the schema."""
    jsonschema.validate(config, ray_schema())


def ray_start_calls(commands: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """``(environment, arguments)`` of each ``ray start`` in ';'-separated shell commands."""
    calls = []
    for command in commands:
        for step in command.split(";"):
            words = shlex.split(step)
            env = {}
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                name, value = words.pop(0).split("=", 1)
                env[name] = value
            if words[:2] == ["ray", "start"]:
                calls.append((env, words[2:]))
    return calls


def flag(arguments: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value``; "" for a bare flag; None if absent."""
    for i, word in enumerate(arguments):
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
        if word == name:
            following = arguments[i + 1] if i + 1 < len(arguments) else "--"
            return "" if following.startswith("--") else following
    return None


def head_and_gpu_types(config: dict) -> tuple[dict, dict[str, dict]]:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu = {name: t for name, t in types.items()
           if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1}
    return head, gpu


def test_ray_up_validates_against_the_shipped_schema():
    validate_ray_up(read_yaml(RAY_UP))


def test_ray_up_passes_rays_own_config_checks():
    # prepare_config fills in the AWS defaults as `ray up` does; validate_config adds the checks
    # the schema cannot express (head type listed, min_workers within max_workers, ...).
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(fresh(RAY_UP)))


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


RAY_UP_BREAKAGES: dict[str, tuple[Callable[[dict], None], str]] = {
    "misspelled top-level key": (
        lambda c: _rename(c, "head_setup_commands", "head_setup_comands"),
        "'head_setup_comands' was unexpected"),
    "misspelled node-type key": (
        lambda c: _rename(next(iter(head_and_gpu_types(c)[1].values())), "min_workers",
                          "min_worker"), "'min_worker' was unexpected"),
    "misspelled docker key": (
        lambda c: _rename(c["docker"], "head_image", "head_imag"), "'head_imag' was unexpected"),
    "GPU count as a string": (
        lambda c: next(iter(head_and_gpu_types(c)[1].values()))["resources"].update(GPU="1"),
        "'1' is not of type 'integer'"),
    "negative resource": (
        lambda c: head_and_gpu_types(c)[0]["resources"].update(CPU=-1),
        "-1 is less than the minimum of 0"),
    "max_workers as a string": (
        lambda c: c.update(max_workers="8"), "'8' is not of type 'integer'"),
    "command list as a string": (
        lambda c: c.update(setup_commands="pip install -e ~/restorer"), "is not of type 'array'"),
}


@pytest.mark.parametrize("breakage", list(RAY_UP_BREAKAGES))
def test_ray_up_schema_rejects_a_broken_copy(breakage):
    break_it, expected = RAY_UP_BREAKAGES[breakage]
    config = fresh(RAY_UP)
    break_it(config)
    with pytest.raises(jsonschema.ValidationError) as info:
        validate_ray_up(config)
    assert expected in str(info.value)


def test_ray_up_head_is_cpu_only():
    config = read_yaml(RAY_UP)
    head, _ = head_and_gpu_types(config)
    assert head["resources"].get("CPU", 0) > 0
    assert head["resources"].get("GPU", 0) == 0
    for _, arguments in ray_start_calls(config["head_start_ray_commands"]):
        assert flag(arguments, "--num-gpus") in (None, "0")


def test_ray_up_has_one_autoscaling_gpu_worker_group():
    config = read_yaml(RAY_UP)
    _, gpu_types = head_and_gpu_types(config)
    assert len(gpu_types) == 1, f"expected one GPU worker type, found {sorted(gpu_types)}"
    [gpu] = gpu_types.values()
    assert gpu["min_workers"] == 0
    assert gpu["max_workers"] == 8 <= config["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(GPU_INSTANCE_FAMILIES)


def test_ray_up_enables_token_auth_without_a_literal_token():
    config = read_yaml(RAY_UP)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        calls = ray_start_calls(config[key])
        assert calls, f"no `ray start` in {key}"
        for env, _ in calls:
            assert env.get("RAY_AUTH_MODE") == "token", f"{key}: ray start without token mode"
    # The launching machine's token file travels to the nodes; the file itself holds no secret.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_TOKEN=" not in RAY_UP.read_text()


def test_ray_up_dashboard_listens_on_loopback_only():
    config = read_yaml(RAY_UP)
    [(_, head_start)] = [call for call in ray_start_calls(config["head_start_ray_commands"])
                         if flag(call[1], "--head") is not None]
    assert flag(head_start, "--dashboard-host") in ("127.0.0.1", "localhost", "::1")
    assert "0.0.0.0" not in RAY_UP.read_text()


def test_ray_up_installs_this_package_on_every_node():
    config = read_yaml(RAY_UP)
    assert config["file_mounts"]["~/restorer"] == "."  # `ray up` runs from the repository root
    assert (REPO / "pyproject.toml").is_file()
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert "pip install --quiet -e ~/restorer" in config[key], key
    [worker_torch] = [c for c in config["worker_setup_commands"] if "torch" in c.split()]
    assert "--index-url" not in worker_torch  # the default index's Linux wheels are CUDA builds
    # Ray and Python must match between the head's and the workers' images.
    docker = config["docker"]
    assert docker["image"].rsplit("-", 1)[0] == docker["head_image"].rsplit("-", 1)[0]


# --- KubeRay: the operator's CRDs, made strict ---------------------------------------------

_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# The CRDs leave the top-level metadata open because the API server validates ObjectMeta
# itself; this is the part of ObjectMeta a manifest may set.
_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": _DNS_LABEL},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("int32")
def _is_int32(value: object) -> bool:
    return not isinstance(value, int) or -(2 ** 31) <= value < 2 ** 31


@_FORMATS.checks("int64")
def _is_int64(value: object) -> bool:
    return not isinstance(value, int) or -(2 ** 63) <= value < 2 ** 63


def _unique_list_map_keys(validator, key_defaults, instance, schema):
    """x-kubernetes-list-type: map -- no two items may share their key fields.

    ``key_defaults`` maps each key field to the default the API server fills in before it
    compares (``protocol: TCP`` for container ports).
    """
    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(item.get(name, default) for name, default in key_defaults.items())
            if key in seen:
                yield jsonschema.ValidationError(
                    f"duplicate entry for keys {list(key_defaults)}: {key}")
            seen.add(key)


_StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"listMapKeys": _unique_list_map_keys})


def strict_schema(node: Any) -> Any:
    """An OpenAPI v3 structural schema as strict JSON Schema.

    ``x-kubernetes-*`` extensions are dropped after translating the ones that constrain values
    (int-or-string, list types), ``nullable`` becomes a ``null`` type, and every object schema
    that names its properties rejects any other, because the API server prunes or, under strict
    field validation, refuses unknown fields.
    """
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = strict_schema(value)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    list_type = node.get("x-kubernetes-list-type")
    if list_type == "set":
        out["uniqueItems"] = True
    elif list_type == "map" and node.get("x-kubernetes-list-map-keys"):
        fields = node.get("items", {}).get("properties", {})
        out["listMapKeys"] = {name: fields.get(name, {}).get("default")
                              for name in node["x-kubernetes-list-map-keys"]}
    types = out.get("type", [])
    is_object = "object" in (types if isinstance(types, list) else [types]) or "properties" in out
    if (is_object and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def kuberay_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    # The operator's CustomResourceDefinitions, shared beside the checkout, not inside it.
    crd = read_yaml(shared_path("kuberay", CRD_FILES[kind]))
    group, version = api_version.split("/")
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, kind)
    [entry] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict_schema(entry["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = _OBJECT_META
    del schema["properties"]["status"]  # written by the operator, never by a manifest
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    _StrictValidator.check_schema(schema)
    return _StrictValidator(schema, format_checker=_FORMATS)


def validator_for(doc: dict) -> jsonschema.protocols.Validator:
    return kuberay_validator(doc["kind"], doc["apiVersion"])


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def head_container(doc: dict) -> dict:
    return cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]


def worker_container(doc: dict) -> dict:
    return cluster_spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def all_containers(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    pods = [g["template"]["spec"] for g in groups]
    return [c for pod in pods for c in pod.get("containers", []) + pod.get("initContainers", [])]


# A Kubernetes resource quantity: a decimal number with an SI or binary suffix or an exponent.
_QUANTITY = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:([KMGTPE]i|[numkMGTPE])|[eE]([+-]?\d+))?")
_SCALE = {"": 1, "n": Fraction(1, 10 ** 9), "u": Fraction(1, 10 ** 6), "m": Fraction(1, 1000),
          "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15, "E": 10 ** 18,
          "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60}


def quantity(value: object) -> Fraction:
    """The exact amount a Kubernetes quantity (``"500m"``, ``"16Gi"``, ``2``) stands for."""
    if isinstance(value, int) and not isinstance(value, bool):
        return Fraction(value)
    match = _QUANTITY.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix, exponent = match.groups()
    scale = Fraction(10) ** int(exponent) if exponent else Fraction(_SCALE[suffix or ""])
    return Fraction(number) * scale


def test_quantity_parser():
    assert quantity("500m") == Fraction(1, 2)
    assert quantity("16Gi") == 16 * 2 ** 30
    assert quantity("1e3") == quantity("1k") == 1000
    assert quantity(2) == 2
    for bad in ("16 GB", "1.5.0", "", 0.5, True, "Gi"):
        with pytest.raises(ValueError):
            quantity(bad)


@pytest.mark.parametrize("kind", list(KUBERAY_MANIFESTS))
def test_kuberay_manifest_validates_against_the_crd(kind):
    doc = read_yaml(KUBERAY_MANIFESTS[kind])
    assert doc["kind"] == kind
    assert error_report(validator_for(doc), doc) == ""


def _worker_group(doc: dict) -> dict:
    return cluster_spec(doc)["workerGroupSpecs"][0]


KUBERAY_BREAKAGES: dict[str, tuple[Callable[[dict], None], str]] = {
    "misspelled spec field": (
        lambda d: _rename(cluster_spec(d), "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
        "'enableInTreeAutoScaling' was unexpected"),
    "misspelled container field": (
        lambda d: _rename(head_container(d), "resources", "resource"),
        "'resource' was unexpected"),
    "misspelled authOptions field": (
        lambda d: _rename(cluster_spec(d)["authOptions"], "mode", "mod"), "'mod' was unexpected"),
    "misspelled metadata field": (
        lambda d: _rename(d["metadata"], "labels", "lables"), "'lables' was unexpected"),
    "auth mode outside the enum": (
        lambda d: cluster_spec(d)["authOptions"].update(mode="tokens"),
        "'tokens' is not one of"),
    "replica count as a string": (
        lambda d: _worker_group(d).update(maxReplicas="8"), "'8' is not of type 'integer'"),
    "replica count beyond int32": (
        lambda d: _worker_group(d).update(maxReplicas=2 ** 31), "is not a 'int32'"),
    "unquoted rayStartParams value": (
        lambda d: _worker_group(d)["rayStartParams"].update({"num-gpus": 1}),
        "1 is not of type 'string'"),
    "quantity with a space": (
        lambda d: worker_container(d)["resources"]["limits"].update(memory="28 GB"),
        "'28 GB' does not match"),
    "fractional quantity as a number": (
        lambda d: head_container(d)["resources"]["requests"].update(cpu=0.5),
        "0.5 is not valid under any of the given schemas"),
    "missing required field": (
        lambda d: _worker_group(d).pop("groupName"), "'groupName' is a required property"),
    "duplicate container port": (  # the API server defaults protocol to TCP, then compares
        lambda d: head_container(d)["ports"].append({**head_container(d)["ports"][0],
                                                     "name": "gcs-again", "protocol": "TCP"}),
        "duplicate entry for keys ['containerPort', 'protocol']: (6379, 'TCP')"),
    "status written by hand": (lambda d: d.update(status={}), "'status' was unexpected"),
}


@pytest.mark.parametrize("breakage", list(KUBERAY_BREAKAGES))
@pytest.mark.parametrize("kind", list(KUBERAY_MANIFESTS))
def test_kuberay_crd_rejects_a_broken_copy(kind, breakage):
    break_it, expected = KUBERAY_BREAKAGES[breakage]
    doc = fresh(KUBERAY_MANIFESTS[kind])
    break_it(doc)
    report = error_report(validator_for(doc), doc)
    assert report, f"{breakage}: the broken {kind} still validates"
    assert expected in report, report


def test_rayjob_crd_rejects_a_string_for_a_boolean():
    doc = fresh(KUBERAY_MANIFESTS["RayJob"])
    doc["spec"]["shutdownAfterJobFinishes"] = "true"
    assert "'true' is not of type 'boolean'" in error_report(validator_for(doc), doc)


@pytest.mark.parametrize("kind", list(KUBERAY_MANIFESTS))
def test_kuberay_manifest_rejects_duplicate_keys(kind):
    text = KUBERAY_MANIFESTS[kind].read_text()
    [line] = re.findall(r"^ *enableInTreeAutoscaling: true\n", text, flags=re.MULTILINE)
    doubled = text.replace(line, line + line.replace("true", "false"))
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key"):
        load_yaml(doubled)


@pytest.mark.parametrize("kind", list(KUBERAY_MANIFESTS))
def test_kuberay_head_has_no_gpu(kind):
    doc = read_yaml(KUBERAY_MANIFESTS[kind])
    head = cluster_spec(doc)["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    for container in head["template"]["spec"]["containers"]:
        for amounts in container.get("resources", {}).values():
            assert GPU not in amounts


@pytest.mark.parametrize("kind", list(KUBERAY_MANIFESTS))
def test_kuberay_gpu_workers_autoscale(kind):
    doc = read_yaml(KUBERAY_MANIFESTS[kind])
    spec = cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    assert "autoscalerOptions" in spec
    [group] = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0
    assert group["maxReplicas"] == 8
    assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    resources = worker_container(doc)["resources"]
    gpus = resources["limits"][GPU]
    assert isinstance(gpus, int) and gpus >= 1
    assert resources["requests"].get(GPU, gpus) == gpus  # extended resources: requests == limits
    assert group["rayStartParams"]["num-gpus"] == str(gpus)
    tolerations = group["template"]["spec"].get("tolerations", [])
    assert any(t.get("key") == GPU for t in tolerations)


@pytest.mark.parametrize("kind", list(KUBERAY_MANIFESTS))
def test_kuberay_resource_quantities_are_sound(kind):
    doc = read_yaml(KUBERAY_MANIFESTS[kind])
    blocks = [c["resources"] for c in all_containers(doc)]
    blocks.append(cluster_spec(doc)["autoscalerOptions"]["resources"])
    for resources in blocks:
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        for name, amount in {**requests, **limits}.items():
            assert quantity(amount) > 0, f"{name}: {amount!r}"
        for name in requests.keys() & limits.keys():
            assert quantity(requests[name]) <= quantity(limits[name]), name
        assert "memory" in limits, "a pod without a memory limit can starve its node"


@pytest.mark.parametrize("kind", list(KUBERAY_MANIFESTS))
def test_kuberay_token_auth_without_a_literal_token(kind):
    doc = read_yaml(KUBERAY_MANIFESTS[kind])
    auth = cluster_spec(doc)["authOptions"]
    assert auth["mode"] == "token"
    assert auth.get("secretName")
    for container in all_containers(doc):
        for env in container.get("env", []):
            assert not (env["name"].startswith("RAY_AUTH_TOKEN") and "value" in env)


@pytest.mark.parametrize("kind", list(KUBERAY_MANIFESTS))
def test_kuberay_dashboard_is_not_exposed(kind):
    head = cluster_spec(read_yaml(KUBERAY_MANIFESTS[kind]))["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)


@pytest.mark.parametrize("kind", list(KUBERAY_MANIFESTS))
def test_kuberay_images_match_ray_version(kind):
    doc = read_yaml(KUBERAY_MANIFESTS[kind])
    version = cluster_spec(doc)["rayVersion"]
    images = {c["image"] for c in all_containers(doc)}
    assert len(images) == 1, f"head and workers must run one image: {sorted(images)}"
    assert f"-ray{version}-" in images.pop()
    dockerfile = (KUBERAY_DIR / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{version}-" in dockerfile


def test_rayjob_runs_restorer_and_cleans_up():
    doc = read_yaml(KUBERAY_MANIFESTS["RayJob"])
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] in SUBMISSION_MODES
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["restorer", "run"]
    # The spec file must be on the head, where the driver runs.
    spec_dir = str(Path(words[2]).parent)
    mounts = {m["mountPath"] for m in head_container(doc).get("volumeMounts", [])}
    assert spec_dir in mounts


def test_rayjob_driver_takes_no_gpu():
    spec = read_yaml(KUBERAY_MANIFESTS["RayJob"])["spec"]
    assert spec["entrypointNumGpus"] == 0
    assert "GPU" not in json.loads(spec.get("entrypointResources", "{}"))
    # With no entrypoint resources at all, the Jobs API pins the driver to the (GPU-less) head.
    assert spec.get("entrypointNumCpus", 0) == 0


def test_rayjob_gives_a_stopped_job_time_to_drain():
    import yaml

    from restorer.launch.submit import submit

    spec = read_yaml(KUBERAY_MANIFESTS["RayJob"])["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    grace = int(env["RAY_JOB_STOP_WAIT_TIME_S"])
    assert grace == inspect.signature(submit).parameters["stop_grace_s"].default
    head = read_yaml(KUBERAY_MANIFESTS["RayJob"])["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["template"]["spec"]["terminationGracePeriodSeconds"] > grace
