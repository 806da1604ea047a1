"""Build the pipeline's container images through the Docker SDK: ``lora-moe pipeline images`` (``make images``).

The build context is assembled here as a tar (only what the Dockerfiles copy, plus ``images/build-inputs/``: the CA
bundle and local wheels the user hands in), so the build needs no BuildKit frontend, no ``.dockerignore`` and no
registry beyond the base image the user names. ``make_base_image`` makes that base image without any registry:
``debootstrap`` of Debian with its ``python3.11`` (root only), imported into the engine.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from components.images import LIGHT, TAG_PATTERN, TRAINER, default_registry, image_ref
from lora_moe_core.errors import UserError

DOCKERFILE = "images/Dockerfile"  # both images; the build arguments make the difference
IMAGES = (TRAINER, LIGHT)
DEFAULT_BASE = "python:3.11-slim-bookworm"
LOCAL_BASE = "lora-moe/python-base:bookworm"  # what make_base_image tags
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# what the Dockerfile COPYs; every other file of the checkout stays out of the context
_CONTEXT_FILES = (DOCKERFILE, "pyproject.toml", "README.md", "requirements.lock", "images/trainer-cuda.lock",
                  "images/install_locked.sh", "images/build-inputs/README.md")  # fmt: skip
_CONTEXT_PACKAGES = ("lora_moe_core", "components", "pipelines")
_BASE_PACKAGES = "python3,python3-venv,python3-distutils,ca-certificates"


@dataclass(frozen=True)
class ImageBuild:
    """What ``lora-moe pipeline images`` builds and how."""

    context: Path = Path(".")  # the repository root: Dockerfiles, locks and sources
    registry: str | None = None  # default: $LORA_MOE_IMAGE_REGISTRY or the placeholder
    tag: str = ""  # default: the commit, with "-dirty" when the tree has changes
    names: tuple[str, ...] = IMAGES
    base_image: str = DEFAULT_BASE
    index_url: str = ""  # a PyPI mirror; default pypi.org
    extra_index_url: str = ""
    torch_variant: str = "cuda"  # the trainer's torch: cuda for the cluster, cpu for local runs
    torch_index_url: str = TORCH_CPU_INDEX  # where CPU torch comes from; "" = only from ``wheels``
    ca_bundle: Path | None = None  # the CA bundle pip trusts in the build (TLS-inspecting proxy, private mirror)
    wheels: Path | None = None  # local wheels pip may take first (air-gapped builds)
    network: str = "host"  # the build's RUN steps: no bridge network needed
    push: bool = False

    def __post_init__(self) -> None:
        if self.torch_variant not in ("cuda", "cpu"):
            raise UserError(f"--torch_variant {self.torch_variant!r}: cuda or cpu")
        unknown = sorted(set(self.names) - set(IMAGES))
        if unknown or not self.names:
            raise UserError(f"unknown image(s) {', '.join(unknown) or '(none)'}; known: {', '.join(IMAGES)}")
        if self.tag and not TAG_PATTERN.fullmatch(self.tag):
            raise UserError(f"invalid image tag {self.tag!r}: letters, digits, '_', '.', '-', at most 128")
        for what, path in (("--ca_bundle", self.ca_bundle), ("--wheels", self.wheels)):
            if path is not None and not path.exists():
                raise UserError(f"{what} {path}: no such file or folder")
        missing = [f for f in _CONTEXT_FILES if not (self.context / f).is_file()]
        if missing:
            raise UserError(f"{self.context.resolve()} is not the repository root (missing {missing[0]})")

    def resolved_tag(self) -> str:
        return self.tag or commit_tag(self.context)

    def build_args(self, name: str) -> dict[str, str]:
        values = {"PYTHON_IMAGE": self.base_image, "GIT_SHA": self.resolved_tag(),
                  "EXTRA_INDEX_URL": self.extra_index_url, "TORCH_INDEX_URL": self.torch_index_url}  # fmt: skip
        if self.index_url:
            values["INDEX_URL"] = self.index_url
        # the CPU image is always the cpu build; a cpu trainer then shares every file layer with it
        values["TORCH_VARIANT"] = self.torch_variant if name == TRAINER else "cpu"
        values["IMAGE_NAME"] = name
        return values


@dataclass(frozen=True)
class BuiltImage:
    ref: str
    size_bytes: int
    seconds: float


def commit_tag(context: Path) -> str:
    """The short commit of ``context``; ``-dirty`` when tracked files differ from it (the tag must not lie)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(context), *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise UserError(f"cannot read the commit of {context} (not a git checkout?): give --tag")
        return done.stdout.strip()

    sha = git("rev-parse", "--short=12", "HEAD")
    return f"{sha}-dirty" if git("status", "--porcelain", "--untracked-files=no") else sha


def _context_members(build: ImageBuild) -> Iterator[tuple[Path, str]]:
    """(file on disk, name in the context) for everything the Dockerfiles copy."""
    for name in _CONTEXT_FILES:
        yield build.context / name, name
    for package in _CONTEXT_PACKAGES:
        for path in sorted((build.context / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                yield path, path.relative_to(build.context).as_posix()
    if build.ca_bundle is not None:
        yield build.ca_bundle, "images/build-inputs/ca.pem"
    if build.wheels is not None:
        for wheel in sorted(build.wheels.glob("*.whl")):
            yield wheel, f"images/build-inputs/wheels/{wheel.name}"


def write_context(build: ImageBuild, out: io.BufferedIOBase) -> list[str]:
    """Write the build context tar to ``out``; return the names it holds."""
    names = []
    with tarfile.open(fileobj=out, mode="w") as tar:
        for path, name in _context_members(build):
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755 if info.mode & 0o100 else 0o644
            with path.open("rb") as handle:
                tar.addfile(info, handle)
            names.append(name)
    return names


def _follow(chunks: Iterable[dict], log: Callable[[str], None], what: str) -> None:
    """Print a build's or push's output; one line with the engine's error when it fails."""
    for chunk in chunks:
        if "error" in chunk:
            raise UserError(f"{what} failed: {' '.join(str(chunk['error']).split())}")
        text = chunk.get("stream") or chunk.get("status")
        if text and text.strip():
            log(text.rstrip())


def build_image(client, build: ImageBuild, name: str, log: Callable[[str], None] = print) -> BuiltImage:
    """Build one image (``client``: a ``docker.DockerClient``) and tag it ``<registry>/<name>:<tag>``."""
    ref = image_ref(name, build.resolved_tag(), build.registry or default_registry())
    started = time.monotonic()
    with tempfile.TemporaryFile() as context:
        write_context(build, context)
        context.seek(0)
        chunks = client.api.build(fileobj=context, custom_context=True, dockerfile=DOCKERFILE, tag=ref,
                                  buildargs=build.build_args(name), rm=True, forcerm=True, pull=False,
                                  network_mode=build.network, decode=True)  # fmt: skip
        _follow(chunks, log, f"building {ref}")
    size = client.images.get(ref).attrs["Size"]
    return BuiltImage(ref, size, time.monotonic() - started)


def push_image(client, ref: str, log: Callable[[str], None] = print) -> None:
    repository, _, tag = ref.rpartition(":")
    _follow(client.images.push(repository, tag=tag, stream=True, decode=True), log, f"pushing {ref}")


def build_images(client, build: ImageBuild, log: Callable[[str], None] = print) -> list[BuiltImage]:
    """Build (and with ``push``, push) every image of ``build``, the trainer first."""
    built = []
    for name in build.names:
        image = build_image(client, build, name, log)
        if build.push:
            push_image(client, image.ref, log)
        built.append(image)
    return built


def make_base_image(
    client, ref: str = LOCAL_BASE, suite: str = "bookworm", mirror: str = "http://deb.debian.org/debian"
) -> BuiltImage:
    """A Debian base image with python3.11 and venv, made by ``debootstrap`` (root) and imported: no registry."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lora-moe-rootfs-") as folder:
        root = Path(folder) / "rootfs"
        command = ["debootstrap", "--variant=minbase", f"--include={_BASE_PACKAGES}", suite, str(root), mirror]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise UserError("debootstrap is not installed (Debian: apt-get install debootstrap)") from None
        if done.returncode != 0:
            raise UserError(f"debootstrap failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):  # the downloaded .debs: not image content
            for path in (root / cache).glob("*"):
                if path.is_file():
                    path.unlink()
        tar_path = Path(folder) / "rootfs.tar"
        with tarfile.open(tar_path, "w") as tar:
            tar.add(root, arcname=".")
        repository, _, tag = ref.rpartition(":")
        changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
                   'CMD ["python3"]']  # fmt: skip
        client.api.import_image_from_file(str(tar_path), repository=repository, tag=tag, changes=changes)
    return BuiltImage(ref, client.images.get(ref).attrs["Size"], time.monotonic() - started)
