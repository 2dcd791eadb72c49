{{/* Chart name, at most 63 characters. */}}
{{- define "malt-ops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name: the release name alone when it already holds the chart name. */}}
{{- define "malt-ops.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "malt-ops.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "malt-ops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: malt-ops
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* MLflow server: object name and the labels that select its pods. */}}
{{- define "malt-ops.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "malt-ops.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "malt-ops.mlflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "malt-ops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mlflow
{{- end }}

{{- define "malt-ops.mlflow.serviceAccountName" -}}
{{- if .Values.mlflow.serviceAccount.create }}
{{- default (include "malt-ops.mlflow.fullname" .) .Values.mlflow.serviceAccount.name }}
{{- else }}
{{- required "mlflow.serviceAccount.name is required when mlflow.serviceAccount.create is false" .Values.mlflow.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* In-cluster DNS name of the MLflow Service. */}}
{{- define "malt-ops.mlflow.host" -}}
{{- printf "%s.%s.svc.%s" (include "malt-ops.mlflow.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* The tracking URI the stage pods and the DAG use. */}}
{{- define "malt-ops.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s:%v" (include "malt-ops.mlflow.host" .) .Values.mlflow.service.port }}
{{- else }}
{{- required "mlflow.externalUri is required when mlflow.enabled is false" .Values.mlflow.externalUri }}
{{- end }}
{{- end }}

{{/*
Host headers the MLflow server accepts (--allowed-hosts, MLflow 3 DNS-rebinding protection):
every form of the Service's DNS name with and without a port, localhost for
`kubectl port-forward`, the Ingress host and mlflow.allowedHosts.
*/}}
{{- define "malt-ops.mlflow.allowedHosts" -}}
{{- $svc := include "malt-ops.mlflow.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $hosts := list }}
{{- range $name := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $.Values.clusterDomain) }}
{{- $hosts = append $hosts $name }}
{{- $hosts = append $hosts (printf "%s:*" $name) }}
{{- end }}
{{- $hosts = concat $hosts (list "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*") }}
{{- if .Values.mlflow.ingress.enabled }}
{{- $hosts = append $hosts .Values.mlflow.ingress.host }}
{{- end }}
{{- $hosts = concat $hosts .Values.mlflow.allowedHosts }}
{{- join "," (uniq $hosts) }}
{{- end }}

{{/* Pod-level security context (restricted Pod Security Standard). */}}
{{- define "malt-ops.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context (restricted, plus a read-only root filesystem). */}}
{{- define "malt-ops.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Names of the Secrets whose keys become stage pod environment. */}}
{{- define "malt-ops.jobSecrets" -}}
{{- $names := list .Values.secrets.s3.name .Values.secrets.mlflow.name }}
{{- toJson (uniq (concat $names .Values.jobs.extraSecrets)) }}
{{- end }}

{{/*
Namespaces that get the two ConfigMaps: the release (job) namespace, where stage pods
mount the recipes, and the Airflow namespace, where the DAG reads both.
*/}}
{{- define "malt-ops.configMapNamespaces" -}}
{{- $namespaces := list .Release.Namespace }}
{{- if and .Values.airflow.copyConfigMaps (ne .Values.airflow.namespace .Release.Namespace) }}
{{- $namespaces = append $namespaces .Values.airflow.namespace }}
{{- end }}
{{- toJson $namespaces }}
{{- end }}

{{/* A Kubernetes quantity or label value as a quoted string ("8", "64Gi"). */}}
{{- define "malt-ops.quotedMap" -}}
{{- range $key, $value := . }}
{{ $key }}: {{ toString $value | quote }}
{{- end }}
{{- end }}
