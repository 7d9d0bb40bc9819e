"""docker-compose.yml and Dockerfile.gpu, checked statically (no Docker engine in the test run)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from .service_testlib import REPO

# The commands the README documents; compose must run exactly these.
README_COMMANDS = {
    "api": ["dreamdata", "api", "--host", "0.0.0.0"],
    "worker": ["dreamdata", "worker"],
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_services_and_commands(compose):
    services = compose["services"]
    assert {"redis", "api", "worker"} <= set(services)
    for name, command in README_COMMANDS.items():
        assert services[name]["command"] == command, name


def test_redis_is_healthchecked_and_awaited(compose):
    services = compose["services"]
    assert "redis-cli" in " ".join(services["redis"]["healthcheck"]["test"])
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_worker_reserves_a_gpu_and_api_does_not(compose):
    services = compose["services"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in services["api"]


def test_gpu_worker_batches_concurrent_jobs(compose):
    from worker.settings import Settings

    env = compose["services"]["worker"]["environment"]
    settings = Settings(**{k.removeprefix("DREAMDATA_").lower(): v for k, v in env.items()
                           if k.startswith("DREAMDATA_") and v and not v.startswith("$")})
    assert settings.pool == "threads" and settings.concurrency > 1 and settings.batching


def test_api_and_worker_share_the_data_volume(compose):
    services = compose["services"]
    mounts = {name: services[name]["volumes"] for name in ("api", "worker")}
    assert mounts["api"] == mounts["worker"]
    assert mounts["api"][0] == "data:/data"
    assert "data" in compose["volumes"]
    for name in ("api", "worker"):
        assert services[name]["environment"]["DREAMDATA_DATA_DIR"] == "/data"


def test_api_is_published_on_loopback_only(compose):
    api = compose["services"]["api"]
    assert all(p.startswith("127.0.0.1:") for p in api["ports"])
    assert api["environment"]["DREAMDATA_ALLOW_PUBLIC"] == "1"  # binds 0.0.0.0 inside the container


def test_api_and_worker_run_under_an_init_process(compose):
    """A Python PID 1 ignores SIGTERM until its handlers are installed (the worker loads its model first)."""
    assert compose["services"]["api"]["init"] is True and compose["services"]["worker"]["init"] is True


def test_flower_is_optional(compose):
    assert compose["services"]["flower"]["profiles"] == ["monitor"]


def test_dockerfile_builds_the_cuda_image():
    text = (REPO / "Dockerfile.gpu").read_text()
    torch_pin = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                     if d.startswith("torch=="))
    # CUDA 13: PyPI's build of the pinned torch, the one the tests run on (a 12.x image with a cu12x index works
    # only if PyTorch publishes the pinned version for it)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.\d+\.\d+-(cudnn-)?runtime-ubuntu22\.04$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu13\d$", text, re.M)
    vision_pin = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                      if d.startswith("torchvision=="))
    assert f"ARG TORCHVISION_VERSION={vision_pin.split('==')[1]}" in text
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.M)
    assert "python3.11" in text
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in text
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+$", text, re.M)
    assert 'pip install "torch==${TORCH_VERSION}"' in text and '--index-url "${TORCH_INDEX}"' in text
    assert re.search(r"^COPY checkpoints/ ", text, re.M)
    assert "DREAMDATA_CHECKPOINT=/app/checkpoints/cifar10" in text
    assert re.search(r"^USER (?!root)", text, re.M)
    # torch.compile on CUDA: Triton compiles its launcher with a C compiler against Python's headers
    assert re.search(r"apt-get install [^\n]*\bgcc\b", text) and "python3.11-dev" in text


def test_the_readme_names_the_pinned_torch_and_torchvision():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    readme = (REPO / "README.md").read_text()
    for name in ("torch", "torchvision"):
        pin = next(d for d in deps if d.startswith(f"{name}=="))
        assert f"`{pin}`" in readme, pin  # where the README says what pyproject pins
        assert all(m == pin for m in re.findall(rf"\b{name}==[0-9.]+", readme)), pin  # and nowhere another


def test_compose_passes_the_cuda_build_args_only_when_set(compose):
    # README: TORCH_INDEX and CUDA_IMAGE pick another CUDA build through `docker compose up --build`; a bare
    # name passes the environment's value if set, and otherwise leaves Dockerfile.gpu's default
    dockerfile = (REPO / "Dockerfile.gpu").read_text()
    for service in ("api", "worker"):
        build = compose["services"][service]["build"]
        assert build["dockerfile"] == "Dockerfile.gpu"
        assert sorted(build["args"]) == ["CUDA_IMAGE", "TORCH_INDEX"]
    for arg in ("CUDA_IMAGE", "TORCH_INDEX"):
        assert re.search(rf"^ARG {arg}=\S", dockerfile, re.M)


def test_dockerignore_keeps_local_state_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs", "data"} <= set(ignored)
    assert "checkpoints" not in ignored


def test_evaluations_are_off_unless_a_data_set_is_named(compose):
    """The data set is read-only under /datasets in both containers; DREAMDATA_EVAL_DATA unset is an empty
    value there, which must mean "evaluations off", not the current folder."""
    from worker.settings import Settings

    for name in ("api", "worker"):
        service = compose["services"][name]
        assert "${DREAMDATA_DATASETS:-./datasets}:/datasets:ro" in service["volumes"], name
        assert service["environment"]["DREAMDATA_EVAL_DATA"] == "${DREAMDATA_EVAL_DATA:-}", name
    assert Settings(eval_data="").eval_data is None
    assert Settings(eval_data="/datasets/cifar10-jpeg.tar.gz").eval_data is not None


def test_worker_is_healthchecked_by_its_own_ping(compose):
    check = compose["services"]["worker"]["healthcheck"]
    assert check["test"] == ["CMD", "python", "-m", "worker.healthcheck"]
    assert _seconds(check["timeout"]) > 3  # the ping's own wait (worker.healthcheck --timeout)
    assert _seconds(check["start_period"]) >= 60  # the model loads before the worker answers


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)s", duration)
    assert m, duration
    return float(m[1])


def _copied_before_install(text: str) -> list[str]:
    """The sources of the Dockerfile's COPY lines above its ``RUN pip install .``: what the wheel is built from."""
    copies = []
    for line in text[:text.index("RUN pip install .")].splitlines():
        if line.startswith("COPY "):
            copies += line.split()[1:-1]
    return copies


