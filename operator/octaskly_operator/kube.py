"""A thin layer over the official Kubernetes client: server-side apply of whole objects
(idempotent, so every reconcile renders everything and applies it), reads, deletes."""

from __future__ import annotations

import logging
from typing import Any

from kubernetes import client, config, dynamic
from kubernetes.client import exceptions

log = logging.getLogger(__name__)
FIELD_MANAGER = "octaskly-operator"


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In a pod: the service account; elsewhere: `kubeconfig` or the current context."""
    if kubeconfig is None:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
            return client.ApiClient()
        except config.ConfigException:
            pass
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, client_configuration=configuration
    )
    return client.ApiClient(configuration)


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.dynamic = dynamic.DynamicClient(api)  # type: ignore[no-untyped-call]
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def _resource(self, api_version: str, kind: str) -> Any:
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: the object as we want it; fields others own are left alone."""
        meta = obj["metadata"]
        resource = self._resource(obj["apiVersion"], obj["kind"])
        result = resource.server_side_apply(
            body=obj,
            name=meta["name"],
            namespace=meta.get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )
        return dict(result.to_dict())

    def get(self, api_version: str, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        try:
            found = self._resource(api_version, kind).get(name=name, namespace=namespace)
        except exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(found.to_dict())

    def list(
        self, api_version: str, kind: str, namespace: str | None, selector: dict[str, str]
    ) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{k}={v}" for k, v in selector.items())
        found = self._resource(api_version, kind).get(
            namespace=namespace, label_selector=label_selector
        )
        return [dict(item.to_dict()) for item in found.items]

    def delete(self, api_version: str, kind: str, name: str, namespace: str) -> bool:
        try:
            self._resource(api_version, kind).delete(name=name, namespace=namespace)
        except exceptions.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def patch(
        self, api_version: str, kind: str, name: str, namespace: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """A JSON merge patch (lists are replaced whole; a metadata.resourceVersion in the
        body makes it conditional: 409 if the object changed)."""
        result = self._resource(api_version, kind).patch(
            body=body,
            name=name,
            namespace=namespace,
            content_type="application/merge-patch+json",
        )
        return dict(result.to_dict())

    def patch_labels(self, name: str, namespace: str, labels: dict[str, str | None]) -> None:
        self.core.patch_namespaced_pod(name, namespace, {"metadata": {"labels": labels}})

    def patch_status(
        self, group: str, version: str, plural: str, name: str, namespace: str, status: Any
    ) -> None:
        self.custom.patch_namespaced_custom_object_status(
            group, version, namespace, plural, name, {"status": status}
        )
