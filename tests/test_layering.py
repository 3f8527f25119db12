"""The package's import graph stays one-way: no cycles, and the pure modules at the bottom
import nothing above them (so they can be tested, fuzzed and reused without sockets)."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).parent.parent / "ltcp"
# module -> the ltcp modules it may import at most
BOTTOM = {
    "ltcp.names": set(),
    "ltcp.lifecycle": set(),
    "ltcp.wheel": {"ltcp.histogram"},
    "ltcp.histogram": set(),
    "ltcp.config": {"ltcp.names", "ltcp.config.parse", "ltcp.config.yamlsafe"},
    "ltcp.config.parse": {"ltcp.names"},
    "ltcp.config.yamlsafe": set(),
    "ltcp.config.plan": set(),
    "ltcp.admin.snapshot": {"ltcp.histogram", "ltcp.wheel"},
    "ltcp.interpreter.fanout": set(),
    "ltcp.balancer.endpoint": {"ltcp.lifecycle", "ltcp.balancer.load", "ltcp.balancer.pick"},
    "ltcp.balancer.pick": {"ltcp.balancer.load"},
    "ltcp.balancer.load": set(),
    "ltcp.protocol.proxyproto": {"ltcp.names"},
    "ltcp.admin.httpd": {"ltcp.mailbox"},
    "ltcp.mailbox": set(),
    "ltcp.dataplane.accesslog": {"ltcp.names"},
    "ltcp.dataplane.heaptrim": set(),
    "ltcp.logs": set(),
    "ltcp.process.notify": set(),
    "ltcp.process.launch": set(),
}


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path):
    """The ltcp modules ``path`` imports."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("ltcp"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("ltcp"):  # "from . import tls" imports a module; "from .tls import x", one
                submodules = {f"{target}.{alias.name}" for alias in node.names} & GRAPH_NAMES
                found.update(submodules or {target})
    return found - {name}


GRAPH_NAMES = {module_name(path) for path in PACKAGE.rglob("*.py")}
GRAPH = {module_name(path): imports(path) & GRAPH_NAMES for path in PACKAGE.rglob("*.py")}


def test_there_are_no_import_cycles():
    visiting, done = set(), set()

    def visit(module, trail):
        if module in done:
            return
        assert module not in visiting, "import cycle: " + " -> ".join(trail + [module])
        visiting.add(module)
        for imported in sorted(GRAPH[module]):
            visit(imported, trail + [module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


# The folders, lowest first: a module imports from its own folder and the ones below it, never above
# (ltcp/ itself holds shared bottom modules and the entry points, which may import anything).
LEVELS = {"protocol": 0, "config": 0, "interpreter": 1, "balancer": 1, "dataplane": 2, "admin": 2, "process": 3}
# Entry points, and the worker's control channel: both stay in ltcp/ because they are named on the wire.
ENTRY_POINTS = {"ltcp", "ltcp.__main__", "ltcp.cli", "ltcp.worker", "ltcp.control"}
# The in-process mode (tests, embedding) sizes the admin server's share of descriptors: a lazy import, in one place.
ALLOWED_UPWARD = {("ltcp.dataplane.budget", "ltcp.admin.httpd")}


def plane(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LEVELS else None


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m not in ENTRY_POINTS))
def test_no_folder_imports_from_a_folder_above_it(module):
    level = LEVELS.get(plane(module), -1)
    upward = {imported for imported in GRAPH[module]
              if plane(imported) != plane(module) and LEVELS.get(plane(imported), -1) >= level
              and (module, imported) not in ALLOWED_UPWARD}
    assert not upward, upward


@pytest.mark.parametrize("module", sorted(BOTTOM))
def test_the_bottom_layer_stays_at_the_bottom(module):
    assert GRAPH[module] <= BOTTOM[module], GRAPH[module] - BOTTOM[module]


@pytest.mark.timeout(60)
def test_a_worker_loads_none_of_the_control_planes_libraries():
    """Workers receive parsed configurations and discovery answers: yaml, urllib3 and prometheus_client stay out."""
    probe = ("import sys, ltcp.worker; "
             "print(sorted(m for m in ('yaml', 'urllib3', 'prometheus_client', 'http.server') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
