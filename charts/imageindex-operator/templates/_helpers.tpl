{{/*
The chart name, or nameOverride.
*/}}
{{- define "imageindex-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: fullnameOverride, or <release>-<name> (the release name
alone when it already contains the name). Truncated to 63 characters (DNS label limit).
*/}}
{{- define "imageindex-operator.fullname" -}}
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

{{/*
name-version, for the helm.sh/chart label.
*/}}
{{- define "imageindex-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the operator's pods (stable across upgrades: never add to them).
*/}}
{{- define "imageindex-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imageindex-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The recommended labels on every object of the chart.
*/}}
{{- define "imageindex-operator.labels" -}}
helm.sh/chart: {{ include "imageindex-operator.chart" . }}
{{ include "imageindex-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: imageindex
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "imageindex-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imageindex-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: the digest wins, the tag defaults to the
chart's appVersion.
*/}}
{{- define "imageindex-operator.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
The namespace the operator watches ("" = all).
*/}}
{{- define "imageindex-operator.watchNamespace" -}}
{{- .Values.operator.watchNamespace }}
{{- end }}
