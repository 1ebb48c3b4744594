{{- define "roombus.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "roombus.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "roombus.labels" -}}
{{ include "roombus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "roombus.secretName" -}}
{{- default (include "roombus.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* The configuration as given, with the HTTP port the probes need forced on. */}}
{{- define "roombus.config" -}}
{{- $bridge := merge (dict "http_port" (int .Values.httpPort) "http_host" "0.0.0.0") (default (dict) .Values.config.bridge) -}}
{{- $_ := set $bridge "http_port" (int .Values.httpPort) -}}
{{- $_ := set $bridge "http_host" "0.0.0.0" -}}
{{- $config := merge (dict "bridge" $bridge) (omit .Values.config "bridge") -}}
{{- toYaml $config -}}
{{- end -}}
