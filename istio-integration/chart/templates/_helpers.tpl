{{/* Names and labels shared by every object of the release. */}}

{{- define "meshlane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshlane.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "meshlane.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "meshlane.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "meshlane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshlane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "meshlane.labels" -}}
{{ include "meshlane.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "meshlane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "meshlane.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A digest pins the exact image the operator verified; the tag is then only documentation. */}}
{{- define "meshlane.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "meshlane.configMapName" -}}
{{- default (printf "%s-pods" (include "meshlane.fullname" .)) .Values.discovery.local.existingConfigMap -}}
{{- end -}}

{{/*
Refuses values the daemon cannot honour, at template time, with the reason. Included by the
DaemonSet so that `helm template`, `helm install` and `helm lint` all stop on it. Each value's
own type, enum, range and pattern is values.schema.json's (helm checks it first); what is left
here are rules across fields, the explanation of a planned source, and the pod list entries'
keys (named per entry).
*/}}
{{- define "meshlane.validate" -}}
{{- $source := .Values.discovery.source -}}
{{- if eq $source "xds" -}}
{{- fail (printf "discovery.source=%s: this meshlane (%s) does not implement the %s source on its own: xDS cross-checks the kubernetes source (set discovery.source=kubernetes and discovery.xdsServer); the working sources are local (sidecars found on each node) and kubernetes (this node's pods from the API server)" $source .Chart.AppVersion $source) -}}
{{- end -}}
{{- if and .Values.podMonitor.enabled .Values.serviceMonitor.enabled -}}
{{- fail "podMonitor and serviceMonitor both scrape the daemon pods: enable one (every series would be collected twice)" -}}
{{- end -}}
{{- if and .Values.discovery.xdsServer (ne $source "kubernetes") -}}
{{- fail "discovery.xdsServer needs discovery.source=kubernetes: each pod's xDS identity (pod IP, name, namespace) comes from the API" -}}
{{- end -}}
{{- $known := list "name" "netns" "proxy_uid" "proxy_gid" "outbound_port" "inbound_port" "inbound_bind" "exclude_outbound_ports" "exclude_inbound_ports" "exclude_outbound_cidrs" "include_outbound_cidrs" "accelerate" "mode" -}}
{{- range $i, $pod := .Values.discovery.local.pods -}}
{{- if not (kindIs "map" $pod) -}}
{{- fail (printf "discovery.local.pods[%d]: each pod is a map with at least name and netns" $i) -}}
{{- end -}}
{{- range $k := list "name" "netns" -}}
{{- if not (get $pod $k) -}}
{{- fail (printf "discovery.local.pods[%d]: %s is required" $i $k) -}}
{{- end -}}
{{- end -}}
{{- range $k, $_ := $pod -}}
{{- if not (has $k $known) -}}
{{- fail (printf "discovery.local.pods[%d]: unknown key %s (known: %s)" $i $k (join ", " $known)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.discovery.local.existingConfigMap .Values.discovery.local.pods -}}
{{- fail "discovery.local: set either existingConfigMap or pods, not both" -}}
{{- end -}}
{{- range .Values.capabilities -}}
{{- if hasPrefix "CAP_" . -}}
{{- fail (printf "capabilities: write %s without the CAP_ prefix (Kubernetes convention)" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
