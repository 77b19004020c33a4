{{- define "octaskly-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "octaskly-operator.labels" -}}
app.kubernetes.io/name: octaskly-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "octaskly-operator.selector" -}}
app.kubernetes.io/name: octaskly-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "octaskly-operator.serviceAccount" -}}
{{- default (include "octaskly-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}
