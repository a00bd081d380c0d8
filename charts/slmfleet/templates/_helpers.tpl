{{/*
Names. The release name alone when it already says slmfleet (`helm install slmfleet ...`), so the
objects are named as in deploy/: slmfleet-operator, slmfleet-deprecations.
*/}}
{{- define "slmfleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "slmfleet.operatorName" -}}
{{- printf "%s-operator" (include "slmfleet.fullname" .) -}}
{{- end -}}

{{- define "slmfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "slmfleet.operatorName" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "slmfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "slmfleet.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: slmfleet
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/*
An image reference: [imageRegistry/]repository[:tag]@digest. Call with
(dict "registry" .Values.imageRegistry "image" .Values.image). The schema requires the digest; the
`required` here only guards against a schema-less render.
*/}}
{{- define "slmfleet.image" -}}
{{- $registry := .registry | default "" | trimSuffix "/" -}}
{{- $ref := .image.repository -}}
{{- if $registry -}}{{- $ref = printf "%s/%s" $registry $ref -}}{{- end -}}
{{- if .image.tag -}}{{- $ref = printf "%s:%s" $ref (toString .image.tag) -}}{{- end -}}
{{- printf "%s@%s" $ref (required (printf "%s: a digest (sha256:<64 hex>) is required" .image.repository) .image.digest) -}}
{{- end -}}

{{/* The tag-only form of an image in the mirror, the destination of a `crane copy`. */}}
{{- define "slmfleet.mirrorTag" -}}
{{- $registry := .registry | default "" | trimSuffix "/" -}}
{{- $ref := .image.repository -}}
{{- if $registry -}}{{- $ref = printf "%s/%s" $registry $ref -}}{{- end -}}
{{- if .image.tag -}}{{- $ref = printf "%s:%s" $ref (toString .image.tag) -}}{{- end -}}
{{- $ref -}}
{{- end -}}

{{- define "slmfleet.operatorImage" -}}
{{- include "slmfleet.image" (dict "registry" .Values.imageRegistry "image" .Values.image) -}}
{{- end -}}

{{- define "slmfleet.vllmImage" -}}
{{- include "slmfleet.image" (dict "registry" .Values.imageRegistry "image" .Values.vllm.image) -}}
{{- end -}}

{{- define "slmfleet.cpuVllmImage" -}}
{{- with .Values.vllm.cpuImage -}}{{- if .digest -}}
{{- include "slmfleet.image" (dict "registry" $.Values.imageRegistry "image" .) -}}
{{- end -}}{{- end -}}
{{- end -}}

{{- define "slmfleet.deprecationsName" -}}
{{- printf "%s-deprecations" (include "slmfleet.fullname" .) -}}
{{- end -}}

{{/*
The operator's config file (api/config.py: OperatorConfig): the `config` values plus what the
chart computes. `slmfleet operator run` refuses unknown keys, as the schema does.
*/}}
{{- define "slmfleet.operatorConfig" -}}
{{- $config := deepCopy .Values.config -}}
{{- $_ := set $config "vllmImage" (include "slmfleet.vllmImage" .) -}}
{{- $_ = set $config "loaderImage" (include "slmfleet.operatorImage" .) -}}
{{- with (include "slmfleet.cpuVllmImage" .) -}}{{- $_ = set $config "cpuVllmImage" . -}}{{- end -}}
{{- $_ = set $config "imagePullSecrets" (.Values.imagePullSecrets | default list) -}}
{{- $_ = set $config "namespaces" (.Values.watchNamespaces | default list) -}}
{{- $_ = set $config "deprecations" (dict "namespace" .Release.Namespace "name" (include "slmfleet.deprecationsName" .)) -}}
{{- toYaml $config -}}
{{- end -}}

{{/*
RBAC rules, in two parts. The namespaced part is granted per watched namespace in
rbac.scope=namespaced; together with the cluster-wide part it is deploy/rbac.yaml's ClusterRole
(tests/test_chart.py compares them).
*/}}
{{- define "slmfleet.rules.namespaced" -}}
- apiGroups: [slmfleet.io]
  resources: [smallmodels, modelrollouts]
  verbs: [get, list, watch]
- apiGroups: [slmfleet.io]
  resources: [smallmodels/status, modelrollouts/status]
  verbs: [get, patch, update]
# Everything built for a model has an ownerReference to its SmallModel with blockOwnerDeletion;
# where the OwnerReferencesPermissionEnforcement admission plugin runs, setting it needs `update`
# on the owner's finalizers.
- apiGroups: [slmfleet.io]
  resources: [smallmodels/finalizers]
  verbs: [update]
# The canary's weights, when the Gateway API is installed.
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes]
  verbs: [get, create, patch, update, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, update, delete]
# S3 credentials and CA bundles SmallModels reference, evaluation datasets, the deprecations list.
# `get` only: the operator cannot list Secrets.
- apiGroups: [""]
  resources: [secrets, configmaps]
  verbs: [get]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{- define "slmfleet.rules.clusterwide" -}}
# Nodes are cluster-scoped; the GPU inventory also counts what every pod on a node requests,
# whichever namespace it runs in. Read-only.
- apiGroups: [""]
  resources: [pods, nodes]
  verbs: [get, list, watch]
# kopf discovers the resources it watches (CRDs are cluster-scoped) ...
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
# ... and the namespaces it serves.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
{{- end -}}
