"""The layering of the four top-level packages (issue 18), from the source with `ast`, so lazy
imports inside functions count too (scripts/import_graph.py builds the graph; run it to see it).

    ground    cachefs/ (errors, names, config, gRPC auth, HTTP server base, the cluster's
              contracts in cachefs.contracts, the client layers): nothing of csi/, master/,
              storage_server/; cachefs.remotes.haystack may use master.client and
              storage_server.client only
    master/   cachefs/ only (never storage_server/)
    storage_server/   cachefs/ and master.client (it registers and heartbeats)
    top       the CLI (cachefs.cli, and cachefs.fuse.helper: `mount.cachefs`) and the CSI
              plugin (csi/): anything

and no module import cycle anywhere.
"""

from __future__ import annotations

import pytest

from scripts.import_graph import cycles, module_graph, package_of

SERVERS = ("csi", "master", "storage_server")
HAYSTACK_MAY_USE = {"master.client", "storage_server.client"}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return module_graph()


def _is_cli(module: str) -> bool:
    """The CLI, and `mount.cachefs` (cachefs.fuse.helper: the same CLI, as mount(8) runs it)."""
    return module in ("cachefs.cli", "cachefs.fuse.helper") or module.startswith("cachefs.cli.")


def _edges(graph: dict[str, set[str]], source: str) -> list[tuple[str, str]]:
    return sorted((m, t) for m, targets in graph.items() if package_of(m) == source
                  for t in targets)


def test_the_walk_sees_imports_inside_functions(graph: dict[str, set[str]]) -> None:
    assert "storage_server.server" in graph["cachefs.cli.storage_cmd"]  # imported in a function
    assert "cachefs.errors" in graph["storage_server.store"]


def test_no_module_import_cycle(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_ground_imports_no_server_package(graph: dict[str, set[str]]) -> None:
    wrong = [(m, t) for m, t in _edges(graph, "cachefs")
             if not _is_cli(m) and m != "cachefs.remotes.haystack" and package_of(t) in SERVERS]
    assert wrong == []


def test_haystack_remote_uses_the_client_apis_only(graph: dict[str, set[str]]) -> None:
    used = {t for t in graph["cachefs.remotes.haystack"] if package_of(t) in SERVERS}
    assert used <= HAYSTACK_MAY_USE


def test_only_the_cli_imports_the_cli(graph: dict[str, set[str]]) -> None:
    wrong = [(m, t) for m, targets in graph.items() for t in targets
             if _is_cli(t) and not _is_cli(m)]
    assert wrong == []


def test_master_never_imports_storage_server_or_csi(graph: dict[str, set[str]]) -> None:
    wrong = [(m, t) for m, t in _edges(graph, "master")
             if package_of(t) in ("storage_server", "csi") or _is_cli(t)]
    assert wrong == []


def test_storage_server_uses_only_the_master_client(graph: dict[str, set[str]]) -> None:
    wrong = [(m, t) for m, t in _edges(graph, "storage_server")
             if (package_of(t) == "master" and t != "master.client")
             or package_of(t) == "csi" or _is_cli(t)]
    assert wrong == []


def test_the_cluster_contracts_stand_on_the_ground_alone(graph: dict[str, set[str]]) -> None:
    assert graph["cachefs.contracts"] <= {"cachefs", "cachefs.errors"}
    users = {package_of(m) for m, targets in graph.items() if "cachefs.contracts" in targets}
    assert {"master", "storage_server"} <= users