def test_a_wheel_built_from_what_the_image_copies_installs_and_finds_the_shipped_checkpoint(tmp_path):
    """``pip install .`` (the image's, or anyone's without -e): no checkout beside the installed source, so the
    wheel must carry the checkpoint (pyproject's data-files) and the service find it where it was installed.
    Built from exactly the files the Dockerfile copies before its install, in a fresh environment."""
    import shutil
    import subprocess
    import sys
    import sysconfig

    src = tmp_path / "src"
    src.mkdir()
    for name in _copied_before_install((REPO / "Dockerfile.gpu").read_text()):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name.rstrip("/"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=240)
    wheel, = (tmp_path / "dist").glob("dreamdata-*.whl")

    env_dir = tmp_path / "env"  # a fresh environment that borrows this one's packages (torch ...), not its dreamdata
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # a path, not a site dir: no editable hook
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=240)
    found = subprocess.run([python, "-c", "import diffusion, diffusion.spec as s; "
                            "print(diffusion.__file__); print(s.SHIPPED_CHECKPOINT)"],
                           cwd=tmp_path, check=True, capture_output=True, text=True).stdout.split()
    assert found[0].startswith(str(site))  # the wheel's copy of the source, not this checkout
    installed = Path(found[1])
    assert installed.is_relative_to(env_dir)
    assert installed.parts[-4:] == ("share", "dreamdata", "checkpoints", "cifar10")
    for name in ("config.json", "model.safetensors"):
        assert (installed / name).read_bytes() == (REPO / "checkpoints" / "cifar10" / name).read_bytes()


def test_the_shipped_checkpoint_is_the_checkouts_before_an_installed_one(tmp_path):
    from diffusion.spec import SHIPPED_CHECKPOINT, shipped_checkpoint

    assert SHIPPED_CHECKPOINT == REPO / "checkpoints" / "cifar10"
    installed = tmp_path / "share" / "dreamdata" / "checkpoints" / "cifar10"
    installed.mkdir(parents=True)
    (installed / "config.json").write_text("{}")
    source = tmp_path / "site-packages"
    assert shipped_checkpoint(source, lambda: installed) == installed
    assert shipped_checkpoint(source, lambda: None) == source / "checkpoints" / "cifar10"  # reported as missing
    (source / "checkpoints" / "cifar10").mkdir(parents=True)
    (source / "checkpoints" / "cifar10" / "config.json").write_text("{}")
    assert shipped_checkpoint(source, lambda: installed) == source / "checkpoints" / "cifar10"
