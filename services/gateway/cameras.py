"""Who may talk to the gateway: stores, their cameras and tokens, from a YAML file.

```yaml
stores:
  store-1: {tenant: acme, backend_token: "…"}   # backend_token: for SubscribeDecisions
cameras:
  cam-1: {store: store-1, token: "…"}          # a camera submits only for its own store
```
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Store:
    store_id: str
    tenant: str
    backend_token: str


@dataclass(frozen=True)
class Camera:
    camera_id: str
    store: Store
    token: str


class AccessDenied(Exception):
    def __init__(self, unauthenticated: bool, message: str) -> None:
        super().__init__(message)
        self.unauthenticated = unauthenticated  # False: known caller, not allowed (PERMISSION_DENIED)


class CameraRegistry:
    def __init__(self, stores: dict[str, Store], cameras: dict[str, Camera]) -> None:
        self.stores = stores
        self.cameras = cameras

    @classmethod
    def from_file(cls, path: str | Path) -> CameraRegistry:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    @classmethod
    def from_dict(cls, data: dict) -> CameraRegistry:
        stores = {
            sid: Store(sid, str(s.get("tenant") or sid), str(s.get("backend_token") or ""))
            for sid, s in (data.get("stores") or {}).items()
        }
        cameras = {}
        for cid, c in (data.get("cameras") or {}).items():
            if c["store"] not in stores:
                raise ValueError(f"camera {cid} names unknown store {c['store']!r}")
            if not c.get("token"):
                raise ValueError(f"camera {cid} has no token: every camera must authenticate")
            cameras[cid] = Camera(cid, stores[c["store"]], str(c["token"]))
        return cls(stores, cameras)

    def camera(self, camera_id: str, token: str) -> Camera:
        camera = self.cameras.get(camera_id)
        # Same answer for an unknown camera and a wrong token: no probing for camera ids.
        if camera is None or not hmac.compare_digest(camera.token.encode(), token.encode()):
            raise AccessDenied(True, "unknown camera or wrong token")
        return camera

    def backend_for_token(self, token: str) -> Store:
        """The store whose backend token this is (checked against every store, in constant time each)."""
        found = None
        for store in self.stores.values():
            if store.backend_token and hmac.compare_digest(store.backend_token.encode(), token.encode()):
                found = store
        if found is None:
            raise AccessDenied(True, "unknown store or wrong backend token")
        return found

    def backend(self, store_id: str, token: str) -> Store:
        store = self.stores.get(store_id)
        if (
            store is None
            or not store.backend_token
            or not hmac.compare_digest(store.backend_token.encode(), token.encode())
        ):
            raise AccessDenied(True, "unknown store or wrong backend token")
        return store
