"""Push a minimal OCI image (a config blob and a manifest, no layers) to a registry over its
HTTP API: enough for registries and digests to be real in tests that need no Docker engine."""

from __future__ import annotations

import hashlib
import json
import urllib.request


def _put_blob(base: str, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(f"{base}/v2/{repo}/blobs/uploads/", method="POST", data=b"")
    with urllib.request.urlopen(req) as resp:
        location = resp.headers["Location"]
    if location.startswith("/"):
        location = base + location
    sep = "&" if "?" in location else "?"
    req = urllib.request.Request(f"{location}{sep}digest={digest}", method="PUT", data=data,
                                 headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(req).close()
    return digest


def push_manifest(registry: str, repo: str, tag: str, note: str) -> str:
    """Push an empty image tagged ``tag`` (``note`` makes its digest unique); returns the
    manifest digest the registry reports."""
    base = f"http://{registry}"
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": {"note": note}},
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _put_blob(base, repo, config), "size": len(config)},
        "layers": []}).encode()
    req = urllib.request.Request(f"{base}/v2/{repo}/manifests/{tag}", method="PUT", data=manifest,
                                 headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req) as resp:
        return resp.headers["Docker-Content-Digest"]
