"""Credentials for the API: the same configuration for the operator's client and kopf."""

from __future__ import annotations

import os
from typing import Any

import kopf


def client_configuration() -> Any:
    """In-cluster credentials when running in a pod, else ``$KUBECONFIG`` (read now, not
    when the client library was imported) or ``~/.kube/config``."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        kubeconfig = os.environ.get("KUBECONFIG") or None
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return configuration


def new_api_client() -> Any:
    from kubernetes import client

    return client.ApiClient(client_configuration())


def connection_info(configuration: Any) -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration the client uses."""
    header = (configuration.get_api_key_with_prefix("BearerToken")
              or configuration.get_api_key_with_prefix("authorization"))
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )
