#!/usr/bin/env python3
"""Writes istiooperator.schema.json: a JSON Schema for the IstioOperator resource that
istioctl reads, built from the field tables below.

Istio's own CRD keeps `spec` schemaless, so validating our overlay against it proves nothing.
The tables are transcribed by hand from Istio's API definitions (the files and commits are in
SOURCES and end up in the schema's description); this script turns them into JSON Schema so
that each rule (closed objects, enum names, protobuf JSON naming) is applied the same way
everywhere. CI never regenerates from upstream (it has no network): it checks that the
committed schema is what this script prints.

  gen_istiooperator_schema.py            print the schema
  gen_istiooperator_schema.py -o FILE    write it
"""
import argparse
import json
import re
import sys

SOURCES = [
    ("istio/istio", "operator/pkg/apis/types.go", "1dbf09e8b97315d7b080f492bcc8380fd6a8bb3f",
     "IstioOperator, IstioOperatorSpec, IstioComponentSpec, ComponentSpec, KubernetesResources"),
    ("istio/api", "mesh/v1alpha1/config.proto", "0040fb30e9c09ad32d76fe59e3bdbb3da7f0aabb",
     "MeshConfig (spec.meshConfig)"),
    ("istio/api", "mesh/v1alpha1/proxy.proto", "00d4ed3c5930e11fa4a7b8b8c2eea95d3bba8d00",
     "ProxyConfig (spec.meshConfig.defaultConfig)"),
    ("istio/istio.io", "content/en/docs/reference/config/istio.mesh.v1alpha1/index.html",
     "00446af50266a564cae40cc439275e92da238f88",
     "ProxyConfig.proxyHeaders, documented there but newer than the proxy.proto above"),
    ("istio/istio", "operator/pkg/apis/values_types.proto", "02fdba21a200e0ad7ab19eb0bb0f455b7f02ca3c",
     "Values, GlobalConfig, ProxyConfig (spec.values, values.global, values.global.proxy)"),
    ("istio/istio", "operator/pkg/apis/validation/validation.go", "0098d99f8e43fe516aaac5a84a131b4ce3c8b9d1",
     "how istioctl parses each part (strict spec, protobuf meshConfig, lenient values)"),
]

# Field types, written the way the upstream files spell them:
#   string bool int32 uint32 int64 double   scalars
#   Duration                                protobuf Duration, a string such as "45s"
#   BoolValue Int32Value                    protobuf wrappers: the bare scalar in JSON
#   map                                     map<string,string>
#   object                                  a message this schema does not open (any object)
#   any                                     Go `any` / protobuf Value: anything
#   [T]                                     repeated T
#   enum:A,B,C                              a protobuf enum, by name
#   @Name                                   a table below, closed (no unknown keys)

# IstioOperatorSpec and friends: Go structs decoded by encoding/json with
# DisallowUnknownFields (ParseAndValidateIstioOperator), so only the json tag names count.
GO_TYPES = {
    "IstioOperatorSpec": {
        "profile": "string",
        "installPackagePath": "string",
        "hub": "string",
        "tag": "any",
        "namespace": "string",
        "revision": "string",
        "compatibilityVersion": "string",
        "meshConfig": "@MeshConfig",
        "components": "@IstioComponentSpec",
        "values": "@Values",
        "unvalidatedValues": "any",
    },
    "IstioComponentSpec": {
        "base": "@BaseComponentSpec",
        "pilot": "@ComponentSpec",
        "cni": "@ComponentSpec",
        "ztunnel": "@ComponentSpec",
        "istiodRemote": "@ComponentSpec",
        "ingressGateways": "[@GatewayComponentSpec]",
        "egressGateways": "[@GatewayComponentSpec]",
        "gateway": "@ComponentSpec",
    },
    "BaseComponentSpec": {
        "enabled": "bool",
        "k8s": "@KubernetesResources",
    },
    "ComponentSpec": {
        "enabled": "bool",
        "namespace": "string",
        "hub": "string",
        "tag": "any",
        "k8s": "@KubernetesResources",
    },
    "GatewayComponentSpec": {
        "enabled": "bool",
        "namespace": "string",
        "hub": "string",
        "tag": "any",
        "k8s": "@KubernetesResources",
        "name": "string",
        "label": "map",
    },
    # The Kubernetes types inside stay open: kubernetes-validate knows them, this schema does not.
    "KubernetesResources": {
        "affinity": "object",
        "env": "[object]",
        "hpaSpec": "object",
        "imagePullPolicy": "string",
        "nodeSelector": "map",
        "podDisruptionBudget": "object",
        "podAnnotations": "map",
        "priorityClassName": "string",
        "readinessProbe": "object",
        "replicaCount": "uint32",
        "resources": "object",
        "service": "object",
        "strategy": "object",
        "tolerations": "[object]",
        "serviceAnnotations": "map",
        "securityContext": "object",
        "volumes": "[object]",
        "volumeMounts": "[object]",
        "overlays": "[@KubernetesOverlay]",
    },
    "KubernetesOverlay": {
        "apiVersion": "string",
        "kind": "string",
        "name": "string",
        "patches": "[@Patch]",
    },
    "Patch": {
        "path": "string",
        "value": "any",
    },
}

