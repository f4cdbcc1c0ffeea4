{{/* Names follow GIE's inferencepool chart: the pool is the release, the EPP `<release>-epp`. */}}
{{- define "llm-epp.pool" -}}
{{- .Release.Name | lower | trim | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llm-epp.name" -}}
{{- printf "%s-epp" (.Release.Name | lower | trim | trunc 40 | trimSuffix "-") -}}
{{- end -}}

{{- define "llm-epp.labels" -}}
app.kubernetes.io/name: {{ include "llm-epp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: llm-epp
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "llm-epp.selectorLabels" -}}
app: {{ include "llm-epp.name" . }}
{{- end -}}

{{/* A values scalar as a flag value: whole numbers without the exponent JSON floats print with. */}}
{{- define "llm-epp.scalar" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* fail unless every key of .map is one of .keys: {path, map, keys}. */}}
{{- define "llm-epp.knownKeys" -}}
{{- if and .map (not (kindIs "map" .map)) -}}
{{- fail (printf "%s: expected a mapping, got %v" .path .map) -}}
{{- end -}}
{{- range $k, $_ := (.map | default dict) -}}
{{- if not (has $k $.keys) -}}
{{- fail (printf "%s.%s: not a key this chart knows (the keys of GIE's inferencepool chart v1.5 and llm-d's router chart it honours are in docs/helm.md; known here: %s)" $.path $k (join ", " $.keys)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* fail when a key of .refused (key -> reason) is set in .map: {path, map, refused}. */}}
{{- define "llm-epp.refusedKeys" -}}
{{- range $k, $why := .refused -}}
{{- if hasKey ($.map | default dict) $k -}}
{{- fail (printf "%s.%s is not supported by llm-epp: %s" $.path $k $why) -}}
{{- end -}}
{{- end -}}
{{- end -}}
