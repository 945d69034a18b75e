{{/* The sidecar container, the application container and the pod's volumes. */}}

{{- define "sidecar.container" -}}
{{- $paths := include "sidecar.paths" . | fromJson -}}
- name: sidecar
  image: {{ include "sidecar.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if include "sidecar.native" . }}
  restartPolicy: Always
  {{- end }}
  env:
    - name: SIDECAR_CONFIG
      value: {{ printf "%s/sidecar.yaml" $paths.config | quote }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: https
      containerPort: {{ .Values.ports.https }}
      protocol: TCP
    - name: admin
      containerPort: {{ .Values.ports.admin }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /healthz
      port: admin
    {{- toYaml .Values.probes.startup | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: admin
    {{- toYaml .Values.probes.readiness | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: admin
    {{- toYaml .Values.probes.liveness | nindent 4 }}
  {{- if gt (int .Values.shutdown.preStopSeconds) 0 }}
  lifecycle:
    preStop:
      exec:
        command: ["sleep", {{ .Values.shutdown.preStopSeconds | int | toString | quote }}]
  {{- end }}
  {{- with .Values.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: config
      mountPath: {{ $paths.config }}
      readOnly: true
    - name: tls
      mountPath: {{ $paths.tls }}
      readOnly: true
    {{- if or .Values.clientCA.secretName .Values.clientCA.configMapName }}
    - name: trust
      mountPath: {{ $paths.trust }}
      readOnly: true
    {{- end }}
    {{- if or .Values.crl.secretName .Values.crl.configMapName }}
    - name: crl
      mountPath: {{ $paths.crl }}
      readOnly: true
    {{- end }}
    {{- if .Values.identityPlus.agentSecretName }}
    - name: agent
      mountPath: {{ $paths.agent }}
      readOnly: true
    {{- end }}
    {{- if .Values.identityPlus.sessionKeys.secretName }}
    - name: session-keys
      mountPath: {{ $paths.session }}
      readOnly: true
    {{- end }}
    {{- if and .Values.sharedCache.url .Values.sharedCache.passwordSecret.name }}
    - name: redis-password
      mountPath: {{ $paths.redis }}
      readOnly: true
    {{- end }}
    {{- if and .Values.sharedCache.url .Values.sharedCache.tls.secretName }}
    - name: redis-tls
      mountPath: {{ $paths.redisTLS }}
      readOnly: true
    {{- end }}
    - name: tmp
      mountPath: /tmp
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{- define "sidecar.appContainer" -}}
{{- $app := .Values.app -}}
- name: app
  image: {{ include "sidecar.appImage" . | quote }}
  imagePullPolicy: {{ $app.image.pullPolicy }}
  {{- with $app.command }}
  command:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $app.args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $app.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $app.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $app.livenessProbe }}
  livenessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $app.readinessProbe }}
  readinessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $app.startupProbe }}
  startupProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $app.lifecycle }}
  lifecycle:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $app.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $app.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $app.volumeMounts }}
  volumeMounts:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{- define "sidecar.volumes" -}}
- name: config
  configMap:
    name: {{ include "sidecar.fullname" . }}-config
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- if .Values.clientCA.secretName }}
- name: trust
  secret:
    secretName: {{ .Values.clientCA.secretName }}
    defaultMode: 0440
{{- else if .Values.clientCA.configMapName }}
- name: trust
  configMap:
    name: {{ .Values.clientCA.configMapName }}
{{- end }}
{{- if .Values.crl.secretName }}
- name: crl
  secret:
    secretName: {{ .Values.crl.secretName }}
    defaultMode: 0440
{{- else if .Values.crl.configMapName }}
- name: crl
  configMap:
    name: {{ .Values.crl.configMapName }}
{{- end }}
{{- if .Values.identityPlus.agentSecretName }}
- name: agent
  secret:
    secretName: {{ .Values.identityPlus.agentSecretName }}
    defaultMode: 0440
{{- end }}
{{- if .Values.identityPlus.sessionKeys.secretName }}
- name: session-keys
  secret:
    secretName: {{ .Values.identityPlus.sessionKeys.secretName }}
    defaultMode: 0440
    items:
      {{- range .Values.identityPlus.sessionKeys.keys }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}
{{- if and .Values.sharedCache.url .Values.sharedCache.passwordSecret.name }}
- name: redis-password
  secret:
    secretName: {{ .Values.sharedCache.passwordSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ .Values.sharedCache.passwordSecret.key }}
        path: {{ .Values.sharedCache.passwordSecret.key }}
{{- end }}
{{- if and .Values.sharedCache.url .Values.sharedCache.tls.secretName }}
- name: redis-tls
  secret:
    secretName: {{ .Values.sharedCache.tls.secretName }}
    defaultMode: 0440
{{- end }}
# The only writable place: the TLS key is loaded through a private temporary file.
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}
