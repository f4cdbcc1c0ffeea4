{{/*
The values, checked and read once: GIE's inferencepool chart keys (inferenceExtension.*,
inferencePool.*, provider.*, experimentalHttpRoute.*, inferenceObjectives) and llm-d's router chart
keys (router.*, httpRoute.*) become one settings map, which every template reads with
`include "llm-epp.cfg" . | fromYaml`. A key that is unknown, or known but not honoured, fails the
render with the key's path and the reason.
*/}}
{{- define "llm-epp.cfg" -}}
{{- $v := .Values -}}
{{- include "llm-epp.knownKeys" (dict "path" "values" "map" $v "keys" (list "inferenceExtension" "inferencePool" "provider" "experimentalHttpRoute" "inferenceObjectives" "router" "httpRoute" "gateway" "grafanaDashboard" "global")) -}}
{{- $ie := deepCopy ($v.inferenceExtension | default dict) -}}
{{- $ip := deepCopy ($v.inferencePool | default dict) -}}
{{- $route := deepCopy ($v.experimentalHttpRoute | default dict) -}}
{{- $objectives := $v.inferenceObjectives | default list -}}
{{- $create := true -}}
{{- $parsers := list -}}
{{- $healthPort := 9003 -}}
{{- $clusterDomain := "cluster.local" -}}
{{- $podAnnotations := dict -}}

{{- /* llm-d's router chart: router.* onto the GIE-shaped settings */ -}}
{{- with $v.router -}}
{{- $r := . -}}
{{- include "llm-epp.knownKeys" (dict "path" "router" "map" $r "keys" (list "epp" "modelServers" "inferencePool" "inferenceObjectives" "monitoring" "tracing" "latencyPredictor" "extraServicePorts" "metricsPort" "clusterDomain" "tokenizer" "proxy")) -}}
{{- with $r.tokenizer -}}
{{- if .enabled -}}
{{- fail "router.tokenizer.enabled is not supported by llm-epp: this chart runs no vLLM render sidecar; llm-epp's precise-prefix-cache plugins tokenize in-process with the model's tokenizer (docs/precise-routing.md)" -}}
{{- end -}}
{{- end -}}
{{- with $r.proxy -}}
{{- if .enabled -}}
{{- fail "router.proxy.enabled is not supported by llm-epp's chart: it deploys the EPP for a Gateway (or a standalone EPP with router.inferencePool.create=false); for an Envoy of your own in front of it, `epp envoy-config` prints its configuration (docs/kubernetes.md)" -}}
{{- end -}}
{{- end -}}
{{- with $r.epp -}}
{{- include "llm-epp.knownKeys" (dict "path" "router.epp" "map" . "keys" (list "replicas" "image" "extProcPort" "grpcHealthPort" "parsers" "metricsDataSource" "flags" "env" "pluginsConfigFile" "pluginsCustomConfig" "extraContainerPorts" "resources" "affinity" "tolerations" "podAnnotations" "volumes" "volumeMounts")) -}}
{{- range $k := list "replicas" "extProcPort" "flags" "env" "pluginsConfigFile" "pluginsCustomConfig" "extraContainerPorts" "resources" "affinity" "tolerations" "volumes" "volumeMounts" -}}
{{- if hasKey $r.epp $k -}}{{- $_ := set $ie $k (index $r.epp $k) -}}{{- end -}}
{{- end -}}
{{- /* key by key: mergeOverwrite would keep a default true over a user's false */ -}}
{{- range $k := list "image" "metricsDataSource" -}}
{{- if hasKey $r.epp $k -}}
{{- $m := deepCopy (index $ie $k | default dict) -}}
{{- range $sub, $val := (index $r.epp $k | default dict) -}}{{- $_ := set $m $sub $val -}}{{- end -}}
{{- $_ := set $ie $k $m -}}
{{- end -}}
{{- end -}}
{{- if .parsers -}}{{- $parsers = .parsers -}}{{- end -}}
{{- if .grpcHealthPort -}}{{- $healthPort = .grpcHealthPort -}}{{- end -}}
{{- if .podAnnotations -}}{{- $podAnnotations = .podAnnotations -}}{{- end -}}
{{- end -}}
{{- with $r.modelServers -}}
{{- include "llm-epp.knownKeys" (dict "path" "router.modelServers" "map" . "keys" (list "matchLabels" "type" "protocol" "targetPorts" "targetPortNumber")) -}}
{{- if hasKey . "matchLabels" -}}{{- $_ := set $ip "modelServers" (dict "matchLabels" .matchLabels) -}}{{- end -}}
{{- if hasKey . "type" -}}{{- $_ := set $ip "modelServerType" .type -}}{{- end -}}
{{- if hasKey . "protocol" -}}{{- $_ := set $ip "modelServerProtocol" .protocol -}}{{- end -}}
{{- if hasKey . "targetPorts" -}}{{- $_ := set $ip "targetPorts" .targetPorts -}}{{- end -}}
{{- if hasKey . "targetPortNumber" -}}{{- $_ := set $ip "targetPortNumber" .targetPortNumber -}}{{- end -}}
{{- end -}}
{{- with $r.inferencePool -}}
{{- include "llm-epp.knownKeys" (dict "path" "router.inferencePool" "map" . "keys" (list "create" "failureMode")) -}}
{{- if hasKey . "create" -}}{{- $create = .create -}}{{- end -}}
{{- if hasKey . "failureMode" -}}{{- $_ := set $ie "failureMode" .failureMode -}}{{- end -}}
{{- end -}}
{{- if hasKey $r "inferenceObjectives" -}}{{- $objectives = $r.inferenceObjectives | default list -}}{{- end -}}
{{- range $k := list "monitoring" "tracing" "latencyPredictor" -}}
{{- if hasKey $r $k -}}{{- $_ := set $ie $k (mergeOverwrite (deepCopy (index $ie $k | default dict)) (index $r $k)) -}}{{- end -}}
{{- end -}}
{{- if hasKey $r "extraServicePorts" -}}{{- $_ := set $ie "extraServicePorts" $r.extraServicePorts -}}{{- end -}}
{{- if hasKey $r "metricsPort" -}}{{- $_ := set $ie "metricsPort" $r.metricsPort -}}{{- end -}}
{{- if $r.clusterDomain -}}{{- $clusterDomain = $r.clusterDomain -}}{{- end -}}
{{- end -}}
{{- with $v.httpRoute -}}
{{- include "llm-epp.knownKeys" (dict "path" "httpRoute" "map" . "keys" (list "create" "inferenceGatewayName" "inferenceGatewayNamespace" "requestTimeout" "baseModel" "headerMatches")) -}}
{{- range $k, $val := . -}}
{{- $_ := set $route (ternary "enabled" $k (eq $k "create")) $val -}}
{{- end -}}
{{- end -}}

