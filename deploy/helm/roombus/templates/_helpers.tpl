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

{{/* The configuration as given, with the HTTP port the probes need forced on, and
bridge.replicas from `replicas` (replica_id: the pod's name). */}}
{{- define "roombus.config" -}}
{{- $bridge := merge (dict "http_port" (int .Values.httpPort) "http_host" "0.0.0.0") (default (dict) .Values.config.bridge) -}}
{{- $_ := set $bridge "http_port" (int .Values.httpPort) -}}
{{- $_ := set $bridge "http_host" "0.0.0.0" -}}
{{- if .Values.replicas.enabled -}}
{{- $r := .Values.replicas -}}
{{- $replicas := deepCopy (default (dict) $r.extra) -}}
{{- $_ := set $replicas "kafka" $r.kafka -}}
{{- $_ := set $replicas "partitions" (int $r.partitions) -}}
{{- $_ := set $replicas "session_timeout" $r.sessionTimeout -}}
{{- $_ := set $replicas "heartbeat_interval" $r.heartbeatInterval -}}
{{- $_ := set $replicas "replica_id" "${POD_NAME}" -}}
{{- $_ := set $bridge "replicas" $replicas -}}
{{- end -}}
{{- $config := merge (dict "bridge" $bridge) (omit .Values.config "bridge") -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Refuse values that would run several bridges in one room set without sharding. */}}
{{- define "roombus.validate" -}}
{{- if not (has .Values.workload (list "Deployment" "StatefulSet")) -}}
{{- fail (printf "workload must be Deployment or StatefulSet, not %q" .Values.workload) -}}
{{- end -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.replicas.enabled) -}}
{{- fail "replicaCount > 1 needs replicas.enabled=true (bridge.replicas shares the rooms between the pods; without it every pod would join every room and consume every topic)" -}}
{{- end -}}
{{- if .Values.replicas.enabled -}}
{{- if not .Values.replicas.kafka -}}
{{- fail "replicas.kafka: name the cluster under config.kafka whose group protocol assigns the rooms" -}}
{{- end -}}
{{- if not (hasKey (default (dict) .Values.config.kafka) .Values.replicas.kafka) -}}
{{- fail (printf "replicas.kafka: %q is not a cluster under config.kafka" .Values.replicas.kafka) -}}
{{- end -}}
{{- if (default (dict) .Values.config.bridge).replicas -}}
{{- fail "set the replica settings under replicas (replicas.extra for the others), not config.bridge.replicas" -}}
{{- end -}}
{{- end -}}
{{- end -}}
