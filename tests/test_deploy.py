"""deploy/: the images, compose and Kubernetes files say what the README says, and production settings pass
`check --deploy`; SIGTERM to a GPU cluster stops it taking jobs while the running one finishes.

Every YAML file is parsed and its required fields checked here; `docker compose config` (or the
`docker-compose` v1 client) and `kubectl kustomize` also build them when those clients are installed,
and those two checks say so when they are skipped.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
HEALTH = "/api/v1/health"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_docs(*folders: str) -> list[dict]:
    docs = []
    for folder in folders:
        kustomization = yaml.safe_load((K8S / folder / "kustomization.yaml").read_text())
        for resource in kustomization["resources"]:
            path = K8S / folder / resource
            if path.is_file():
                docs.extend(load_all(path))
    return docs


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_containers(deployment: dict) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def cluster_docs() -> list[dict]:
    return k8s_docs("base", "overlays/gpu")


@pytest.fixture(scope="module")
def config_map(cluster_docs) -> dict[str, str]:
    return by_kind(cluster_docs, "ConfigMap")["alkemy-config"]["data"]


# --- images ---------------------------------------------------------------------------------------------


def test_dockerfile_builds_cpu_and_gpu_images_from_the_pinned_requirements():
    text = (DEPLOY / "Dockerfile").read_text()
    targets = re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.M)
    assert {"cpu", "gpu"} <= set(targets)
    # the same torch version in both: the `torch==` line of gpu.txt, from the CPU index or the CUDA build
    torch_lines = [line for line in (ROOT / "requirements" / "gpu.txt").read_text().splitlines()
                   if re.match(r"^torch==", line)]  # fmt: skip
    assert len(torch_lines) == 1
    assert text.count("grep -E '^torch==' /tmp/requirements/gpu.txt") == 2
    assert "download.pytorch.org/whl/cpu" in text and "torch.version.cuda is None" in text
    assert "assert torch.version.cuda," in text
    assert text.count("pip install -r /tmp/requirements/gpu.txt") == 2  # exactly the pinned files
    for requirement in (ROOT / "requirements").glob("*.txt"):  # pinned: exact versions only
        for line in requirement.read_text().splitlines():
            if line.strip() and not line.startswith(("#", "-r")):
                assert "==" in line, f"{requirement.name}: {line} is not pinned"
    assert "collectstatic --noinput" in text
    for stage in ("cpu", "gpu"):  # every final image runs as the unprivileged user
        body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "USER 10001:10001" in body
    assert (DEPLOY / "Dockerfile.dockerignore").read_text().count(".venv") == 1


# --- compose ---------------------------------------------------------------------------------------------


def test_compose_brings_up_a_single_gpu_machine(compose):
    services = compose["services"]
    assert set(services) == {"db", "redis", "migrate", "fetch-models", "web", "worker-cpu", "worker-webhooks",
                             "worker-gpu"}  # fmt: skip
    assert services["db"]["image"].startswith("pgvector/pgvector:")
    for name in ("db", "redis", "web"):
        assert services[name]["healthcheck"]["test"], name
    assert services["web"]["healthcheck"]["test"] == ["CMD", "python", "deploy/healthcheck.py"]
    assert services["web"]["command"][:3] == ["gunicorn", "-c", "deploy/gunicorn.conf.py"]
    assert services["migrate"]["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert "fetch_models" in " ".join(services["fetch-models"]["command"])
    clusters = {name: services[name]["environment"].get("Q_CLUSTER_NAME") for name in services if "worker" in name}
    assert clusters == {"worker-cpu": "default", "worker-webhooks": "webhooks", "worker-gpu": "gpu"}

    gpu = services["worker-gpu"]
    assert gpu["build"]["target"] == "gpu" and gpu["image"].endswith(":gpu")
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["depends_on"]["fetch-models"]["condition"] == "service_completed_successfully"
    assert gpu["stop_grace_period"] == "15m"
    for name in ("web", "worker-cpu", "worker-webhooks", "worker-gpu"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        # models read-only everywhere but in fetch-models, which fills the volume
        assert "models:/models:ro" in services[name]["volumes"] and "media:/data/media" in services[name]["volumes"]
    assert services["fetch-models"]["volumes"] == ["models:/models"]
    assert set(compose["volumes"]) == {"pgdata", "redisdata", "media", "models"}

    env = compose["x-app-env"]
    assert env["REDIS_URL"].startswith("redis://redis:") and env["DATABASE_URL"].startswith("postgresql://")
    assert env["ALKEMY_HTTPS"] == "${ALKEMY_HTTPS:-1}" and env["ALLOWED_HOSTS"].startswith("localhost,")
    assert "?" in env["SECRET_KEY"]  # required: compose refuses to start without it


def test_compose_env_example_names_every_variable_compose_reads(compose):
    text = (DEPLOY / "compose.yaml").read_text()
    read = set(re.findall(r"\$\{([A-Z_0-9]+)", text))
    example = {line.split("=", 1)[0] for line in (DEPLOY / "env.example").read_text().splitlines()
               if line and not line.startswith("#")}  # fmt: skip
    optional = {"ALKEMY_IMAGE", "PGVECTOR_TAG", "REDIS_TAG", "ALKEMY_PORT", "LOG_LEVEL", "HF_ENDPOINT",
                "ALKEMY_ENCRYPTION_KEYS"}  # fmt: skip
    assert read - optional <= example, read - optional - example


def compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_the_file(tmp_path):
    client = compose_client()
    if client is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed: compose.yaml checked with PyYAML only")
    env_file = tmp_path / "deploy.env"
    env_file.write_text((DEPLOY / "env.example").read_text())
    result = subprocess.run(
        [*client, "--env-file", str(env_file), "-f", str(DEPLOY / "compose.yaml"), "config"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert rendered["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [
        "0"
    ]
    assert rendered["services"]["web"]["environment"]["ALLOWED_HOSTS"] == "localhost,cast.example.com"
    empty = tmp_path / "empty.env"
    empty.write_text("")
    without = {key: value for key, value in os.environ.items() if key not in ("SECRET_KEY", "POSTGRES_PASSWORD")}
    missing = subprocess.run(
        [*client, "--env-file", str(empty), "-f", str(DEPLOY / "compose.yaml"), "config"],
        capture_output=True, text=True, timeout=60, env=without,
    )  # fmt: skip
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr + missing.stdout


# --- Kubernetes ----------------------------------------------------------------------------------------------


def test_every_kubernetes_file_parses_and_has_its_required_fields(cluster_docs):
    for path in K8S.rglob("*.yaml"):
        for doc in load_all(path):
            assert {"apiVersion", "kind"} <= set(doc), path
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], path
    kinds = {doc["kind"] for doc in cluster_docs}
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Job", "Deployment", "Service",
            "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds  # fmt: skip
    deployments = by_kind(cluster_docs, "Deployment")
    assert set(deployments) == {"alkemy-web", "alkemy-worker-cpu", "alkemy-worker-webhooks", "alkemy-worker-gpu"}
    claims = set(by_kind(cluster_docs, "PersistentVolumeClaim"))
    secret_example = {doc["metadata"]["name"]: doc for doc in load_all(K8S / "secret.example.yaml")}
    for workload in [*deployments.values(), *by_kind(cluster_docs, "Job").values()]:
        template = workload["spec"]["template"]
        if workload["kind"] == "Deployment":
            assert workload["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in pod_containers(workload):
            name = f"{workload['metadata']['name']}/{container['name']}"
            assert container["image"].split(":")[0] == "alkemy-cast", name
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), name  # writable /tmp
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes, name
            refs = {next(iter(ref.values()))["name"] for ref in container.get("envFrom", [])}
            assert refs <= {"alkemy-config", "alkemy-secrets"} and refs, name
            for env in container.get("env", []):
                secret_ref = env.get("valueFrom", {}).get("secretKeyRef")
                if secret_ref:
                    assert secret_ref["key"] in secret_example[secret_ref["name"]]["stringData"], name
        for container in pod["containers"]:
            assert container["resources"]["requests"], workload["metadata"]["name"]
            models = [m for m in container["volumeMounts"] if m["name"] == "models"]
            if container["name"] != "fetch-models":  # the fetcher fills the volume, everyone else reads it
                assert all(m.get("readOnly") for m in models), workload["metadata"]["name"]
    # PDBs and the HPA point at Deployments that exist
    for pdb in by_kind(cluster_docs, "PodDisruptionBudget").values():
        assert any(pdb["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in deployments.values())  # fmt: skip
    [hpa] = by_kind(cluster_docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "alkemy-web" and hpa["spec"]["minReplicas"] >= 2
    service = by_kind(cluster_docs, "Service")["alkemy-web"]
    assert service["spec"]["selector"] == deployments["alkemy-web"]["spec"]["selector"]["matchLabels"]
    assert set(secret_example["alkemy-secrets"]["stringData"]) >= {"SECRET_KEY", "DATABASE_URL", "REDIS_URL"}


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_every_kubernetes_resource_is_valid_against_the_api_schemas(version):
    """Strict: an unknown or misspelt field (`readinesProbe`) is an error, not silently dropped."""
    import kubernetes_validate

    docs = k8s_docs("base", "overlays/gpu") + load_all(K8S / "secret.example.yaml")
    assert len(docs) > 10
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_web_probes_use_the_health_endpoint_with_an_allowed_host(cluster_docs, config_map):
    web = by_kind(cluster_docs, "Deployment")["alkemy-web"]
    [container] = web["spec"]["template"]["spec"]["containers"]
    allowed = config_map["ALLOWED_HOSTS"].split(",")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] == HEALTH and http["port"] == "http"
        assert {h["name"]: h["value"] for h in http["httpHeaders"]}["Host"] in allowed
    assert container["command"][:3] == ["gunicorn", "-c", "deploy/gunicorn.conf.py"]
    graceful = int(re.search(r"^graceful_timeout = (\d+)", (DEPLOY / "gunicorn.conf.py").read_text(), re.M)[1])
    assert web["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > graceful


def test_gpu_workers_get_one_gpu_read_only_weights_and_time_to_hand_back(cluster_docs, config_map):
    gpu = by_kind(cluster_docs, "Deployment")["alkemy-worker-gpu"]
    pod = gpu["spec"]["template"]["spec"]
    [worker] = pod["containers"]
    assert worker["image"] == "alkemy-cast:gpu"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "Q_CLUSTER_NAME", "value": "gpu"} in worker["env"]
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in worker["volumeMounts"]
    fetch = next(c for c in pod["initContainers"] if c["name"] == "fetch-models")
    assert "manage.py fetch_models" in " ".join(fetch["command"])
    assert {"name": "models", "mountPath": "/models"} in fetch["volumeMounts"]  # the init container writes
    assert pod["terminationGracePeriodSeconds"] >= 600
    assert gpu["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    job = by_kind(cluster_docs, "Job")["alkemy-fetch-models"]
    assert "fetch_models" in " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])
    migrate = by_kind(cluster_docs, "Job")["alkemy-migrate"]["spec"]["template"]["spec"]["containers"][0]
    assert migrate["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert config_map["ALKEMY_FACE_EMBEDDER"] == "arcface_antelopev2"


def test_kubectl_kustomize_builds_base_and_gpu_overlay():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests were checked with PyYAML only")
    for folder, deployments in (("base", 3), ("overlays/gpu", 4)):
        result = subprocess.run([kubectl, "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        assert sum(doc["kind"] == "Deployment" for doc in docs) == deployments
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "alkemy-cast", doc["metadata"]["name"]
        images = {c["image"] for doc in docs if doc["kind"] in ("Deployment", "Job") for c in pod_containers(doc)}
        assert images <= {"registry.example.com/alkemy-cast:cpu", "registry.example.com/alkemy-cast:gpu"}


# --- production settings ------------------------------------------------------------------------------------


def test_production_settings_from_the_deploy_files_pass_check_deploy(tmp_path, config_map):
    """The ConfigMap's settings, the Secret's keys (a real random SECRET_KEY): `check --deploy` has no warning."""
    secret = {doc["metadata"]["name"]: doc for doc in load_all(K8S / "secret.example.yaml")}["alkemy-secrets"]
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("ALKEMY_", "DJANGO_", "DEBUG", "SECRET_KEY", "ALLOWED_HOSTS"))}  # fmt: skip
    env.update(config_map)
    env.update({key: value for key, value in secret["stringData"].items() if value})
    env.update(SECRET_KEY=secrets.token_urlsafe(50), DJANGO_SETTINGS_MODULE="alkemy.settings",
               ALKEMY_DATA_DIR=str(tmp_path), ALKEMY_MEDIA_ROOT=str(tmp_path / "media"),
               ALKEMY_MODELS_DIR=str(tmp_path / "models"))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


# --- graceful shutdown of a GPU cluster -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sigterm_stops_a_gpu_cluster_taking_jobs_and_lets_the_running_one_finish(
    api_a, studio_a, settings, tiny_models_dir, media_root
):
    """What `docker stop` / a pod deletion does: SIGTERM to the qcluster process only. The job it runs
    finishes; the job it had already pulled from the broker is handed back to the queue, not started."""
    from django_q.models import OrmQ
    from django_q.signing import SignedPackage

    from alkemy.jobs import JobStatus
    from characters.services import character_create, reference_add
    from generation.models import GeneratedImage, GenerationJob
    from tests import photos
    from tests.qcluster import Cluster, wait_for

    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))

    def submit(**overrides):
        body = {"character": character.pk, "prompt": "walking in the rain", "width": 64, "height": 64, "steps": 3,
                "seed": 11, "num_images": 1, **overrides}  # fmt: skip
        response = api_a.post("/api/v1/generations", body, format="json")
        assert response.status_code == 202, response.json()
        return response.json()["id"]

    def job(job_id):
        return GenerationJob.objects.unscoped().get(pk=job_id)

    def pulled(job_id) -> bool:  # the cluster's pusher took the task from the broker (locked until retry)
        from django.utils import timezone

        return any(
            SignedPackage.loads(row.payload).get("name") == f"generation-{job_id}" and row.lock > timezone.now()
            for row in OrmQ.objects.all()
        )

    cluster = Cluster("gpu", ALKEMY_JOB_LEASE_SECONDS="5").start()
    try:
        running = submit(steps=8, num_images=1)
        wait_for(lambda: job(running).current_step > 0, timeout=300, what="the first job to start")
        waiting = submit()
        wait_for(lambda: pulled(waiting), timeout=60, what="the cluster to pull the second job")
        os.kill(cluster.process.pid, signal.SIGTERM)  # the qcluster process only, as docker and the kubelet do
        cluster.process.wait(300)
    finally:
        cluster.stop()
    log = "".join(cluster.log)
    first = job(running)
    assert first.status == JobStatus.SUCCEEDED, log[-3000:]
    assert GeneratedImage.objects.unscoped().filter(job_id=running).count() == 1
    second = job(waiting)
    assert second.status == JobStatus.QUEUED and second.attempt == 0 and not second.worker, log[-3000:]
    assert "handed back to the queue" in log
    assert not pulled(waiting)  # back in the broker, free for the next worker to take
    assert any(SignedPackage.loads(row.payload).get("name") == f"generation-{waiting}" for row in OrmQ.objects.all())