# MeshConfig and ProxyConfig: protobuf messages, read by protojson, which takes a field by its
# proto name or its lowerCamelCase JSON name. Names are the proto ones; both spellings are
# allowed in the schema.
PROTO_MESSAGES = {
    "MeshConfig": {
        "proxy_listen_port": "int32",
        "proxy_inbound_listen_port": "int32",
        "proxy_http_port": "int32",
        "connect_timeout": "Duration",
        "protocol_detection_timeout": "Duration",
        "tcp_keepalive": "object",
        "ingress_class": "string",
        "ingress_service": "string",
        "ingress_controller_mode": "enum:UNSPECIFIED,OFF,DEFAULT,STRICT",
        "ingress_selector": "string",
        "enable_tracing": "bool",
        "access_log_file": "string",
        "access_log_format": "string",
        "access_log_encoding": "enum:TEXT,JSON",
        "enable_envoy_access_log_service": "bool",
        "disable_envoy_listener_log": "bool",
        "default_config": "@ProxyConfig",
        "outbound_traffic_policy": "@MeshConfig.OutboundTrafficPolicy",
        "inbound_traffic_policy": "@MeshConfig.InboundTrafficPolicy",
        "config_sources": "[object]",
        "enable_auto_mtls": "BoolValue",
        "trust_domain": "string",
        "trust_domain_aliases": "[string]",
        "ca_certificates": "[object]",
        "default_service_export_to": "[string]",
        "default_virtual_service_export_to": "[string]",
        "default_destination_rule_export_to": "[string]",
        "root_namespace": "string",
        "locality_lb_setting": "object",
        "dns_refresh_rate": "Duration",
        "h2_upgrade_policy": "enum:DO_NOT_UPGRADE,UPGRADE",
        "inbound_cluster_stat_name": "string",
        "outbound_cluster_stat_name": "string",
        "certificates": "[object]",
        "service_settings": "[object]",
        "enable_prometheus_merge": "BoolValue",
        "verify_certificate_at_client": "BoolValue",
        "ca": "object",
        "extension_providers": "[object]",
        "default_providers": "@MeshConfig.DefaultProviders",
        "discovery_selectors": "[object]",
        "path_normalization": "@MeshConfig.ProxyPathNormalization",
        "default_http_retry_policy": "object",
        "mesh_mTLS": "object",
        "tls_defaults": "object",
        "compliance_policy": "string",
    },
    "MeshConfig.OutboundTrafficPolicy": {
        "mode": "enum:REGISTRY_ONLY,ALLOW_ANY",
    },
    "MeshConfig.InboundTrafficPolicy": {
        "mode": "enum:PASSTHROUGH,LOCALHOST",
    },
    "MeshConfig.DefaultProviders": {
        "tracing": "[string]",
        "metrics": "[string]",
        "access_logging": "[string]",
    },
    "MeshConfig.ProxyPathNormalization": {
        "normalization": "enum:DEFAULT,NONE,BASE,MERGE_SLASHES,DECODE_AND_MERGE_SLASHES",
    },
    "ProxyConfig": {
        "config_path": "string",
        "binary_path": "string",
        "service_cluster": "string",
        "tracing_service_name": "enum:APP_LABEL_AND_NAMESPACE,CANONICAL_NAME_ONLY,CANONICAL_NAME_AND_NAMESPACE",
        "drain_duration": "Duration",
        "parent_shutdown_duration": "Duration",
        "discovery_address": "string",
        "discovery_refresh_delay": "Duration",
        "zipkin_address": "string",
        "statsd_udp_address": "string",
        "envoy_metrics_service_address": "string",
        "proxy_admin_port": "int32",
        "availability_zone": "string",
        "control_plane_auth_policy": "enum:NONE,MUTUAL_TLS,INHERIT",
        "custom_config_file": "string",
        "stat_name_length": "int32",
        "concurrency": "Int32Value",
        "proxy_bootstrap_template_path": "string",
        # The field meshlane depends on: ProxyConfig.InboundInterceptionMode.
        "interception_mode": "enum:REDIRECT,TPROXY,NONE",
        "tracing": "object",
        "sds": "object",
        "envoy_access_log_service": "object",
        "envoy_metrics_service": "object",
        "proxy_metadata": "map",
        "runtime_values": "map",
        "status_port": "int32",
        "extra_stat_tags": "[string]",
        "gateway_topology": "object",
        "termination_drain_duration": "Duration",
        "mesh_id": "string",
        "readiness_probe": "object",
        "proxy_stats_matcher": "@ProxyConfig.ProxyStatsMatcher",
        "hold_application_until_proxy_starts": "BoolValue",
        "ca_certificates_pem": "[string]",
        "image": "object",
        "private_key_provider": "object",
        "proxy_headers": "object",
    },
    "ProxyConfig.ProxyStatsMatcher": {
        "inclusion_prefixes": "[string]",
        "inclusion_suffixes": "[string]",
        "inclusion_regexps": "[string]",
    },
}

