"""The wheel carries everything the installed service reads at run time (Alembic migrations,
templates, static files), and `connector migrate` works from an installed wheel run anywhere.

The wheel is built offline, with this environment's setuptools (the test extras pin one that
needs nothing else), from a copy of the sources: a stale build/ directory in the checkout would
otherwise hand the wheel files that the package data no longer names.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from connector.db import migrate

from .conftest import ADMIN_PASSWORD

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "connector"
BUILD_INPUTS = ("pyproject.toml", "README.md")
SUBPROCESS_TIMEOUT_SECONDS = 120


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_SECONDS, **kwargs
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _package_files() -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(PACKAGE, source / "connector", ignore=shutil.ignore_patterns("__pycache__"))
    for name in BUILD_INPUTS:
        shutil.copy2(ROOT / name, source / name)
    dist = work / "dist"
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--quiet",
        "--wheel-dir",
        str(dist),
        str(source),
    )
    (built,) = dist.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def shipped(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if not name.endswith("/")}


def test_packaging_wheel_carries_the_migrations(shipped):
    versions = {
        path.relative_to(ROOT).as_posix()
        for path in (PACKAGE / "migrations" / "versions").glob("*.py")
    }
    assert versions, "no migration versions found in the source tree"
    expected = versions | {"connector/migrations/env.py", "connector/migrations/script.py.mako"}
    assert expected - shipped == set()


def test_packaging_wheel_carries_exactly_the_package(shipped):
    package_part = {name for name in shipped if not name.split("/")[0].endswith(".dist-info")}
    assert package_part == _package_files()
    assert "connector/web/admin/templates/page.html" in package_part


def test_packaging_installed_wheel_migrates_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    _run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--quiet",
        "--target",
        str(site),
        str(wheel),
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    settings = elsewhere / "settings.toml"
    # A relative SQLite path: the database lands in the working directory, not the checkout.
    settings.write_text(
        '[database]\nurl = "sqlite+aiosqlite:///connector.db"\n'
        f'[security]\nadmin_password = "{ADMIN_PASSWORD}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTOR_")}
    # Ahead of site-packages, where the checkout is installed in editable mode.
    env["PYTHONPATH"] = str(site)

    origin = _run(
        sys.executable,
        "-c",
        "import connector.db.migrate as m; print(m.MIGRATIONS_DIR)",
        cwd=elsewhere,
        env=env,
    )
    assert Path(origin.stdout.strip()) == site.resolve() / "connector" / "migrations"

    result = _run(
        sys.executable,
        "-m",
        "connector",
        "--config",
        str(settings),
        "migrate",
        cwd=elsewhere,
        env=env,
    )
    head = migrate.head_revision()
    assert f"Database migrated to revision {head}." in result.stdout
    with contextlib.closing(sqlite3.connect(elsewhere / "connector.db")) as connection:
        stored = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    assert stored == [(head,)]
