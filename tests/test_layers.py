"""The package's layers point only down: a module imports only modules of lower rank."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "asyncjobs"

# Lower numbers are lower layers. The client is its own branch: it shares only the codec.
RANKS = {
    "codec": 0, "errors": 0,
    "models": 1,
    "protocol": 2, "config": 2,
    "rules": 2, "store": 3, "files": 3, "postgres": 4,
    "hub": 4, "tasks": 4,
    "queue": 5, "builtin": 5, "limits": 1, "cluster": 5,
    "worker": 6, "callbacks": 6,
    "web": 7,
    "app": 8, "processes": 8,
    "cli": 9, "__init__": 9, "__main__": 10,
}


def module_key(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported_modules(path: Path) -> set[str]:
    """First-level asyncjobs modules that ``path`` imports (relative or absolute)."""
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts)  # 1 for asyncjobs/x.py, 2 for asyncjobs/web/x.py
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("asyncjobs"):
                rest = node.module.split(".")[1:]
                found.add(rest[0] if rest else "__init__")
            elif node.level == depth:  # relative to the package root
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("asyncjobs."):
                    found.add(alias.name.split(".")[1])
    return found


def test_every_module_has_a_rank():
    """Each module of the package is placed in a layer."""
    keys = {module_key(p) for p in PACKAGE.rglob("*.py")}
    assert keys <= set(RANKS) | {"client"}, keys - set(RANKS)


def test_imports_point_down():
    """No module imports a module of its own or a higher layer (a package's own parts aside)."""
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        key = module_key(path)
        if key == "client":
            continue
        for target in imported_modules(path) - {key}:
            if target == "client" and key in ("cli", "__init__"):
                continue
            if RANKS.get(target, 99) >= RANKS[key]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not wrong, wrong


def test_client_imports_only_the_codec():
    """The client never imports server modules: it speaks the protocol, not the internals."""
    client = PACKAGE / "client"
    if not client.exists():
        return
    for path in client.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                names = [node.module] if node.module else [alias.name for alias in node.names]
                assert names == ["codec"], f"{path.name} imports {names} from the server package"
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("asyncjobs."):
                assert node.module.startswith(("asyncjobs.client", "asyncjobs.codec")), f"{path.name}: {node.module}"


def test_importing_the_client_loads_no_server_module():
    """`import asyncjobs.client` does not load the store, queue, workers or web layer."""
    import subprocess
    import sys

    code = ("import sys, asyncjobs.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['asyncjobs', 'app'], ['asyncjobs', 'store'],"
            " ['asyncjobs', 'queue'], ['asyncjobs', 'worker'], ['asyncjobs', 'web'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=PACKAGE.parent, check=True)
    assert out.stdout.strip() == "[]", out.stdout
