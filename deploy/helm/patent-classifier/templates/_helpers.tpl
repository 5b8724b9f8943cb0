{{/* Names: <release>-patent-classifier, shortened to the 63 characters a DNS label allows. */}}
{{- define "patent-classifier.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Service names carry a suffix: keep the base short enough for it. */}}
{{- define "patent-classifier.servicename" -}}
{{- printf "%s-%s" (include "patent-classifier.fullname" .root | trunc 55 | trimSuffix "-") .suffix -}}
{{- end -}}

{{- define "patent-classifier.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "patent-classifier.labels" -}}
{{ include "patent-classifier.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Probes go to Triton's HTTP port: HTTPS through the launcher's TLS front when TLS is on. */}}
{{- define "patent-classifier.probeScheme" -}}
{{- if .Values.tls.secret }}HTTPS{{ else }}HTTP{{ end -}}
{{- end -}}

{{/* The records journal's folder in the container (an emptyDir or a claim: records.journal). */}}
{{- define "patent-classifier.journalPath" -}}
/var/lib/patent-classifier/journal
{{- end -}}

{{/* kube-prometheus-stack's Prometheus selects ServiceMonitors and PrometheusRules by release=<its release>. */}}
{{- define "patent-classifier.prometheusReleaseLabel" -}}
{{- with .Values.prometheusRelease }}
release: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The Secret holding the access token: the one auth.tokenSecret names, or the chart's own. */}}
{{- define "patent-classifier.tokenSecretName" -}}
{{- .Values.auth.tokenSecret | default (printf "%s-token" (include "patent-classifier.fullname" .)) -}}
{{- end -}}