# spec.values: values_types.proto messages, but istioctl decodes them with sigs.k8s.io/yaml
# into the generated Go structs, whose json tags carry the proto names unchanged (these protos
# already use camelCase, as the Helm charts do). istioctl ignores unknown keys here; this schema
# closes the three levels it derives so that a typo in our overlay is caught instead of silently
# doing nothing. Everything below them stays open.
VALUES_MESSAGES = {
    "Values": {
        "cni": "object",
        "gateways": "object",
        "global": "@GlobalConfig",
        "pilot": "object",
        "ztunnel": "any",
        "telemetry": "object",
        "sidecarInjectorWebhook": "object",
        "istio_cni": "object",
        "revision": "string",
        "ownerName": "string",
        "meshConfig": "any",
        "base": "object",
        "istiodRemote": "object",
        "revisionTags": "[string]",
        "defaultRevision": "string",
        "profile": "string",
        "compatibilityVersion": "string",
        "experimental": "object",
        "gatewayClasses": "any",
    },
    "GlobalConfig": {
        "arch": "object",
        "certSigners": "[string]",
        "configValidation": "BoolValue",
        "defaultNodeSelector": "object",
        "defaultPodDisruptionBudget": "object",
        "defaultResources": "object",
        "defaultTolerations": "[object]",
        "hub": "string",
        "imagePullPolicy": "string",
        "imagePullSecrets": "[string]",
        "istioNamespace": "string",
        "logAsJson": "BoolValue",
        "logging": "object",
        "meshID": "string",
        "meshNetworks": "object",
        "multiCluster": "object",
        "network": "string",
        "podDNSSearchNamespaces": "[string]",
        "omitSidecarInjectorConfigMap": "BoolValue",
        "operatorManageWebhooks": "BoolValue",
        "priorityClassName": "string",
        "proxy": "@GlobalConfig.Proxy",
        "proxy_init": "object",
        "sds": "object",
        "tag": "any",
        "variant": "string",
        "tracer": "object",
        "remotePilotAddress": "string",
        "istiod": "object",
        "pilotCertProvider": "string",
        "jwtPolicy": "string",
        "sts": "object",
        "revision": "string",
        "mountMtlsCerts": "BoolValue",
        "caAddress": "string",
        "externalIstiod": "BoolValue",
        "configCluster": "BoolValue",
        "caName": "string",
        "platform": "string",
        "ipFamilies": "[string]",
        "ipFamilyPolicy": "string",
        "waypoint": "object",
        "trustBundleName": "string",
        # Istio's nftables capture; meshlane reads it too (nft -j, --native-nftables).
        "nativeNftables": "BoolValue",
        "networkPolicy": "object",
        "resourceScope": "enum:undefined,all,cluster,namespace",
        "agentgateway": "object",
        "enableReaderRBAC": "BoolValue",
    },
    # values_types.proto's ProxyConfig (the Helm values one, not mesh ProxyConfig).
    "GlobalConfig.Proxy": {
        "autoInject": "string",
        "clusterDomain": "string",
        "componentLogLevel": "string",
        "enableCoreDump": "BoolValue",
        "excludeInboundPorts": "string",
        "excludeIPRanges": "string",
        "image": "string",
        "includeIPRanges": "string",
        "logLevel": "string",
        "outlierLogPath": "string",
        "privileged": "BoolValue",
        "readinessInitialDelaySeconds": "uint32",
        "readinessPeriodSeconds": "uint32",
        "readinessFailureThreshold": "uint32",
        "seccompProfile": "object",
        "startupProbe": "object",
        "statusPort": "uint32",
        "resources": "object",
        "tracer": "enum:zipkin,lightstep,datadog,stackdriver,openCensusAgent,none",
        "excludeOutboundPorts": "string",
        "lifecycle": "object",
        "holdApplicationUntilProxyStarts": "BoolValue",
        "includeInboundPorts": "string",
        "includeOutboundPorts": "string",
    },
}


