"""The probe image, built here from source: no registry, no pull.

The image is a busybox-static root filesystem plus the project's static C
prober (``bottle/bottle-probe.c``) at ``/usr/local/bin/bottle-probe``,
imported with ``docker import``.  Its tag is a hash of the prober's source
and of this recipe, so a changed prober gets a new image and an unchanged one
is reused as it is.  Building needs ``gcc`` with a static C library and
Debian's ``busybox-static``; using a built image needs neither.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from bottle.errors import BottleError, CommandFailed

log = logging.getLogger(__name__)

IMAGE_REPOSITORY = "bottle-probe"
PROBER_IN_IMAGE = "/usr/local/bin/bottle-probe"
PROBER_SOURCE = Path(__file__).resolve().parent / "bottle-probe.c"

#: Bump when the layout of the image changes, so that its tag changes too.
RECIPE_VERSION = "1"

_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
_GROUP = "root:x:0:\nnogroup:x:65534:\n"
_PT_INTERP = 3


class ImageBuildError(BottleError):
    """The probe image could not be built; ``problem`` says what is missing."""

    def __init__(self, tag: str, problem: str) -> None:
        super().__init__(tag, problem)
        self.tag = tag
        self.problem = problem

    def __str__(self) -> str:
        return f"cannot build image {self.tag}: {self.problem}"


def prober_source() -> Path:
    """The prober's C source: ``$BOTTLE_PROBER_SOURCE``, else the repository's."""
    return Path(os.environ.get("BOTTLE_PROBER_SOURCE") or PROBER_SOURCE)


def image_tag(source: Path | None = None) -> str:
    """``bottle-probe:<hash>`` for the given prober source."""
    path = source or prober_source()
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ImageBuildError(
            f"{IMAGE_REPOSITORY}:?",
            f"the prober source {path} is missing; set BOTTLE_PROBER_SOURCE to "
            "the package's bottle/bottle-probe.c",
        ) from None
    digest = hashlib.sha256(text + b"\0recipe " + RECIPE_VERSION.encode())
    return f"{IMAGE_REPOSITORY}:{digest.hexdigest()[:12]}"


def find_busybox() -> Path | None:
    """A statically linked busybox on this host, or None."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")):
        if candidate and Path(candidate).is_file() and is_static_elf(Path(candidate)):
            return Path(candidate)
    return None


def is_static_elf(path: Path) -> bool:
    """Whether ``path`` is a 64-bit little-endian ELF without an interpreter."""
    with path.open("rb") as stream:
        header = stream.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        phoff = struct.unpack_from("<Q", header, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        stream.seek(phoff)
        table = stream.read(phentsize * phnum)
    for index in range(phnum):
        (kind,) = struct.unpack_from("<I", table, index * phentsize)
        if kind == _PT_INTERP:
            return False
    return True


def static_libc_present() -> bool:
    """Whether ``gcc -static`` can find a C library to link against."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return False
    found = subprocess.run(
        [gcc, "-print-file-name=libc.a"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return os.path.isabs(found) and Path(found).is_file()


def build_prober(destination: Path, source: Path | None = None) -> Path:
    """Compile the static prober to ``destination`` (reused if already there)."""
    path = source or prober_source()
    if destination.is_file():
        return destination
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ImageBuildError(
            image_tag(path), "`gcc` is not installed (Debian: apt-get install gcc)"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as scratch:
        output = Path(scratch) / "bottle-probe"
        argv = [gcc, "-static", "-O2", "-Wall", "-o", str(output), str(path)]
        log.info("compiling the prober: %s", " ".join(argv))
        completed = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=120
        )
        if completed.returncode != 0:
            raise CommandFailed(argv, completed.returncode, completed.stderr)
        os.replace(output, destination)
    return destination


def ensure_image(client: Any, cache_dir: Path) -> str:
    """The probe image's tag, building and importing it first if missing.

    ``client`` is a ``docker.DockerClient``.  Never pulls: an image that is
    not here is built from the prober's source and a local busybox-static.
    """
    import docker.errors

    tag = image_tag()
    try:
        client.images.get(tag)
        log.debug("probe image %s is present", tag)
        return tag
    except docker.errors.ImageNotFound:
        pass

    busybox = find_busybox()
    if busybox is None:
        raise ImageBuildError(
            tag,
            "no static busybox here (Debian: apt-get install busybox-static)",
        )
    binary = build_prober(cache_dir / f"bottle-probe-{tag.split(':')[1]}")
    data = rootfs_tar(busybox, binary)
    repository, _, version = tag.partition(":")
    log.info("importing %s (%d bytes of root filesystem)", tag, len(data))
    client.api.import_image_from_data(
        data, repository=repository, tag=version, changes=['CMD ["/bin/sh"]']
    )
    client.images.get(tag)
    return tag


def prober_binary(cache_dir: Path) -> Path:
    """The compiled prober for the current source, building it if needed."""
    tag = image_tag()
    return build_prober(cache_dir / f"bottle-probe-{tag.split(':')[1]}")


def rootfs_tar(busybox: Path, prober: Path) -> bytes:
    """A tar of the probe image's root filesystem, built in memory."""
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory, mode in (
            ("bin", 0o755),
            ("etc", 0o755),
            ("root", 0o700),
            ("tmp", 0o1777),
            ("usr", 0o755),
            ("usr/local", 0o755),
            ("usr/local/bin", 0o755),
        ):
            _add_directory(tar, directory, mode)
        _add_file(tar, "bin/busybox", busybox.read_bytes(), 0o755)
        for applet in applets:
            if applet != "busybox":
                _add_symlink(tar, f"bin/{applet}", "busybox")
        _add_file(tar, PROBER_IN_IMAGE.lstrip("/"), prober.read_bytes(), 0o755)
        _add_file(tar, "etc/passwd", _PASSWD.encode(), 0o644)
        _add_file(tar, "etc/group", _GROUP.encode(), 0o644)
    return buffer.getvalue()


def prober_tar(prober: Path) -> bytes:
    """A tar holding only the prober at its in-image path, to copy elsewhere."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add_file(tar, PROBER_IN_IMAGE.lstrip("/"), prober.read_bytes(), 0o755)
    return buffer.getvalue()


def _add_directory(tar: tarfile.TarFile, name: str, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _add_symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    tar.addfile(info)
