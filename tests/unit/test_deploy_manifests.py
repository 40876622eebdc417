"""deploy/ stays deployable: Kubernetes manifests against the API schema and our policy, the compose
file's wiring, the Dockerfile's shape and the image layout it relies on. Each check is also shown to
bite: a copy with one required thing removed must be reported."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.settings import Settings, SettingsError
from tests.support.deploy_checks import (
    DEPLOY_DIR,
    K8S_DIR,
    compose_problems,
    dockerfile_problems,
    load_compose,
    load_k8s,
    nginx_upstreams,
    policy_problems,
    schema_problems,
)

REPO_ROOT = DEPLOY_DIR.parent


@pytest.fixture(scope="module")
def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return load_k8s()


def _find(docs: list[tuple[str, dict[str, Any]]], kind: str, name: str) -> dict[str, Any]:
    for _, doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name}")


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = doc["spec"]["template"]["spec"]["containers"][0]
    return container


# ---------------------------------------------------------------------------------------------- k8s


def test_every_manifest_file_is_listed_in_the_kustomization() -> None:
    listed = set(yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_k8s_manifests_match_the_kubernetes_schema(k8s_docs: list[tuple[str, dict[str, Any]]]) -> None:
    kinds = sorted({doc["kind"] for _, doc in k8s_docs})
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Job", "Namespace",
         "PodDisruptionBudget", "Secret", "Service"]
    )
    assert schema_problems(k8s_docs) == []


def test_k8s_manifests_meet_the_fleet_policy(k8s_docs: list[tuple[str, dict[str, Any]]]) -> None:
    assert policy_problems(k8s_docs) == []


def test_schema_check_rejects_a_misspelt_field(k8s_docs: list[tuple[str, dict[str, Any]]]) -> None:
    docs = copy.deepcopy(k8s_docs)
    container = _container(_find(docs, "Deployment", "revkernel-gateway"))
    container["livenesProbe"] = container.pop("livenessProbe")
    problems = schema_problems(docs)
    assert len(problems) == 1 and "livenesProbe" in problems[0], problems


def test_schema_check_rejects_a_mistyped_field(k8s_docs: list[tuple[str, dict[str, Any]]]) -> None:
    docs = copy.deepcopy(k8s_docs)
    _find(docs, "HorizontalPodAutoscaler", "revkernel-gateway")["spec"]["maxReplicas"] = "ten"
    problems = schema_problems(docs)
    assert len(problems) == 1 and "maxReplicas" in problems[0], problems


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.pop("livenessProbe"), "livenessProbe missing"),
        (lambda c: c.pop("readinessProbe"), "readinessProbe missing"),
        (lambda c: c["readinessProbe"]["httpGet"].update(path="/healthz"), "readinessProbe path"),
        (lambda c: c["resources"]["requests"].pop("memory"), "resources.requests.memory missing"),
        (lambda c: c["resources"].pop("requests"), "resources.requests.cpu missing"),
        (lambda c: c.pop("image"), "has no image"),
        (lambda c: c.pop("envFrom"), "DATABASE_URL is not provided"),
        (lambda c: c.update(args=["gatewy"]), "do not name a process kind"),
        (lambda c: c.pop("volumeMounts"), "no writable /tmp volume"),
    ],
    ids=[
        "liveness", "readiness", "readiness-path", "memory-request", "requests", "image", "env", "args",
        "tmp",
    ],
)
def test_policy_check_reports_a_removed_requirement(
    k8s_docs: list[tuple[str, dict[str, Any]]], mutate: Any, expected: str
) -> None:
    for name in ("revkernel-gateway", "revkernel-reconciler", "revkernel-freezer"):
        docs = copy.deepcopy(k8s_docs)
        mutate(_container(_find(docs, "Deployment", name)))
        problems = policy_problems(docs)
        assert any(expected in p and name in p for p in problems), (name, problems)


def test_policy_check_reports_database_url_missing_from_the_secret(
    k8s_docs: list[tuple[str, dict[str, Any]]],
) -> None:
    docs = copy.deepcopy(k8s_docs)
    del _find(docs, "Secret", "revkernel-secrets")["stringData"]["DATABASE_URL"]
    problems = policy_problems(docs)
    for workload in ("Deployment/revkernel-gateway", "Deployment/revkernel-reconciler",
                     "Deployment/revkernel-freezer", "Job/revkernel-migrate"):
        assert f"{workload}: environment variable DATABASE_URL is not provided" in problems


def test_policy_check_reports_broken_wiring(k8s_docs: list[tuple[str, dict[str, Any]]]) -> None:
    docs = copy.deepcopy(k8s_docs)
    _find(docs, "HorizontalPodAutoscaler", "revkernel-gateway")["spec"]["scaleTargetRef"]["name"] = "nope"
    _find(docs, "Service", "revkernel-gateway")["spec"]["selector"] = {"app.kubernetes.io/name": "nope"}
    _find(docs, "PodDisruptionBudget", "revkernel-reconciler")["spec"]["selector"]["matchLabels"] = {"a": "b"}
    docs = [(n, d) for n, d in docs if d["kind"] != "Job"]
    problems = policy_problems(docs)
    assert "no HorizontalPodAutoscaler scales the gateway Deployment" in problems
    assert any(p.startswith("Service/revkernel-gateway: selector") for p in problems)
    assert any(p.startswith("PodDisruptionBudget/revkernel-reconciler: selector") for p in problems)
    assert "no migrate Job" in problems


def test_policy_check_reports_a_missing_process_kind(k8s_docs: list[tuple[str, dict[str, Any]]]) -> None:
    docs = [(n, d) for n, d in k8s_docs if d["metadata"]["name"] != "revkernel-freezer"]
    assert "no Deployment runs `revkernel freezer`" in policy_problems(docs)


# ------------------------------------------------------------------------------------------ compose


def test_compose_file_is_complete() -> None:
    doc = load_compose()
    assert compose_problems(doc) == []
    services = doc["services"]
    for name in ("postgres", "redis", "rabbitmq", "migrate", "gateway-1", "gateway-2", "proxy",
                 "reconciler", "freezer"):
        assert name in services
    upstreams = nginx_upstreams((DEPLOY_DIR / "nginx.conf").read_text())
    assert upstreams == {"gateway-1", "gateway-2"}
    # Redis is a cache: no persistence. Postgres is the truth: commits are synchronous.
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "no"
    assert redis_cmd[redis_cmd.index("--save") + 1] == ""
    assert "synchronous_commit=on" in services["postgres"]["command"]


def test_the_proxy_answers_its_own_refusals_with_the_json_error_contract() -> None:
    """nginx refuses a body over 256 KiB and maps an unreachable gateway itself: those answers carry
    SPEC §3's JSON body and error-code header, not nginx's HTML (checked once against a real nginx 1.22
    with curl: 413, 502 and 504 came back as below)."""
    text = (DEPLOY_DIR / "nginx.conf").read_text()
    pages = dict(re.findall(r"error_page ([\d ]+) (@\w+);", text))
    assert {status for statuses in pages for status in statuses.split()} == {"413", "502", "503", "504"}
    for location in pages.values():
        block = re.search(rf"location {location} {{(.*?)\n\s*}}", text, re.DOTALL).group(1)  # type: ignore[union-attr]
        code = re.search(r"add_header x-opsmantik-error-code (\w+) always;", block)
        assert code is not None and "default_type application/json;" in block, block
        body = json.loads(re.search(r"return \d+ '(.*)\\n';", block).group(1))  # type: ignore[union-attr]
        assert body["ok"] is False and body["error"] == code.group(1)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: s["gateway-1"].pop("image") and s["gateway-1"].pop("build"), "neither image nor build"),
        (lambda s: s["reconciler"].pop("command"), "no command"),
        (lambda s: s["freezer"]["environment"].pop("DATABASE_URL"), "DATABASE_URL is not set"),
        (lambda s: s["gateway-2"]["environment"].pop("CRON_SECRET_FILE"), "CRON_SECRET is not set"),
        (lambda s: s["redis"].pop("healthcheck"), "redis: data service without a healthcheck"),
        (lambda s: s["postgres"]["healthcheck"].pop("test"), "postgres: data service without a healthcheck"),
        (lambda s: s["rabbitmq"].pop("healthcheck"), "rabbitmq: data service without a healthcheck"),
        (lambda s: s["migrate"]["depends_on"].update(pg={"condition": "service_healthy"}), "'pg', which"),
        (lambda s: s["gateway-1"]["depends_on"].pop("migrate"), "does not wait for migrate"),
        (lambda s: s["freezer"].pop("restart"), "without a restart policy"),
        (lambda s: s["gateway-1"].update(secrets=["auth_jwt_secret"]), "reads secret 'cron_secret'"),
        (lambda s: s.pop("gateway-2"), "expected two gateway services"),
    ],
)
def test_compose_check_reports_a_removed_requirement(mutate: Any, expected: str) -> None:
    doc = copy.deepcopy(load_compose())
    mutate(doc["services"])
    problems = compose_problems(doc)
    assert any(expected in p for p in problems), problems


def test_compose_check_reports_an_undeclared_secret_and_a_missing_mount(tmp_path: Path) -> None:
    doc = copy.deepcopy(load_compose())
    del doc["secrets"]["cron_secret"]
    problems = compose_problems(doc, base_dir=tmp_path)
    assert any("secret 'cron_secret' is not declared" in p for p in problems)
    assert any("mounts ./nginx.conf, which does not exist" in p for p in problems)


# --------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_shape() -> None:
    assert dockerfile_problems((DEPLOY_DIR / "Dockerfile").read_text()) == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("USER 10001:10001", "USER root"), "final stage runs as root"),
        (lambda t: t.replace('ENTRYPOINT ["revkernel"]', 'ENTRYPOINT ["python"]'), "ENTRYPOINT"),
        (lambda t: re.sub(r"FROM \$\{PYTHON_IMAGE\} AS build.*?(?=FROM)", "", t, flags=re.S), "multi-stage"),
        (lambda t: t.replace("COMMIT_SHA=${COMMIT_SHA}", "COMMIT_SHA=x"), "COMMIT_SHA is not passed"),
        (lambda t: t.replace("python:3.11-slim", "python:3.12"), "python:3.11-slim"),
    ],
)
def test_dockerfile_check_bites(edit: Any, expected: str) -> None:
    text = edit((DEPLOY_DIR / "Dockerfile").read_text())
    assert any(expected in p for p in dockerfile_problems(text))


def test_image_layout_finds_sql_and_migrations(tmp_path: Path) -> None:
    """What the Dockerfile does, minus Docker: build the wheel, install it into a bare directory,
    copy migrations/ beside the installed `shared` package, and load both kinds of SQL from there."""
    dockerfile = (DEPLOY_DIR / "Dockerfile").read_text()
    assert "COPY migrations /opt/venv/lib/python3.11/site-packages/migrations" in dockerfile
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
         str(REPO_ROOT)],
        check=True, capture_output=True, timeout=120,
    )
    (wheel,) = wheels.glob("revenue_kernel-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "services/cli.py" in names and any(n.startswith("shared/sql/") for n in names)
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    (site / "migrations").mkdir()
    for sql in (REPO_ROOT / "migrations").glob("*.sql"):
        (site / "migrations" / sql.name).write_text(sql.read_text())
    probe = (
        "import shared.migrate as m, shared.queries as q;"
        "assert m.MIGRATIONS_DIR.parent.resolve() == __import__('pathlib').Path(m.__file__).parent.parent;"
        "print(len(m.load_migrations()), len(q._all_queries()), m.MIGRATIONS_DIR)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {probe}"],
        check=True, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    ).stdout.split()
    assert int(out[0]) == len(list((REPO_ROOT / "migrations").glob("*.sql")))
    assert int(out[1]) > 0
    assert out[2].startswith(str(site))


# ------------------------------------------------------------------------------------- *_FILE secrets


def test_settings_read_secrets_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "cron_secret"
    secret.write_text("from-a-file-0123456789\n")
    settings = Settings.from_env({"CRON_SECRET_FILE": str(secret)})
    assert settings.cron_secret == "from-a-file-0123456789"
    # The variable itself wins over its file.
    both = {"CRON_SECRET": "direct", "CRON_SECRET_FILE": str(secret)}
    assert Settings.from_env(both).cron_secret == "direct"
    with pytest.raises(SettingsError, match="AUTH_JWT_SECRET_FILE"):
        Settings.from_env({"AUTH_JWT_SECRET_FILE": str(tmp_path / "missing")})
