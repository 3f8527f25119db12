"""Build dist/ltcp.pyz: ltcp and its pure-Python dependencies in one file for minimal hosts.

    python scripts/build_pyz.py [--output dist/ltcp.pyz]

Run it where ltcp's dependencies are installed (the venv of the README).  The
archive holds the ltcp package, pyyaml (its pure-Python loader: a compiled
module cannot be imported from a zip, and pyyaml falls back by itself),
urllib3, prometheus_client and dnspython, with each one's license and
metadata.  On the target host it needs nothing but Python 3.10 or later:

    python3 ltcp.pyz cfg.yaml
    python3 -I -S ltcp.pyz --check cfg.yaml   # proves nothing outside the file is used
"""

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
import zipapp

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(os.path.dirname(HERE), "ltcp")
# distribution -> the top-level packages it installs that ltcp imports
DEPENDENCIES = {"PyYAML": ["yaml"], "urllib3": ["urllib3"], "prometheus_client": ["prometheus_client"],
                "dnspython": ["dns"]}
COMPILED = (".so", ".pyd", ".dylib")
MAIN = "import sys\nfrom ltcp.cli import main\nsys.exit(main())\n"


def _ignore(directory, names):
    """Leave out byte code and compiled modules (a zip cannot load those)."""
    return [name for name in names if name == "__pycache__" or name.endswith(COMPILED)]


def _copy_package(name, into):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"build_pyz: {name} is not installed here (pip install -e .)")
    shutil.copytree(list(spec.submodule_search_locations)[0], os.path.join(into, name), ignore=_ignore)


def _copy_metadata(distribution, into):
    """The distribution's metadata and license files, so the archive says what it contains."""
    dist = importlib.metadata.distribution(distribution)
    for file in dist.files or ():
        parts = file.parts
        if parts and parts[0].endswith(".dist-info") and not str(file).endswith(("RECORD", "INSTALLER")):
            target = os.path.join(into, *parts)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(file.locate(), target)


def build(output):
    with tempfile.TemporaryDirectory(prefix="ltcp-pyz-") as staging:
        shutil.copytree(SOURCE, os.path.join(staging, "ltcp"), ignore=_ignore)
        for distribution, packages in DEPENDENCIES.items():
            for package in packages:
                _copy_package(package, staging)
            _copy_metadata(distribution, staging)
        with open(os.path.join(staging, "__main__.py"), "w") as f:
            f.write(MAIN)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        zipapp.create_archive(staging, output, interpreter="/usr/bin/env python3", compressed=True)
    return output


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(HERE), "dist", "ltcp.pyz"))
    args = parser.parse_args()
    path = build(args.output)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


if __name__ == "__main__":
    sys.exit(main())