{{- /* inferenceExtension */ -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferenceExtension" "map" $ie "keys" (list "replicas" "image" "extProcPort" "metricsPort" "failureMode" "env" "pluginsConfigFile" "pluginsCustomConfig" "extraContainerPorts" "extraServicePorts" "flags" "affinity" "tolerations" "resources" "sidecar" "monitoring" "tracing" "latencyPredictor" "metricsDataSource" "volumes" "volumeMounts" "activeActive")) -}}
{{- $replicas := int (hasKey $ie "replicas" | ternary $ie.replicas 1) -}}
{{- if lt $replicas 1 -}}{{- fail (printf "inferenceExtension.replicas: expected 1 or more, got %v" $ie.replicas) -}}{{- end -}}
{{- $img := $ie.image | default dict -}}
{{- /* hub and name: the spelling of GIE's chart before v1.2, which llm-d's older guides use */ -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferenceExtension.image" "map" $img "keys" (list "registry" "repository" "tag" "pullPolicy" "hub" "name")) -}}
{{- $repo := required "inferenceExtension.image.repository is required" ($img.name | default $img.repository) -}}
{{- $registry := $img.hub | default $img.registry -}}
{{- range $foreign := list "gateway-api-inference-extension/epp" "llm-d-router-endpoint-picker" "llm-d-inference-scheduler" -}}
{{- if contains $foreign $repo -}}
{{- fail (printf "inferenceExtension.image.repository %q is the reference EPP's image: this chart runs llm-epp (its flags and config differ); remove the image block or name an llm-epp image" $repo) -}}
{{- end -}}
{{- end -}}
{{- $image := printf "%s:%s" $repo (toString ($img.tag | default "latest")) -}}
{{- if $registry -}}{{- $image = printf "%s/%s" $registry $image -}}{{- end -}}
{{- $failureMode := $ie.failureMode | default "FailOpen" -}}
{{- if eq $failureMode "FailClosed" -}}
{{- fail "inferenceExtension.failureMode (router.inferencePool.failureMode): FailClosed is spelled FailClose in the InferencePool API" -}}
{{- end -}}
{{- if not (has $failureMode (list "FailOpen" "FailClose")) -}}
{{- fail (printf "inferenceExtension.failureMode: expected FailOpen or FailClose, got %q" $failureMode) -}}
{{- end -}}
{{- $extProcPort := int ($ie.extProcPort | default 9002) -}}
{{- $metricsPort := int ($ie.metricsPort | default 9090) -}}
{{- $env := list -}}
{{- if kindIs "map" $ie.env -}}
{{- range $k, $val := $ie.env -}}{{- $env = append $env (dict "name" $k "value" (toString $val)) -}}{{- end -}}
{{- else if $ie.env -}}
{{- $env = $ie.env -}}
{{- end -}}

{{- /* monitoring */ -}}
{{- $mon := $ie.monitoring | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferenceExtension.monitoring" "map" $mon "keys" (list "interval" "prometheus" "gke" "provider")) -}}
{{- include "llm-epp.refusedKeys" (dict "path" "inferenceExtension.monitoring" "map" $mon "refused" (dict "gke" "GKE's PodMonitoring is not rendered (provider gke is refused too); use monitoring.prometheus with the Prometheus Operator")) -}}
{{- with $mon.provider -}}
{{- include "llm-epp.knownKeys" (dict "path" "router.monitoring.provider" "map" . "keys" (list "name" "gmp" "prometheusoperator")) -}}
{{- if and .name (ne (lower .name) "prometheusoperator") -}}
{{- fail (printf "router.monitoring.provider.name %q is not supported by llm-epp: only prometheusoperator (a ServiceMonitor); Google Managed Prometheus needs the GKE objects this chart refuses" .name) -}}
{{- end -}}
{{- end -}}
{{- $prom := $mon.prometheus | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferenceExtension.monitoring.prometheus" "map" $prom "keys" (list "enabled" "auth" "extraLabels")) -}}
{{- $auth := $prom.auth | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferenceExtension.monitoring.prometheus.auth" "map" $auth "keys" (list "enabled" "secretName")) -}}
{{- include "llm-epp.refusedKeys" (dict "path" "inferenceExtension.monitoring.prometheus.auth" "map" $auth "refused" (dict "secretName" "llm-epp's /metrics has no authentication, so there is no token Secret to name")) -}}
{{- if $auth.enabled -}}
{{- fail "inferenceExtension.monitoring.prometheus.auth.enabled=true is not supported by llm-epp: its /metrics endpoint has no authentication (restrict it with a NetworkPolicy); set it to false" -}}
{{- end -}}

{{- /* tracing */ -}}
{{- $tr := $ie.tracing | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferenceExtension.tracing" "map" $tr "keys" (list "enabled" "otelExporterEndpoint" "sampling")) -}}
{{- $sampling := $tr.sampling | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferenceExtension.tracing.sampling" "map" $sampling "keys" (list "sampler" "samplerArg")) -}}
{{- $sampler := $sampling.sampler | default "parentbased_traceidratio" -}}
{{- if ne $sampler "parentbased_traceidratio" -}}
{{- fail (printf "inferenceExtension.tracing.sampling.sampler %q is not supported: only parentbased_traceidratio (as in GIE's chart)" $sampler) -}}
{{- end -}}
{{- $ratio := toString (hasKey $sampling "samplerArg" | ternary $sampling.samplerArg "0.1") -}}
{{- if not (regexMatch "^(0(\\.[0-9]+)?|1(\\.0+)?|\\.[0-9]+)$" $ratio) -}}
{{- fail (printf "inferenceExtension.tracing.sampling.samplerArg: expected a ratio from 0 to 1, got %q" $ratio) -}}
{{- end -}}
{{- $tracing := $tr.enabled | default false -}}

{{- /* latency predictor: the profile is honoured, the sidecars are not needed */ -}}
{{- $lp := $ie.latencyPredictor | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferenceExtension.latencyPredictor" "map" $lp "keys" (list "enabled" "trainingServer" "predictionServers" "eppEnv")) -}}
{{- include "llm-epp.refusedKeys" (dict "path" "inferenceExtension.latencyPredictor" "map" $lp "refused" (dict "trainingServer" "llm-epp fits its latency model in-process (docs/latency-model.md): there is no training server" "predictionServers" "llm-epp predicts latency in-process (docs/latency-model.md): there are no prediction servers" "eppEnv" "those variables configure the reference EPP's client of the prediction servers, which llm-epp does not have")) -}}

{{- /* metrics data source */ -}}
{{- $mds := $ie.metricsDataSource | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferenceExtension.metricsDataSource" "map" $mds "keys" (list "scheme" "path" "insecureSkipVerify")) -}}
{{- $scheme := $mds.scheme | default "http" -}}
{{- if not (has $scheme (list "http" "https")) -}}
{{- fail (printf "inferenceExtension.metricsDataSource.scheme: expected http or https, got %q" $scheme) -}}
{{- end -}}
{{- $mpath := $mds.path | default "/metrics" -}}
{{- $skipVerify := hasKey $mds "insecureSkipVerify" | ternary $mds.insecureSkipVerify true -}}

{{- /* sidecar */ -}}
{{- $sc := $ie.sidecar | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferenceExtension.sidecar" "map" $sc "keys" (list "enabled" "name" "image" "imagePullPolicy" "command" "args" "env" "ports" "livenessProbe" "readinessProbe" "resources" "volumeMounts" "volumes" "configMap" "configMapData")) -}}
{{- include "llm-epp.refusedKeys" (dict "path" "inferenceExtension.sidecar" "map" $sc "refused" (dict "configMapData" "GIE's chart lists it but renders sidecar.configMap.{name,data}; use that")) -}}
{{- if $sc.enabled -}}
{{- $_ := required "inferenceExtension.sidecar.name is required when the sidecar is enabled" $sc.name -}}
{{- $_ := required "inferenceExtension.sidecar.image is required when the sidecar is enabled" $sc.image -}}
{{- with $sc.configMap -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferenceExtension.sidecar.configMap" "map" . "keys" (list "name" "data")) -}}
{{- $_ := required "inferenceExtension.sidecar.configMap.name is required with sidecar.configMap" .name -}}
{{- end -}}
{{- end -}}

{{- /* inferencePool */ -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferencePool" "map" $ip "keys" (list "targetPorts" "targetPortNumber" "modelServerType" "modelServerProtocol" "parser" "apiVersion" "modelServers")) -}}
{{- $apiVersion := $ip.apiVersion | default "inference.networking.k8s.io/v1" -}}
{{- if ne $apiVersion "inference.networking.k8s.io/v1" -}}
{{- fail (printf "inferencePool.apiVersion %q is not supported: only inference.networking.k8s.io/v1 (as in GIE's chart)" $apiVersion) -}}
{{- end -}}
{{- $ms := $ip.modelServers | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferencePool.modelServers" "map" $ms "keys" (list "matchLabels")) -}}
{{- if not $ms.matchLabels -}}
{{- fail "inferencePool.modelServers.matchLabels (router.modelServers.matchLabels) is required: the labels of the model-server pods" -}}
{{- end -}}
{{- $targetPorts := list -}}
{{- range $i, $p := ($ip.targetPorts | default list) -}}
{{- include "llm-epp.knownKeys" (dict "path" (printf "inferencePool.targetPorts[%d]" $i) "map" $p "keys" (list "number")) -}}
{{- $n := int $p.number -}}
{{- if or (lt $n 1) (gt $n 65535) -}}{{- fail (printf "inferencePool.targetPorts[%d].number: expected a port from 1 to 65535, got %v" $i $p.number) -}}{{- end -}}
{{- $targetPorts = append $targetPorts $n -}}
{{- end -}}
{{- if and (not $targetPorts) $ip.targetPortNumber -}}{{- $targetPorts = list (int $ip.targetPortNumber) -}}{{- end -}}
{{- if or (lt (len $targetPorts) 1) (gt (len $targetPorts) 8) -}}
{{- fail (printf "inferencePool.targetPorts: expected 1 to 8 ports, got %d" (len $targetPorts)) -}}
{{- end -}}
{{- $serverType := $ip.modelServerType | default "vllm" -}}
{{- if not (has $serverType (list "vllm" "sglang" "triton-tensorrt-llm" "trtllm-serve" "triton")) -}}
{{- fail (printf "inferencePool.modelServerType %q: expected vllm, sglang, triton-tensorrt-llm, trtllm-serve or triton" $serverType) -}}
{{- end -}}
{{- $protocol := $ip.modelServerProtocol | default "http" -}}
{{- if eq $protocol "grpc" -}}
{{- fail "inferencePool.modelServerProtocol grpc is not supported by llm-epp: it speaks HTTP/JSON to model servers, not vLLM's gRPC API; use http with vLLM's OpenAI-compatible server" -}}
{{- end -}}
{{- if ne $protocol "http" -}}
{{- fail (printf "inferencePool.modelServerProtocol: expected http, got %q" $protocol) -}}
{{- end -}}
{{- if $ip.parser -}}{{- $parsers = list $ip.parser -}}{{- end -}}
{{- if and (not $parsers) (eq $serverType "triton") -}}{{- $parsers = list "passthrough-parser" -}}{{- end -}}
{{- range $p := $parsers -}}
{{- if eq $p "vllmgrpc-parser" -}}
{{- fail "parser vllmgrpc-parser is not supported by llm-epp: it speaks HTTP/JSON to model servers, not vLLM's gRPC API; use openai-parser" -}}
{{- end -}}
{{- if not (has $p (list "openai-parser" "anthropic-parser" "vllmhttp-parser" "sglanghttp-parser" "passthrough-parser")) -}}
{{- fail (printf "parser %q: expected openai-parser, anthropic-parser, vllmhttp-parser, sglanghttp-parser or passthrough-parser" $p) -}}
{{- end -}}
{{- end -}}

{{- /* provider */ -}}
{{- $pv := $v.provider | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "provider" "map" $pv "keys" (list "name" "gke" "istio")) -}}
{{- $provider := lower ($pv.name | default "none") -}}
{{- if eq $provider "gke" -}}
{{- fail "provider.name gke is not supported by llm-epp's chart: GKE's load balancer calls the EPP over TLS with its own health checks and backend policies, which have not been tried with llm-epp; use istio, kgateway, agentgateway, envoy-gateway, nginx-gateway-fabric or none" -}}
{{- end -}}
{{- if not (has $provider (list "none" "istio" "kgateway" "agentgateway" "envoy-gateway" "nginx-gateway-fabric")) -}}
{{- fail (printf "provider.name %q: expected none, istio, kgateway, agentgateway, envoy-gateway or nginx-gateway-fabric" $pv.name) -}}
{{- end -}}
{{- $gkeSet := false -}}
{{- range $k, $val := ($pv.gke | default dict) -}}
{{- if and $val (ne (toString $val) "map[]") -}}{{- $gkeSet = true -}}{{- end -}}
{{- end -}}
{{- if $gkeSet -}}{{- fail "provider.gke is not supported: the gke provider is refused (see provider.name)" -}}{{- end -}}
{{- $istio := $pv.istio | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "provider.istio" "map" $istio "keys" (list "destinationRule")) -}}
{{- $dr := $istio.destinationRule | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "provider.istio.destinationRule" "map" $dr "keys" (list "host" "trafficPolicy")) -}}
{{- $trafficPolicy := deepCopy ($dr.trafficPolicy | default dict) -}}
{{- include "llm-epp.refusedKeys" (dict "path" "provider.istio.destinationRule.trafficPolicy" "map" $trafficPolicy "refused" (dict "tls" "the chart sets it from the EPP's serving mode (plaintext: DISABLE; flags.secure-serving: SIMPLE)")) -}}
{{- if not $trafficPolicy.connectionPool -}}
{{- $_ := set $trafficPolicy "connectionPool" (dict "http" (dict "http2MaxRequests" 10000 "maxRequestsPerConnection" 0)) -}}
{{- end -}}

{{- /* flags */ -}}
{{- $serveFlags := include "llm-epp.serveFlags" . | fromYaml -}}
{{- $reserved := include "llm-epp.reservedFlags" . | fromYaml -}}
{{- $foreign := include "llm-epp.foreignFlags" . | fromYaml -}}
{{- $flags := $ie.flags | default dict -}}
{{- if not (kindIs "map" $flags) -}}{{- fail "inferenceExtension.flags: expected a mapping of flag name to value" -}}{{- end -}}
{{- $leader := gt $replicas 1 -}}
{{- $secure := eq $provider "nginx-gateway-fabric" -}}
{{- $logFormat := "json" -}}
{{- $verbosity := 0 -}}
{{- $gracePeriod := "120" -}}
{{- $userArgs := list -}}
{{- range $k, $val := $flags -}}
{{- $path := printf "inferenceExtension.flags.%s" $k -}}
{{- if hasKey $reserved $k -}}
{{- fail (printf "%s: %s" $path (index $reserved $k)) -}}
{{- else if hasKey $foreign $k -}}
{{- fail (printf "%s: llm-epp has no flag --%s: %s" $path $k (index $foreign $k)) -}}
{{- else if eq $k "zap-encoder" -}}
{{- if hasKey $flags "log-format" -}}{{- fail (printf "%s: give zap-encoder or log-format, not both" $path) -}}{{- end -}}
{{- if eq (toString $val) "json" -}}{{- $logFormat = "json" -}}{{- else if eq (toString $val) "console" -}}{{- $logFormat = "text" -}}
{{- else -}}{{- fail (printf "%s: expected json or console, got %v" $path $val) -}}{{- end -}}
{{- else if eq $k "metrics-endpoint-auth" -}}
{{- if ne (toString $val) "false" -}}
{{- fail (printf "%s=%v is not supported: llm-epp's /metrics endpoint has no authentication (restrict it with a NetworkPolicy)" $path $val) -}}
{{- end -}}
{{- else if not (hasKey $serveFlags $k) -}}
{{- fail (printf "%s: `epp serve` has no flag --%s (its flags: docs/configuration.md; GIE's and llm-d's: docs/helm.md)" $path $k) -}}
{{- else -}}
{{- $kind := index $serveFlags $k -}}
{{- $text := include "llm-epp.scalar" $val -}}
{{- if and (ne $kind "value") (not (has $text (list "true" "false"))) -}}
{{- fail (printf "%s: expected true or false, got %v" $path $val) -}}
{{- end -}}
{{- if eq $k "ha-enable-leader-election" -}}{{- $leader = eq $text "true" -}}
{{- else if eq $k "secure-serving" -}}{{- $secure = eq $text "true" -}}
{{- else if eq $k "tracing" -}}{{- $tracing = eq $text "true" -}}
{{- else if eq $k "log-format" -}}{{- $logFormat = $text -}}
{{- else if eq $k "grpc-health-port" -}}{{- $healthPort = int $val -}}
{{- else if eq $k "metrics-port" -}}{{- $metricsPort = int $val -}}
{{- else if eq $k "grace-period" -}}{{- $gracePeriod = $text -}}
{{- else if eq $k "v" -}}
{{- if not (regexMatch "^[0-9]+$" $text) -}}{{- fail (printf "%s: expected a verbosity level (0-5), got %v" $path $val) -}}{{- end -}}
{{- /* GIE's levels: 2 default, 3 verbose, 4 debug, 5 trace; llm-epp's: 0 info, 1 debug (every request with its scores) */ -}}
{{- $verbosity = ternary 1 0 (ge (int $text) 4) -}}
{{- else if eq $kind "switch" -}}
{{- if eq $text "true" -}}{{- $userArgs = append $userArgs (printf "--%s" $k) -}}{{- end -}}
{{- else -}}
{{- $userArgs = append $userArgs (printf "--%s=%s" $k $text) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* active-active: replicas > 1 without leader election all serve; by default they share picks and
in-flight load through the headless peers Service (as manifests/components/active-active does) */ -}}
{{- $activeActive := and (gt $replicas 1) (not $leader) -}}
{{- $aa := $ie.activeActive | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "inferenceExtension.activeActive" "map" $aa "keys" (list "share" "peerPort")) -}}
{{- if and $aa (not $activeActive) -}}
{{- if $leader -}}
{{- fail "inferenceExtension.activeActive: active-active peers and leader election exclude each other (`epp serve` refuses --peer-service with --ha-enable-leader-election): set inferenceExtension.flags.ha-enable-leader-election: false for replicas that all serve, or remove activeActive for active-passive HA" -}}
{{- else -}}
{{- fail (printf "inferenceExtension.activeActive needs inferenceExtension.replicas greater than 1 (active-active replicas), got %d" $replicas) -}}
{{- end -}}
{{- end -}}
{{- $share := true -}}
{{- if hasKey $aa "share" -}}
{{- if not (kindIs "bool" $aa.share) -}}{{- fail (printf "inferenceExtension.activeActive.share: expected true or false, got %v" $aa.share) -}}{{- end -}}
{{- $share = $aa.share -}}
{{- end -}}
{{- $share = and $activeActive $share -}}
{{- $peerPort := 9004 -}}
{{- if hasKey $aa "peerPort" -}}
{{- if not $share -}}
{{- fail "inferenceExtension.activeActive.peerPort is used only when the replicas share (activeActive.share: false turns the peer exchange off)" -}}
{{- end -}}
{{- $peerPort = int $aa.peerPort -}}
{{- if or (lt $peerPort 1) (gt $peerPort 65535) -}}{{- fail (printf "inferenceExtension.activeActive.peerPort: expected a port from 1 to 65535, got %v" $aa.peerPort) -}}{{- end -}}
{{- if has $peerPort (list $extProcPort (int $healthPort) $metricsPort) -}}
{{- fail (printf "inferenceExtension.activeActive.peerPort %d is already the EPP's ext_proc, health or metrics port" $peerPort) -}}
{{- end -}}
{{- end -}}

{{- /* the EPP's config files */ -}}
{{- $configs := dict -}}
{{- $ctx := dict "serverType" $serverType "parsers" $parsers "scheme" $scheme "path" $mpath "skipVerify" $skipVerify "latency" ($lp.enabled | default false) -}}
{{- $_ := set $configs "default-plugins.yaml" (include "llm-epp.defaultConfig" $ctx) -}}
{{- with $ie.pluginsCustomConfig -}}
{{- if not (kindIs "map" .) -}}{{- fail "inferenceExtension.pluginsCustomConfig: expected a mapping of file name to config" -}}{{- end -}}
{{- range $name, $text := . -}}
{{- if not (regexMatch "^[-._a-zA-Z0-9]+$" $name) -}}{{- fail (printf "inferenceExtension.pluginsCustomConfig: %q is not a ConfigMap key (letters, digits, - _ .)" $name) -}}{{- end -}}
{{- $_ := set $configs $name (kindIs "string" $text | ternary $text (toYaml $text)) -}}
{{- end -}}
{{- end -}}
{{- $configFile := $ie.pluginsConfigFile | default "default-plugins.yaml" -}}
{{- if not (hasKey $configs $configFile) -}}
{{- fail (printf "inferenceExtension.pluginsConfigFile %q is not one of the chart's config files (%s): add it to pluginsCustomConfig" $configFile (join ", " (keys $configs | sortAlpha))) -}}
{{- end -}}

{{- /* the EPP's arguments */ -}}
{{- $args := list "serve" -}}
{{- if $create -}}
{{- $args = append $args (printf "--pool-name=%s" (include "llm-epp.pool" .)) -}}
{{- else -}}
{{- $sel := list -}}
{{- range $k, $val := $ms.matchLabels -}}{{- $sel = append $sel (printf "%s=%v" $k $val) -}}{{- end -}}
{{- $ports := list -}}
{{- range $p := $targetPorts -}}{{- $ports = append $ports (toString $p) -}}{{- end -}}
{{- $args = concat $args (list (printf "--endpoint-selector=%s" (join "," $sel)) (printf "--endpoint-target-ports=%s" (join "," $ports))) -}}
{{- end -}}
{{- $args = concat $args (list (printf "--config-file=/config/%s" $configFile) (printf "--grpc-port=%d" $extProcPort) (printf "--grpc-health-port=%d" (int $healthPort)) (printf "--metrics-port=%d" $metricsPort) (printf "--grace-period=%s" $gracePeriod)) -}}
{{- if ne $logFormat "text" -}}{{- $args = append $args (printf "--log-format=%s" $logFormat) -}}{{- end -}}
{{- if $verbosity -}}{{- $args = append $args "--v=1" -}}{{- end -}}
{{- if $leader -}}{{- $args = append $args "--ha-enable-leader-election" -}}{{- end -}}
{{- if $secure -}}{{- $args = append $args "--secure-serving" -}}{{- end -}}
{{- if $tracing -}}{{- $args = concat $args (list "--tracing" (printf "--tracing-sample-ratio=%s" $ratio)) -}}{{- end -}}
{{- if $share -}}{{- $args = concat $args (list (printf "--peer-service=%s-peers" (include "llm-epp.name" .)) (printf "--peer-port=%d" $peerPort)) -}}{{- end -}}
{{- /* drain before stopping: the gateways stop sending to a replica that reports NOT_SERVING */ -}}
{{- if and $activeActive (not (hasKey $flags "shutdown-delay")) -}}{{- $args = append $args "--shutdown-delay=5s" -}}{{- end -}}
{{- $args = concat $args $userArgs -}}

{{- /* objectives */ -}}
{{- if and $objectives (not $create) -}}
{{- fail "inferenceObjectives (router.inferenceObjectives) need the InferencePool: they cannot be set with router.inferencePool.create=false" -}}
{{- end -}}
{{- range $i, $o := $objectives -}}
{{- include "llm-epp.knownKeys" (dict "path" (printf "inferenceObjectives[%d]" $i) "map" $o "keys" (list "name" "priority")) -}}
{{- $_ := required (printf "inferenceObjectives[%d].name is required" $i) $o.name -}}
{{- end -}}

{{- /* route, gateway, dashboard */ -}}
{{- include "llm-epp.knownKeys" (dict "path" "experimentalHttpRoute" "map" $route "keys" (list "enabled" "inferenceGatewayName" "inferenceGatewayNamespace" "requestTimeout" "baseModel" "headerMatches")) -}}
{{- if and $route.enabled (not $create) -}}
{{- fail "experimentalHttpRoute (httpRoute) routes to the InferencePool: it cannot be created with router.inferencePool.create=false" -}}
{{- end -}}
{{- $gw := $v.gateway | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "gateway" "map" $gw "keys" (list "create" "className")) -}}
{{- $classes := dict "istio" "istio" "kgateway" "kgateway" "agentgateway" "agentgateway" "envoy-gateway" "envoy-gateway" "nginx-gateway-fabric" "nginx" -}}
{{- $className := $gw.className | default (index $classes $provider | default "") -}}
{{- if and $gw.create (not $className) -}}
{{- fail "gateway.create needs gateway.className, or a provider.name whose GatewayClass the chart knows" -}}
{{- end -}}
{{- $dash := $v.grafanaDashboard | default dict -}}
{{- include "llm-epp.knownKeys" (dict "path" "grafanaDashboard" "map" $dash "keys" (list "enabled" "labels")) -}}

{{- $out := dict "name" (include "llm-epp.name" .) "pool" (include "llm-epp.pool" .) -}}
{{- $_ := set $out "replicas" $replicas -}}
{{- $_ := set $out "leaderElection" $leader -}}
{{- $_ := set $out "activeActive" $activeActive -}}
{{- $_ := set $out "peers" (dict "enabled" $share "port" $peerPort "service" (printf "%s-peers" (include "llm-epp.name" .))) -}}
{{- $_ := set $out "image" $image -}}
{{- $_ := set $out "pullPolicy" ($img.pullPolicy | default "IfNotPresent") -}}
{{- $_ := set $out "extProcPort" $extProcPort -}}
{{- $_ := set $out "healthPort" (int $healthPort) -}}
{{- $_ := set $out "metricsPort" $metricsPort -}}
{{- $_ := set $out "failureMode" $failureMode -}}
{{- $_ := set $out "env" $env -}}
{{- $_ := set $out "args" $args -}}
{{- $_ := set $out "configs" $configs -}}
{{- $_ := set $out "secure" $secure -}}
{{- $_ := set $out "tracing" $tracing -}}
{{- $_ := set $out "otelEndpoint" ($tr.otelExporterEndpoint | default "http://localhost:4317") -}}
{{- $_ := set $out "extraContainerPorts" ($ie.extraContainerPorts | default list) -}}
{{- $_ := set $out "extraServicePorts" ($ie.extraServicePorts | default list) -}}
{{- $_ := set $out "volumes" ($ie.volumes | default list) -}}
{{- $_ := set $out "volumeMounts" ($ie.volumeMounts | default list) -}}
{{- $_ := set $out "affinity" ($ie.affinity | default dict) -}}
{{- $_ := set $out "tolerations" ($ie.tolerations | default list) -}}
{{- $_ := set $out "resources" ($ie.resources | default dict) -}}
{{- $_ := set $out "podAnnotations" $podAnnotations -}}
{{- $_ := set $out "sidecar" $sc -}}
{{- $_ := set $out "serviceMonitor" ($prom.enabled | default false) -}}
{{- $_ := set $out "monitoringInterval" ($mon.interval | default "10s") -}}
{{- $_ := set $out "monitoringLabels" ($prom.extraLabels | default dict) -}}
{{- $_ := set $out "createPool" $create -}}
{{- $_ := set $out "matchLabels" $ms.matchLabels -}}
{{- $_ := set $out "targetPorts" $targetPorts -}}
{{- $_ := set $out "provider" $provider -}}
{{- $_ := set $out "destinationRuleHost" ($dr.host | default (printf "%s.%s.svc.%s" (include "llm-epp.name" .) .Release.Namespace $clusterDomain)) -}}
{{- $_ := set $out "trafficPolicy" $trafficPolicy -}}
{{- $_ := set $out "route" $route -}}
{{- $_ := set $out "gateway" (dict "create" ($gw.create | default false) "className" $className "name" ($route.inferenceGatewayName | default "inference-gateway")) -}}
{{- $_ := set $out "dashboard" (dict "enabled" ($dash.enabled | default false) "labels" ($dash.labels | default dict)) -}}
{{- $_ := set $out "objectives" $objectives -}}
{{- toYaml $out -}}
{{- end -}}

{{/* The generated default-plugins.yaml: llm-epp's built-in default `best` (pickers/configs/best.yaml: the
latency model's cost), or llm-d's latency-predictor profile, with the model-server type, parsers and
metrics scrape of the values. The reference's default (queue 2, kv-cache 2, prefix 3) is a
pluginsCustomConfig away (docs/helm.md). */}}
{{- define "llm-epp.defaultConfig" -}}
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
{{- if .latency }}
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
{{- else }}
- type: approx-prefix-cache-producer
  parameters: {maxPrefixTokensToMatch: 131072}
- type: inflight-load-producer
- type: predicted-latency-producer
- type: latency-cost-scorer
  parameters: {slowdownWeight: 0.3}
{{- end }}
{{- if or (ne .scheme "http") (ne .path "/metrics") }}
- type: metrics-data-source
  parameters:
    scheme: {{ .scheme }}
    path: {{ .path | quote }}
    {{- if eq .scheme "https" }}
    insecureSkipVerify: {{ .skipVerify }}
    {{- end }}
{{- end }}
{{- if ne .serverType "vllm" }}
- type: core-metrics-extractor
  parameters:
    defaultEngine: {{ .serverType }}
{{- end }}
{{- range .parsers }}
- type: {{ . }}
{{- end }}
{{- if .latency }}
- type: predicted-latency-producer
- name: strict-affinity-filter
  type: prefix-cache-affinity-filter
  parameters:
    affinityThreshold: 0.99
    ttftSource: latencyPredictor
    maxTTFTPenaltyMs: 5000
- name: loose-affinity-filter
  type: prefix-cache-affinity-filter
  parameters:
    affinityThreshold: 0.80
    ttftSource: latencyPredictor
    maxTTFTPenaltyMs: 5000
- type: latency-scorer
- type: weighted-random-picker
- type: slo-headroom-tier-filter
- type: latency-slo-admitter
{{- else }}
- type: max-score-picker
{{- end }}
{{- if .parsers }}
requestHandler:
  parsers:
  {{- range .parsers }}
  - pluginRef: {{ . }}
  {{- end }}
{{- end }}
schedulingProfiles:
- name: default
  plugins:
{{- if .latency }}
  - pluginRef: predicted-latency-producer
  - pluginRef: strict-affinity-filter
  - pluginRef: slo-headroom-tier-filter
  - pluginRef: loose-affinity-filter
  - pluginRef: latency-scorer
  - pluginRef: weighted-random-picker
{{- else }}
  - pluginRef: latency-cost-scorer
    weight: 1
  - pluginRef: max-score-picker
{{- end }}
{{ end -}}
