"""The discovery half of a Kubernetes API server, on 127.0.0.1, so that `kubectl apply
--dry-run=client` runs without a cluster: kubectl maps each manifest's apiVersion and kind to a
resource through the server's discovery documents before it does anything else, even for a
client-side dry run. Every object lookup answers 404 (nothing exists yet), so kubectl treats
each manifest as a create. It serves no OpenAPI schemas: kubectl runs with --validate=false and
the tests check the fields they rely on themselves.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# group/version -> (resource, kind, namespaced) of the kinds squadtune's manifests use.
RESOURCES = {
    "v1": [("secrets", "Secret", True), ("services", "Service", True), ("pods", "Pod", True),
           ("persistentvolumeclaims", "PersistentVolumeClaim", True),
           ("namespaces", "Namespace", False)],
    "batch/v1": [("jobs", "Job", True)],
    "ray.io/v1": [("rayclusters", "RayCluster", True), ("rayjobs", "RayJob", True)],
}
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def resource_list(group_version: str) -> dict:
    return {
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
        "resources": [{"name": name, "singularName": kind.lower(), "namespaced": namespaced,
                       "kind": kind, "verbs": VERBS} for name, kind, namespaced in
                      RESOURCES[group_version]],
    }


def groups() -> dict:
    found = []
    for group_version in RESOURCES:
        if "/" in group_version:
            group, version = group_version.split("/")
            entry = {"groupVersion": group_version, "version": version}
            found.append({"name": group, "versions": [entry], "preferredVersion": entry})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": found}


class Discovery(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path.split("?")[0].rstrip("/")
        if path == "/api":
            self.reply(200, {"kind": "APIVersions", "versions": ["v1"],
                             "serverAddressByClientCIDRs": []})
        elif path == "/apis":
            self.reply(200, groups())
        elif path == "/api/v1":
            self.reply(200, resource_list("v1"))
        elif path.startswith("/apis/") and path.count("/") == 3 and path[6:] in RESOURCES:
            self.reply(200, resource_list(path[6:]))
        else:
            self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "reason": "NotFound", "code": 404, "message": "not found"})

    def reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def discovery_server() -> Iterator[str]:
    """The server's URL while the block runs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Discovery)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
