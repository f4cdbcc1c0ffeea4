{{/*
The flags `epp serve` accepts, by how they are written: value (--name=value), bool (--name=true|false)
and switch (--name when true, left out when false). tests/unit/test_helm_chart.py keeps this table
equal to extproc/cli/main.py's parser.
*/}}
{{- define "llm-epp.serveFlags" -}}
grpc-port: value
grpc-health-port: value
metrics-port: value
bind-address: value
endpoints: value
pool-name: value
objectives: value
model-rewrites: value
pool-namespace: value
pool-group: value
endpoint-selector: value
endpoint-target-ports: value
kubeconfig: value
ha-enable-leader-election: bool
leader-election-lease-name: value
leader-election-namespace: value
leader-election-lease-duration: value
leader-election-renew-deadline: value
leader-election-retry-period: value
peers: value
peer-service: value
peer-port: value
replica-id: value
strategy: value
config-file: value
config-text: value
config-reload-interval: value
max-num-endpoints: value
refresh-metrics-interval: value
max-scrape-rate: value
metrics-staleness-threshold: value
max-body-bytes: value
max-request-headers: value
max-request-headers-kb: value
request-body-idle-timeout: value
explain-scores: switch
workers: value
grace-period: value
shutdown-delay: value
secure-serving: bool
cert-path: value
allow-experimental-plugins: bool
v: value
log-format: value
log-requests: switch
admin-port: value
admin-address: value
tracing: switch
tracing-sample-ratio: value
audit-sink: value
audit-file: value
audit-file-max-mb: value
audit-file-backups: value
audit-client-header: value
audit-prompt: value
audit-response: value
audit-excerpt-chars: value
audit-queue-size: value
{{- end -}}

{{/* Flags the chart sets from other values: giving them in flags would contradict those. */}}
{{- define "llm-epp.reservedFlags" -}}
pool-name: "the chart sets it to the release name, which names the InferencePool"
pool-namespace: "the EPP follows the pool in the release's namespace"
config-file: "set inferenceExtension.pluginsConfigFile (a file of the chart's ConfigMap)"
config-text: "put the config in inferenceExtension.pluginsCustomConfig and name it in pluginsConfigFile"
strategy: "the chart always loads a config file; put the config in inferenceExtension.pluginsCustomConfig"
endpoints: "the chart discovers the pool's pods from the Kubernetes API"
endpoint-selector: "set router.inferencePool.create=false with router.modelServers.matchLabels"
endpoint-target-ports: "set inferencePool.targetPorts (router.modelServers.targetPorts)"
grpc-port: "set inferenceExtension.extProcPort, which the Service and the InferencePool use too"
tracing-sample-ratio: "set inferenceExtension.tracing.sampling.samplerArg"
peers: "with replicas > 1 and ha-enable-leader-election false the replicas share through the chart's headless peers Service (--peer-service); inferenceExtension.activeActive sets it (docs/helm.md)"
peer-service: "the chart sets it to its headless peers Service when the replicas share (inferenceExtension.activeActive.share)"
peer-port: "set inferenceExtension.activeActive.peerPort, which the container port and the peers Service use too"
replica-id: "every replica of the Deployment would get the same id; each uses its pod name ($POD_NAME)"
{{- end -}}

{{/* Flags of GIE's or llm-d's EPP that llm-epp does not have, and why. */}}
{{- define "llm-epp.foreignFlags" -}}
total-queued-requests-metric: "metric names come from the EndpointPickerConfig's dataLayer (core-metrics-extractor engine mappings) or inferencePool.modelServerType"
total-running-requests-metric: "metric names come from the EndpointPickerConfig's dataLayer (core-metrics-extractor engine mappings) or inferencePool.modelServerType"
kv-cache-usage-percentage-metric: "metric names come from the EndpointPickerConfig's dataLayer (core-metrics-extractor engine mappings) or inferencePool.modelServerType"
lora-info-metric: "metric names come from the EndpointPickerConfig's dataLayer (core-metrics-extractor engine mappings) or inferencePool.modelServerType"
cache-info-metric: "metric names come from the EndpointPickerConfig's dataLayer (core-metrics-extractor engine mappings) or inferencePool.modelServerType"
model-server-metrics-port: "the scrape is set by inferenceExtension.metricsDataSource or the config's metrics-data-source (port parameter)"
model-server-metrics-path: "set inferenceExtension.metricsDataSource.path"
model-server-metrics-scheme: "set inferenceExtension.metricsDataSource.scheme"
model-server-metrics-https-insecure-skip-verify: "set inferenceExtension.metricsDataSource.insecureSkipVerify"
refresh-prometheus-metrics-interval: "llm-epp computes its own metrics when they are scraped"
enable-pprof: "llm-epp is not a Go program; its live views are on --admin-port (docs/operating.md)"
kube-api-qps: "llm-epp's Kubernetes client has no client-side rate limiter to set"
kube-api-burst: "llm-epp's Kubernetes client has no client-side rate limiter to set"
health-checking: "llm-epp always serves gRPC health on grpc-health-port"
zap-devel: "set v (4 or more: debug) and zap-encoder or log-format"
zap-log-level: "set v (4 or more: debug)"
zap-stacktrace-level: "llm-epp logs tracebacks with errors"
zap-time-encoding: "llm-epp's log times are ISO 8601"
lora-adapter-max-replicas: "not a flag of llm-epp"
{{- end -}}
