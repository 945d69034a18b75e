{{/* Names, labels, the rendered configuration and the checks on values. */}}

{{- define "sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sidecar.fullname" -}}
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

{{- define "sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end }}

{{- define "sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sidecar.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "sidecar.appImage" -}}
{{- if .Values.app.image.tag }}
{{- printf "%s:%s" .Values.app.image.repository .Values.app.image.tag }}
{{- else }}
{{- .Values.app.image.repository }}
{{- end }}
{{- end }}

{{/* "true" when the sidecar runs as a native sidecar (an init container with restartPolicy: Always). */}}
{{- define "sidecar.native" -}}
{{- $native := .Values.nativeSidecar | toString }}
{{- if ne .Values.mode "sidecar" }}
{{- else if eq $native "true" }}true
{{- else if and (eq $native "auto") (semverCompare ">=1.29-0" .Capabilities.KubeVersion.Version) }}true
{{- end }}
{{- end }}

{{/* Where the mounted files are; the rendered configuration names these paths. */}}
{{- define "sidecar.paths" -}}
{{- dict "config" "/etc/sidecar/config" "tls" "/etc/sidecar/tls" "trust" "/etc/sidecar/trust" "crl" "/etc/sidecar/crl" "agent" "/etc/sidecar/agent" "redis" "/etc/sidecar/redis" "redisTLS" "/etc/sidecar/redis-tls" "session" "/etc/sidecar/session" | toJson }}
{{- end }}

{{- define "sidecar.upstream" -}}
{{- if eq .Values.mode "gateway" }}
{{- .Values.gateway.upstream }}
{{- else }}
{{- printf "http://127.0.0.1:%d" (int .Values.app.port) }}
{{- end }}
{{- end }}

{{/*
The configuration the sidecar reads: `config` as given, with the keys the chart owns filled in.
A key the chart owns that `config` sets to something else is an error, not silently replaced.
*/}}
{{- define "sidecar.configYaml" -}}
{{- include "sidecar.validate" . }}
{{- $paths := include "sidecar.paths" . | fromJson }}
{{- $user := .Values.config | default dict }}
{{- $tls := dict "certificate" (printf "%s/tls.crt" $paths.tls) "key" (printf "%s/tls.key" $paths.tls) }}
{{- if or .Values.clientCA.secretName .Values.clientCA.configMapName }}
{{- $anchors := list }}
{{- range .Values.clientCA.keys }}
{{- $anchors = append $anchors (printf "%s/%s" $paths.trust .) }}
{{- end }}
{{- $_ := set $tls "client_ca" $anchors }}
{{- end }}
{{- if or .Values.crl.secretName .Values.crl.configMapName }}
{{- /* the folder: every CRL file in the Secret or ConfigMap, as the kubelet updates it */}}
{{- $_ := set $tls "crl" (list $paths.crl) }}
{{- end }}
{{- $owned := dict
  "listen" (dict "port" (int .Values.ports.https))
  "admin" (dict "port" (int .Values.ports.admin))
  "tls" $tls
  "upstream" (dict "url" (include "sidecar.upstream" .))
  "shutdown" (dict "drain_delay" .Values.shutdown.drainDelaySeconds "grace_period" .Values.shutdown.gracePeriodSeconds) }}
{{- $agent := dict }}
{{- if .Values.identityPlus.agentSecretName }}
{{- $agent = dict "certificate" (printf "%s/%s" $paths.agent .Values.identityPlus.certificateKey) "key" (printf "%s/%s" $paths.agent .Values.identityPlus.keyKey) }}
{{- end }}
{{- if .Values.identityPlus.sessionKeys.secretName }}
{{- $keys := list }}
{{- range .Values.identityPlus.sessionKeys.keys }}
{{- $keys = append $keys (printf "%s/%s" $paths.session .) }}
{{- end }}
{{- $_ := set $agent "session_keys" $keys }}
{{- end }}
{{- if $agent }}
{{- $_ := set $owned "identity" (dict "identityplus" $agent) }}
{{- end }}
{{- range $section, $keys := $owned }}
{{- $given := get $user $section }}
{{- if and $given (kindIs "map" $given) }}
{{- range $key, $value := $keys }}
{{- if kindIs "map" $value }}
{{- $inner := get $given $key }}
{{- if and $inner (kindIs "map" $inner) }}
{{- range $k, $v := $value }}
{{- if and (hasKey $inner $k) (ne (toJson (get $inner $k)) (toJson $v)) }}
{{- fail (printf "config.%s.%s.%s is set by the chart to %s (%s); leave it out of config" $section $key $k (toJson $v) (include "sidecar.ownedBy" (printf "%s.%s.%s" $section $key $k))) }}
{{- end }}
{{- end }}
{{- end }}
{{- else if and (hasKey $given $key) (ne (toJson (get $given $key)) (toJson $value)) }}
{{- fail (printf "config.%s.%s is set by the chart to %s (%s); leave it out of config" $section $key (toJson $value) (include "sidecar.ownedBy" (printf "%s.%s" $section $key))) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $defaults := dict "admin" (dict "host" "0.0.0.0") }}
{{- $config := mustMergeOverwrite (dict) $defaults (deepCopy $user) $owned }}
{{- with (include "sidecar.sharedCache" . | fromJson) }}
{{- /* identity.cache.shared: the URL and the mounted files, one level deeper than $owned
reaches; the other keys (key_prefix, timeout) stay config's. */}}
{{- $identity := get $config "identity" | default dict }}
{{- $cache := get $identity "cache" | default dict }}
{{- $given := get $cache "shared" | default dict }}
{{- range $k, $v := . }}
{{- if and (hasKey $given $k) (ne (toJson (get $given $k)) (toJson $v)) }}
{{- fail (printf "config.identity.cache.shared.%s is set by the chart to %s (from sharedCache); leave it out of config" $k (toJson $v)) }}
{{- end }}
{{- end }}
{{- $_ := set $cache "shared" (mustMergeOverwrite (deepCopy $given) .) }}
{{- $_ := set $identity "cache" $cache }}
{{- $_ := set $config "identity" $identity }}
{{- end }}
{{- include "sidecar.trustReports" (dict "config" $config "values" .Values.trustReports) }}
{{- if .Values.serviceMonitor.enabled }}
{{- /* The admin listener refuses a Host it does not know (DNS rebinding): a scrape through
the -metrics Service by name must be known, besides the names config gives. */}}
{{- $admin := get $config "admin" }}
{{- $given := get $admin "server_names" | default list }}
{{- if kindIs "slice" $given }}
{{- $_ := set $admin "server_names" (concat (include "sidecar.metricsNames" . | fromJsonArray) $given | uniq) }}
{{- end }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* identity.cache.shared as sharedCache sets it (JSON; {} when sharedCache.url is empty). */}}
{{- define "sidecar.sharedCache" -}}
{{- $paths := include "sidecar.paths" . | fromJson }}
{{- $v := .Values.sharedCache }}
{{- $shared := dict }}
{{- if $v.url }}
{{- $_ := set $shared "url" $v.url }}
{{- if $v.username }}
{{- $_ := set $shared "username" $v.username }}
{{- end }}
{{- if $v.passwordSecret.name }}
{{- $_ := set $shared "password_file" (printf "%s/%s" $paths.redis $v.passwordSecret.key) }}
{{- end }}
{{- if $v.tls.secretName }}
{{- if $v.tls.caKey }}
{{- $_ := set $shared "ca" (printf "%s/%s" $paths.redisTLS $v.tls.caKey) }}
{{- end }}
{{- if $v.tls.certificateKey }}
{{- $_ := set $shared "certificate" (printf "%s/%s" $paths.redisTLS $v.tls.certificateKey) }}
{{- $_ := set $shared "key" (printf "%s/%s" $paths.redisTLS $v.tls.keyKey) }}
{{- end }}
{{- end }}
{{- end }}
{{- $shared | toJson }}
{{- end }}

{{/*
trustReports, written into the configuration: identity.identityplus.reports (enabled and
settings), headers.reports and admin.reports_from. A key that config sets too is an error.
*/}}
{{- define "sidecar.trustReports" -}}
{{- $config := .config }}
{{- $tr := .values }}
{{- if or $tr.enabled $tr.settings }}
{{- if not (hasKey $config "identity") }}{{- $_ := set $config "identity" dict }}{{- end }}
{{- $identity := get $config "identity" }}
{{- if not (get $identity "identityplus") }}{{- $_ := set $identity "identityplus" dict }}{{- end }}
{{- $ip := get $identity "identityplus" }}
{{- if hasKey $ip "reports" }}
{{- fail "config.identity.identityplus.reports and trustReports both set trust reports: use trustReports (or config alone)" }}
{{- end }}
{{- $_ := set $ip "reports" (merge (dict "enabled" $tr.enabled) (deepCopy ($tr.settings | default dict))) }}
{{- end }}
{{- if $tr.headers }}
{{- if not (hasKey $config "headers") }}{{- $_ := set $config "headers" dict }}{{- end }}
{{- $headers := get $config "headers" }}
{{- if hasKey $headers "reports" }}
{{- fail "config.headers.reports and trustReports.headers both name the report headers: use one" }}
{{- end }}
{{- $_ := set $headers "reports" (deepCopy $tr.headers) }}
{{- end }}
{{- if $tr.from }}
{{- $admin := get $config "admin" }}
{{- if hasKey $admin "reports_from" }}
{{- fail "config.admin.reports_from and trustReports.from both list who may send reports: use one" }}
{{- end }}
{{- $_ := set $admin "reports_from" $tr.from }}
{{- end }}
{{- end }}

{{/* The Service of the admin port (serviceMonitor), and the DNS names it is reached by. */}}
{{- define "sidecar.metricsService" -}}
{{- printf "%s-metrics" (include "sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sidecar.metricsNames" -}}
{{- $svc := include "sidecar.metricsService" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) | toJson }}
{{- end }}

{{- define "sidecar.ownedBy" -}}
{{- $from := dict
  "listen.port" "from ports.https"
  "admin.port" "from ports.admin"
  "tls.certificate" "the Secret tls.secretName, mounted"
  "tls.key" "the Secret tls.secretName, mounted"
  "tls.client_ca" "clientCA, mounted"
  "tls.crl" "crl, mounted"
  "upstream.url" "http://127.0.0.1:<app.port> in mode sidecar, gateway.upstream in mode gateway"
  "shutdown.drain_delay" "from shutdown.drainDelaySeconds"
  "shutdown.grace_period" "from shutdown.gracePeriodSeconds"
  "identity.identityplus.certificate" "identityPlus.agentSecretName, mounted"
  "identity.identityplus.key" "identityPlus.agentSecretName, mounted"
  "identity.identityplus.session_keys" "identityPlus.sessionKeys, mounted" }}
{{- get $from . }}
{{- end }}

{{/* Checks across values that the schema cannot express; each failure says what to set. */}}
{{- define "sidecar.validate" -}}
{{- if not .Values.tls.secretName }}
{{- fail "tls.secretName is required: the kubernetes.io/tls Secret with the server certificate (e.g. from cert-manager)" }}
{{- end }}
{{- if and .Values.clientCA.secretName .Values.clientCA.configMapName }}
{{- fail "clientCA: give secretName or configMapName, not both" }}
{{- end }}
{{- if and .Values.crl.secretName .Values.crl.configMapName }}
{{- fail "crl: give secretName or configMapName, not both" }}
{{- end }}
{{- $pinned := dig "tls" "pinned_certificates" list (.Values.config | default dict) }}
{{- if not (or .Values.clientCA.secretName .Values.clientCA.configMapName $pinned) }}
{{- fail "clientCA.secretName or clientCA.configMapName is required: the trust anchors for client certificates (or set config.tls.pinned_certificates)" }}
{{- end }}
{{- if eq .Values.mode "sidecar" }}
{{- if not .Values.app.image.repository }}
{{- fail "app.image.repository is required in mode sidecar: the application that runs beside the sidecar" }}
{{- end }}
{{- if has (int .Values.app.port) (list (int .Values.ports.https) (int .Values.ports.admin)) }}
{{- fail (printf "app.port %d is one of the sidecar's ports (ports.https, ports.admin): they share the pod's network" (int .Values.app.port)) }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "autoscaling is for mode gateway; in mode sidecar scale with replicaCount or your own HorizontalPodAutoscaler" }}
{{- end }}
{{- else }}
{{- if not .Values.gateway.upstream }}
{{- fail "gateway.upstream is required in mode gateway: the URL of the application, e.g. http://my-app.my-namespace.svc.cluster.local:8080" }}
{{- end }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled .Values.networkPolicy.enabled (not .Values.networkPolicy.adminFrom) }}
{{- fail "serviceMonitor needs networkPolicy.adminFrom: who may scrape the admin port, e.g. [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}] (the NetworkPolicy admits only the node to it otherwise)" }}
{{- end }}
{{- $redis := .Values.sharedCache }}
{{- if and (not $redis.url) (or $redis.passwordSecret.name $redis.tls.secretName $redis.username) }}
{{- fail "sharedCache.url is required with sharedCache.passwordSecret, .tls or .username: the Redis or Valkey to share the verdict cache through" }}
{{- end }}
{{- if and $redis.tls.secretName (not (hasPrefix "rediss" $redis.url)) }}
{{- fail "sharedCache.tls needs a rediss:// URL (TLS) in sharedCache.url" }}
{{- end }}
{{- if ne (not $redis.tls.certificateKey) (not $redis.tls.keyKey) }}
{{- fail "sharedCache.tls.certificateKey and .keyKey go together (a client certificate and its key)" }}
{{- end }}
{{- if and $redis.tls.certificateKey (not $redis.tls.secretName) }}
{{- fail "sharedCache.tls.certificateKey needs sharedCache.tls.secretName: the Secret that holds it" }}
{{- end }}
{{- $backend := dig "identity" "backend" "static" (.Values.config | default dict) }}
{{- $ip := dig "identity" "identityplus" dict (.Values.config | default dict) }}
{{- if and .Values.trustReports.enabled (ne $backend "identityplus") }}
{{- fail "trustReports.enabled needs config.identity.backend: identityplus (trust reports are Identity Plus calls)" }}
{{- end }}
{{- if and (eq $backend "identityplus") (not .Values.identityPlus.agentSecretName) (not (or (get $ip "certificate") (get $ip "p12"))) }}
{{- fail "identityPlus.agentSecretName is required with config.identity.backend identityplus: the Secret with this service's agent certificate and key" }}
{{- end }}
{{- if and (get $ip "legacy") (not .Values.identityPlus.sessionKeys.secretName) (not (get $ip "session_keys")) }}
{{- fail "identityPlus.sessionKeys.secretName is required with config.identity.identityplus.legacy: the Secret with the keys that seal the session cookie (openssl rand -base64 32)" }}
{{- end }}
{{- end }}

{{- define "sidecar.terminationGracePeriod" -}}
{{- if kindIs "invalid" .Values.shutdown.terminationGracePeriodSeconds }}
{{- add (int .Values.shutdown.preStopSeconds) (int .Values.shutdown.drainDelaySeconds) (int .Values.shutdown.gracePeriodSeconds) 5 }}
{{- else }}
{{- int .Values.shutdown.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}
