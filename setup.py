"""Which packages the distribution ships: found, not listed. Everything else about it is in pyproject.toml.

The import names are not the folder names (client/gradwatch is `gradwatch`, service/gradwatch_service is
`gradwatch_service`, and migrations/ ships inside it as `gradwatch_service.migrations`), and pyproject.toml's
`packages.find` cannot rename a folder. So the discovery lives here: a subpackage added under any of the three
folders ships without anyone remembering to list it (a hand-kept list once left out `gradwatch_service.api`).
"""

from setuptools import find_packages, setup

PACKAGE_FOLDERS = {
    "gradwatch": "client/gradwatch",
    "gradwatch_service": "service/gradwatch_service",
    "gradwatch_service.migrations": "migrations",
}


def discovered_packages() -> list[str]:
    """Each folder's package and every package below it, under its import name."""
    return [f"{name}.{sub}" if sub else name
            for name, folder in PACKAGE_FOLDERS.items()
            for sub in ["", *find_packages(folder)]]


setup(packages=discovered_packages(), package_dir=PACKAGE_FOLDERS)
