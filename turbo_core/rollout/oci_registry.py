"""Does an image exist in its registry, and what is its digest? (OCI distribution API.)

Kubernetes nodes pull from the registry, so that is where the image must exist: a ``HEAD``
of ``/v2/<repository>/manifests/<tag or digest>`` answers both questions without a Docker
engine. Anonymous bearer tokens are fetched when the registry asks for one; a registry that
needs credentials cannot be checked here (pass ``--skip-image-check`` and rely on the
rollout's own wait, which reports ImagePullBackOff).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request

from turbo_core.rollout import RolloutError
from turbo_core.rollout.manifests import split_image

MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])


def _endpoint(repo: str) -> tuple[str, str]:
    """(base URL, repository path) for an image repository, Docker Hub rules included."""
    first, _, rest = repo.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        host, path = first, rest
    else:
        host, path = "registry-1.docker.io", repo if "/" in repo else f"library/{repo}"
    local = host.split(":")[0] in ("localhost", "127.0.0.1", "::1")
    return f"{'http' if local else 'https'}://{host}", path


def _head(url: str, token: str | None):
    req = urllib.request.Request(url, method="HEAD", headers={"Accept": MANIFEST_TYPES})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(req, timeout=20)


def _anonymous_token(challenge: str) -> str | None:
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    if not challenge.lower().startswith("bearer") or "realm" not in params:
        return None
    query = urllib.parse.urlencode({k: v for k, v in params.items() if k in ("service", "scope")})
    with urllib.request.urlopen(f"{params['realm']}?{query}", timeout=20) as resp:
        doc = json.load(resp)
    return doc.get("token") or doc.get("access_token")


def resolve_digest(image: str) -> str:
    """The registry's ``sha256:…`` digest for ``image``; RolloutError if it does not exist
    or the registry cannot be asked."""
    repo, tag, digest = split_image(image)
    base, path = _endpoint(repo)
    url = f"{base}/v2/{path}/manifests/{digest or tag or 'latest'}"
    token = None
    for _ in range(2):
        try:
            with _head(url, token) as resp:
                found = resp.headers.get("Docker-Content-Digest") or digest
                if not found:
                    raise RolloutError(f"registry at {base} gave no digest for {image}")
                return found
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise RolloutError(f"image {image} does not exist in its registry ({base})") from None
            if exc.code == 401 and token is None:
                token = _anonymous_token(exc.headers.get("WWW-Authenticate", ""))
                if token:
                    continue
            raise RolloutError(f"cannot check image {image} at {base}: HTTP {exc.code} "
                               "(credentials needed? use --skip-image-check)") from None
        except OSError as exc:
            raise RolloutError(f"cannot reach the registry of {image} at {base}: {exc}") from None
    raise RolloutError(f"registry at {base} refused the anonymous token for {image}")


def pinned(image: str, digest: str) -> str:
    """``repo@digest`` (tags dropped: deploys use digests)."""
    repo, _, _ = split_image(image)
    return f"{repo}@{digest}"
