"""Offline checks of deploy/: the Kubernetes manifests (schema + our policy), the compose file and the
Dockerfile. Docker and a cluster are not available to the test suite, so these checks are what keeps the
deployment files true. Each function returns a list of human-readable problems (empty = fine)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

DEPLOY_DIR = Path(__file__).resolve().parent.parent.parent / "deploy"
K8S_DIR = DEPLOY_DIR / "k8s"
KUBERNETES_VERSION = "1.30"

# SPEC §12, every one of which a running process must be given (or may take from a `<NAME>_FILE`).
SPEC_SETTINGS = (
    "DATABASE_URL", "REDIS_URL", "AMQP_URL", "CRON_SECRET", "AUTH_JWT_SECRET", "COMMIT_SHA",
    "GIT_BRANCH", "IDEMPOTENCY_VERSION", "RATE_LIMIT_PER_MINUTE", "DEFAULT_MONTHLY_LIMIT",
    "PUBLISH_TIMEOUT_MS", "COMMAND_TIMEOUT_S", "TRUSTED_PROXIES", "AUTH_JWT_AUDIENCE", "AUTH_JWT_ISSUER",
    "RECONCILER_HTTP_PORT", "FREEZER_HTTP_PORT", "GATEWAY_HOST", "GATEWAY_PORT",
)
# What k8s pods must get from the ConfigMap/Secret (COMMIT_SHA/GIT_BRANCH come from the image's ENV).
K8S_REQUIRED_ENV = tuple(name for name in SPEC_SETTINGS if name not in ("COMMIT_SHA", "GIT_BRANCH"))
PROCESS_KINDS = {"gateway": 8080, "reconciler": 8081, "freezer": 8082}
DATA_SERVICES = ("postgres", "redis", "rabbitmq")
WORKLOAD_KINDS = ("Deployment", "Job")


# ---------------------------------------------------------------------------------------------- k8s


def load_k8s(directory: Path = K8S_DIR) -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every manifest the kustomization lists, in its order."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[tuple[str, dict[str, Any]]] = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((directory / name).read_text()):
            if doc is not None:
                docs.append((name, doc))
    return docs


def _ident(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('name')}"


def _pod_spec(doc: Mapping[str, Any]) -> dict[str, Any]:
    spec = ((doc.get("spec") or {}).get("template") or {}).get("spec")
    return spec if isinstance(spec, dict) else {}


def _pod_labels(doc: Mapping[str, Any]) -> dict[str, str]:
    meta = ((doc.get("spec") or {}).get("template") or {}).get("metadata") or {}
    return dict(meta.get("labels") or {})


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def schema_problems(
    docs: Iterable[tuple[str, dict[str, Any]]], version: str = KUBERNETES_VERSION
) -> list[str]:
    """Validate each document against the Kubernetes OpenAPI schema shipped in kubernetes-validate
    (strict: unknown fields are errors, so a misspelt key cannot pass silently)."""
    problems = []
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{name} {_ident(doc)}: schema: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name} {_ident(doc)}: no schema for {doc.get('apiVersion')} {doc.get('kind')}")
    return problems


def _env_sources(container: Mapping[str, Any], docs: list[dict[str, Any]]) -> tuple[set[str], list[str]]:
    """The variable names a container receives, and problems with the references it makes."""
    names = {e["name"] for e in container.get("env") or [] if "name" in e}
    problems = []
    by_ref = {(d["kind"], (d.get("metadata") or {}).get("name")): d for d in docs}
    for source in container.get("envFrom") or []:
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key not in source:
                continue
            ref = source[key].get("name")
            target = by_ref.get((kind, ref))
            if target is None:
                problems.append(f"envFrom names {kind} {ref!r}, which no manifest defines")
                continue
            names.update((target.get("data") or {}).keys())
            names.update((target.get("stringData") or {}).keys())
    return names, problems


def _probe_problems(container: Mapping[str, Any], kind: str, ports: set[Any]) -> list[str]:
    problems = []
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = (container.get(probe) or {}).get("httpGet")
        if not http:
            problems.append(f"{kind}: {probe} missing (SPEC §11: {path})")
            continue
        if http.get("path") != path:
            problems.append(f"{kind}: {probe} path is {http.get('path')!r}, expected {path}")
        if http.get("port") not in ports:
            problems.append(f"{kind}: {probe} port {http.get('port')!r} is not a declared container port")
    return problems


def _container_problems(
    container: Mapping[str, Any], label: str, docs: list[dict[str, Any]], *, long_running: bool
) -> list[str]:
    problems = []
    if not container.get("image"):
        problems.append(f"{label}: container {container.get('name')!r} has no image")
    resources = container.get("resources") or {}
    for field in ("cpu", "memory"):
        if field not in (resources.get("requests") or {}):
            problems.append(f"{label}: resources.requests.{field} missing")
    if "memory" not in (resources.get("limits") or {}):
        problems.append(f"{label}: resources.limits.memory missing")
    names, env_problems = _env_sources(container, docs)
    problems += [f"{label}: {p}" for p in env_problems]
    for var in K8S_REQUIRED_ENV:
        if var not in names:
            problems.append(f"{label}: environment variable {var} is not provided")
    args = container.get("args") or []
    if long_running:
        kind = args[0] if args else None
        if kind not in PROCESS_KINDS:
            problems.append(f"{label}: args {args!r} do not name a process kind {sorted(PROCESS_KINDS)}")
        else:
            ports = {p.get("containerPort") for p in container.get("ports") or []}
            names_ports = {p.get("name") for p in container.get("ports") or []}
            if PROCESS_KINDS[kind] not in ports:
                problems.append(f"{label}: {kind} serves on {PROCESS_KINDS[kind]}, not a container port")
            problems += [f"{label}: {p}" for p in _probe_problems(container, kind, ports | names_ports)]
    return problems


def policy_problems(docs_with_names: Iterable[tuple[str, dict[str, Any]]]) -> list[str]:
    """What the schema allows but the fleet needs: images, probes, resources, env, wiring."""
    docs = [d for _, d in docs_with_names]
    problems: list[str] = []
    deployments = {str(d["metadata"]["name"]): d for d in docs if d.get("kind") == "Deployment"}
    kinds_deployed = set()
    for doc in docs:
        if doc.get("kind") not in WORKLOAD_KINDS:
            continue
        pod = _pod_spec(doc)
        containers = pod.get("containers") or []
        if not containers:
            problems.append(f"{_ident(doc)}: no containers")
        if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
            problems.append(f"{_ident(doc)}: pod securityContext.runAsNonRoot is not true")
        volumes = {v.get("name") for v in pod.get("volumes") or []}
        for container in containers:
            long_running = doc["kind"] == "Deployment"
            problems += _container_problems(container, _ident(doc), docs, long_running=long_running)
            if (container.get("securityContext") or {}).get("readOnlyRootFilesystem"):
                mounts = {m.get("mountPath"): m.get("name") for m in container.get("volumeMounts") or []}
                if mounts.get("/tmp") not in volumes:
                    problems.append(f"{_ident(doc)}: read-only root file system, no writable /tmp volume")
            args = container.get("args") or []
            if long_running and args:
                kinds_deployed.add(args[0])
            if doc["kind"] == "Job" and args != ["migrate"]:
                problems.append(f"{_ident(doc)}: the Job must run `revkernel migrate`, runs {args!r}")
    for kind in PROCESS_KINDS:
        if kind not in kinds_deployed:
            problems.append(f"no Deployment runs `revkernel {kind}`")
    if not any(d.get("kind") == "Job" for d in docs):
        problems.append("no migrate Job")
    problems += _wiring_problems(docs, deployments)
    return problems


def _wiring_problems(docs: list[dict[str, Any]], deployments: dict[str, dict[str, Any]]) -> list[str]:
    problems = _autoscaling_problems(docs, deployments)
    for svc in (d for d in docs if d.get("kind") == "Service"):
        problems += _service_problems(svc, deployments)
    for dep in deployments.values():
        selector = ((dep.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not _selects(selector, _pod_labels(dep)):
            problems.append(f"{_ident(dep)}: selector does not match its own pod labels")
    return problems


def _autoscaling_problems(docs: list[dict[str, Any]], deployments: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    gateway_hpa = False
    for hpa in (d for d in docs if d.get("kind") == "HorizontalPodAutoscaler"):
        target = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
        dep = deployments.get(str(target.get("name")))
        if target.get("kind") != "Deployment" or dep is None:
            problems.append(f"{_ident(hpa)}: scaleTargetRef {target!r} names no Deployment")
            continue
        args = (_pod_spec(dep).get("containers") or [{}])[0].get("args") or []
        gateway_hpa = gateway_hpa or args[:1] == ["gateway"]
    if not gateway_hpa:
        problems.append("no HorizontalPodAutoscaler scales the gateway Deployment")
    pdbs = [d for d in docs if d.get("kind") == "PodDisruptionBudget"]
    if not pdbs:
        problems.append("no PodDisruptionBudget")
    for pdb in pdbs:
        selector = ((pdb.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not any(_selects(selector, _pod_labels(d)) for d in deployments.values()):
            problems.append(f"{_ident(pdb)}: selector {selector!r} matches no Deployment's pods")
    return problems


def _service_problems(svc: dict[str, Any], deployments: dict[str, dict[str, Any]]) -> list[str]:
    selector = (svc.get("spec") or {}).get("selector") or {}
    matched = [d for d in deployments.values() if _selects(selector, _pod_labels(d))]
    if not matched:
        return [f"{_ident(svc)}: selector {selector!r} matches no Deployment's pods"]
    container_ports: set[Any] = set()
    for dep in matched:
        for c in _pod_spec(dep).get("containers") or []:
            for p in c.get("ports") or []:
                container_ports.update((p.get("name"), p.get("containerPort")))
    return [
        f"{_ident(svc)}: targetPort {port.get('targetPort')!r} is no container port"
        for port in (svc.get("spec") or {}).get("ports") or []
        if port.get("targetPort") not in container_ports
    ]


# ------------------------------------------------------------------------------------------ compose


def load_compose(path: Path = DEPLOY_DIR / "docker-compose.yml") -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())  # PyYAML resolves the `<<:` merge keys compose uses
    assert isinstance(doc, dict)
    return doc


def _uses_our_image(service: Mapping[str, Any]) -> bool:
    build = service.get("build")
    return isinstance(build, dict) and str(build.get("dockerfile", "")).endswith("deploy/Dockerfile")


def _healthcheck_ok(service: Mapping[str, Any]) -> bool:
    check = service.get("healthcheck") or {}
    return bool(check.get("test")) and not check.get("disable")


def compose_problems(doc: Mapping[str, Any], base_dir: Path = DEPLOY_DIR) -> list[str]:
    problems: list[str] = []
    services: dict[str, Any] = doc.get("services") or {}
    declared_secrets = set((doc.get("secrets") or {}).keys())
    ours = {name for name, s in services.items() if _uses_our_image(s)}
    for name, svc in services.items():
        if not svc.get("image") and not svc.get("build"):
            problems.append(f"service {name}: neither image nor build")
        problems += _depends_problems(name, svc, services)
        for secret in svc.get("secrets") or []:
            secret_name = secret if isinstance(secret, str) else secret.get("source")
            if secret_name not in declared_secrets:
                problems.append(f"service {name}: secret {secret_name!r} is not declared")
        for volume in svc.get("volumes") or []:
            source = str(volume).split(":", 1)[0]
            if source.startswith(".") and not (base_dir / source).exists():
                problems.append(f"service {name}: mounts {source}, which does not exist")
        if name not in ours and name not in DATA_SERVICES and not svc.get("restart"):
            problems.append(f"service {name}: no restart policy")
    for name in DATA_SERVICES:
        if name not in services:
            problems.append(f"no {name} service")
        elif not _healthcheck_ok(services[name]):
            problems.append(f"service {name}: data service without a healthcheck")
        elif not services[name].get("restart"):
            problems.append(f"service {name}: no restart policy")
    problems += _fleet_service_problems(services, ours, base_dir)
    return problems


def _depends_problems(name: str, svc: Mapping[str, Any], services: Mapping[str, Any]) -> list[str]:
    problems = []
    depends = svc.get("depends_on") or {}
    targets = depends.items() if isinstance(depends, dict) else ((t, {}) for t in depends)
    for target, cond in targets:
        if target not in services:
            problems.append(f"service {name}: depends_on {target!r}, which is not a service")
            continue
        condition = (cond or {}).get("condition", "service_started")
        if condition == "service_healthy" and not _healthcheck_ok(services[target]):
            problems.append(f"service {name}: waits for {target} healthy, which has no healthcheck")
    return problems


def _fleet_service_problems(services: Mapping[str, Any], ours: set[str], base_dir: Path) -> list[str]:
    problems = []
    commands: dict[str, list[str]] = {}
    for name in sorted(ours):
        svc = services[name]
        command = svc.get("command")
        if not command:
            problems.append(f"service {name}: no command (which process kind?)")
            continue
        commands[name] = list(command)
        build = svc["build"]
        if not (base_dir / build.get("context", ".") / build["dockerfile"]).exists():
            problems.append(f"service {name}: build points at a missing Dockerfile")
        problems += _environment_problems(name, svc)
        kind = command[0]
        if kind != "migrate":
            if not svc.get("restart") or svc.get("restart") == "no":
                problems.append(f"service {name}: long-running process without a restart policy")
            if not _healthcheck_ok(svc):
                problems.append(f"service {name}: no healthcheck")
            depends = svc.get("depends_on") or {}
            cond = (depends.get("migrate") or {}).get("condition") if isinstance(depends, dict) else None
            if cond != "service_completed_successfully":
                problems.append(f"service {name}: does not wait for migrate to complete")
    kinds = sorted(c[0] for c in commands.values())
    if kinds.count("gateway") < 2:
        problems.append(f"expected two gateway services, found {kinds.count('gateway')}")
    for kind in ("migrate", "reconciler", "freezer"):
        if kind not in kinds:
            problems.append(f"no service runs `revkernel {kind}`")
    return problems


def _environment_problems(name: str, svc: Mapping[str, Any]) -> list[str]:
    env = svc.get("environment") or {}
    if not isinstance(env, dict):
        return [f"service {name}: environment must be a mapping"]
    problems = [
        f"service {name}: environment variable {var} is not set"
        for var in SPEC_SETTINGS
        if var not in env and f"{var}_FILE" not in env
    ]
    for var, value in env.items():
        if var.endswith("_FILE") and str(value).startswith("/run/secrets/"):
            secret = str(value).removeprefix("/run/secrets/")
            if secret not in (svc.get("secrets") or []):
                problems.append(f"service {name}: {var} reads secret {secret!r}, which it is not given")
    return problems


def nginx_upstreams(text: str) -> set[str]:
    """Hosts named by `server host:port` lines of the nginx config."""
    return set(re.findall(r"^\s*server\s+([A-Za-z0-9_.-]+):\d+", text, re.MULTILINE))


# --------------------------------------------------------------------------------------- Dockerfile


def dockerfile_problems(text: str) -> list[str]:
    problems = []
    lines = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    stages = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    if len(stages) < 2:
        problems.append("not a multi-stage build")
    args = {m.group(1): m.group(2) for line in lines if (m := re.match(r"ARG (\w+)(?:=(\S+))?", line))}
    if args.get("PYTHON_IMAGE") != "python:3.11-slim":
        problems.append("base image is not python:3.11-slim")
    final = lines[stages[-1]:] if stages else lines
    if not any(line.startswith("COPY --from=") for line in final):
        problems.append("final stage copies nothing from the build stage")
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("final stage runs as root")
    if not any(line == 'ENTRYPOINT ["revkernel"]' for line in final):
        problems.append('ENTRYPOINT is not ["revkernel"]')
    for var in ("COMMIT_SHA", "GIT_BRANCH"):
        if not any(re.match(rf"ARG {var}\b", line) for line in final):
            problems.append(f"build arg {var} is not declared in the final stage")
        if not any(line.startswith("ENV ") and f"{var}=${{{var}}}" in line for line in final):
            problems.append(f"build arg {var} is not passed to the environment")
    return problems