def lower_camel(name):
    """protoc's JSON name: drop each underscore and upper-case the letter after it."""
    return re.sub(r"_(.)", lambda m: m.group(1).upper(), name)


def def_name(table):
    return table.replace(".", "_")


def type_schema(t):
    if t.startswith("[") and t.endswith("]"):
        return {"type": "array", "items": type_schema(t[1:-1])}
    if t.startswith("@"):
        return {"$ref": f"#/$defs/{def_name(t[1:])}"}
    if t.startswith("enum:"):
        return {"type": "string", "enum": t[len("enum:"):].split(",")}
    simple = {
        "string": {"type": "string"},
        "Duration": {"type": "string"},
        "bool": {"type": "boolean"},
        "BoolValue": {"type": "boolean"},
        "int32": {"type": "integer"},
        "Int32Value": {"type": "integer"},
        "int64": {"type": "integer"},
        "uint32": {"type": "integer", "minimum": 0},
        "double": {"type": "number"},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "object": {"type": "object"},
        "any": {},
    }
    if t not in simple:
        raise SystemExit(f"unknown field type {t!r}")
    return dict(simple[t])


def closed_object(fields, aliases):
    props = {}
    for name, t in fields.items():
        props[name] = type_schema(t)
        if aliases:
            camel = lower_camel(name)
            if camel != name:
                props[camel] = type_schema(t)
    return {"type": "object", "properties": props, "additionalProperties": False}


def build():
    defs = {}
    for table, fields in GO_TYPES.items():
        defs[def_name(table)] = closed_object(fields, aliases=False)
    for table, fields in PROTO_MESSAGES.items():
        defs[def_name(table)] = closed_object(fields, aliases=True)
    for table, fields in VALUES_MESSAGES.items():
        defs[def_name(table)] = closed_object(fields, aliases=False)

    sources = "; ".join(f"{repo} {path} @ {commit} ({what})" for repo, path, commit, what in SOURCES)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://meshlane.invalid/istio-integration/istio/istiooperator.schema.json",
        "title": "IstioOperator (install.istio.io/v1alpha1) as istioctl reads it",
        "description": (
            "Generated by istio-integration/istio/gen_istiooperator_schema.py; do not edit. "
            "Derived from: " + sources + ". "
            "Closed (unknown keys rejected): the resource, spec, spec.components and its "
            "component specs, spec.meshConfig, spec.meshConfig.defaultConfig and a few of their "
            "small messages, spec.values, spec.values.global, spec.values.global.proxy. "
            "Open: metadata beyond name/namespace, Kubernetes types under components.*.k8s, "
            "other nested MeshConfig/ProxyConfig messages, values subtrees other than "
            "global and global.proxy, unvalidatedValues. MeshConfig and ProxyConfig fields are "
            "accepted under both their proto and JSON names, as protojson does. Enums are "
            "checked by name only. The upstream files were read at the commits above, which "
            "are not mapped to release tags: fields added upstream after them are rejected here."
        ),
        "type": "object",
        "required": ["apiVersion", "kind"],
        "properties": {
            "apiVersion": {"const": "install.istio.io/v1alpha1"},
            "kind": {"const": "IstioOperator"},
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "namespace": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
            "spec": {"$ref": "#/$defs/IstioOperatorSpec"},
        },
        "additionalProperties": False,
        "$defs": defs,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", help="write here instead of stdout")
    args = ap.parse_args()
    text = json.dumps(build(), indent=2) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
