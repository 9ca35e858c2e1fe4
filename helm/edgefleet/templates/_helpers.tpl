{{/*
Names. Cluster-scoped objects carry the full name (release-derived), so two releases in one
cluster do not collide; the agent ServiceAccount's name is fixed (the operator creates agent
Pods with serviceAccountName edgefleet-agent).
*/}}
{{- define "edgefleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "edgefleet.operatorName" -}}
{{- printf "%s-operator" (include "edgefleet.fullname" .) -}}
{{- end -}}

{{- define "edgefleet.agentServiceAccount" -}}edgefleet-agent{{- end -}}

{{- define "edgefleet.agentNamespace" -}}
{{- .Values.agent.namespace | default .Release.Namespace -}}
{{- end -}}

{{- define "edgefleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: edgefleet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "edgefleet.operatorSelector" -}}
app.kubernetes.io/name: edgefleet-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "edgefleet.image" -}}
{{- printf "%s:%s" .repository (.tag | default .appVersion) -}}
{{- end -}}

{{- define "edgefleet.operatorImage" -}}
{{- include "edgefleet.image" (dict "repository" .Values.operator.image.repository "tag" .Values.operator.image.tag "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{- define "edgefleet.agentImage" -}}
{{- include "edgefleet.image" (dict "repository" .Values.agent.image.repository "tag" .Values.agent.image.tag "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{/* The fleet selector as the operator reads it: "k=v,k2=v2". */}}
{{- define "edgefleet.fleetSelector" -}}
{{- $parts := list -}}
{{- range $k, $v := .Values.fleet.selector -}}
{{- $parts = append $parts (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $parts -}}
{{- end -}}

{{/* Pod Security "restricted" container settings, shared by every container we run. */}}
{{- define "edgefleet.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
