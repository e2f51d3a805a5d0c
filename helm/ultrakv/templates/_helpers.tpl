{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "ultrakv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ultrakv.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ultrakv.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ultrakv.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ultrakv
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "node") */}}
{{- define "ultrakv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ultrakv.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ultrakv.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ultrakv.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The node image tag: "-cuda" when node pods request GPUs, "-cpu" otherwise. */}}
{{- define "ultrakv.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .ctx.Values.image.tag -}}
{{- printf "%s:%s-%s" .ctx.Values.image.repository $tag .variant -}}
{{- end -}}

{{- define "ultrakv.nodeVariant" -}}
{{- if gt (int .Values.node.gpu.count) 0 }}cuda{{ else }}cpu{{ end -}}
{{- end -}}

{{- define "ultrakv.nodeService" -}}
{{- printf "%s-node" (include "ultrakv.fullname" .) -}}
{{- end -}}

{{- define "ultrakv.etcdName" -}}
{{- printf "%s-etcd" (include "ultrakv.fullname" .) -}}
{{- end -}}

{{- define "ultrakv.etcdPeerService" -}}
{{- printf "%s-etcd-peer" (include "ultrakv.fullname" .) -}}
{{- end -}}

{{/* HOST:PORT every ultrakv process dials for etcd. */}}
{{- define "ultrakv.etcdEndpoint" -}}
{{- if .Values.etcd.external.endpoint -}}
{{- .Values.etcd.external.endpoint -}}
{{- else -}}
{{- printf "%s:%d" (include "ultrakv.etcdName" .) (int .Values.etcd.clientPort) -}}
{{- end -}}
{{- end -}}

{{- define "ultrakv.clusterSecretName" -}}
{{- default (printf "%s-cluster-secret" (include "ultrakv.fullname" .)) .Values.clusterSecret.existingSecret -}}
{{- end -}}

{{- define "ultrakv.peerTlsSecretName" -}}
{{- default (printf "%s-peer-tls" (include "ultrakv.fullname" .)) .Values.peerTls.existingSecret -}}
{{- end -}}

{{/* Mutual TLS between members: the flags `ultrakv node`, `coordinator` and `drain` share
     (empty when peerTls is off). */}}
{{- define "ultrakv.peerTlsArgs" -}}
{{- if .Values.peerTls.enabled -}}
- --peer-ca-cert=/etc/ultrakv/peer-tls/ca.crt
- --peer-cert=/etc/ultrakv/peer-tls/tls.crt
- --peer-key=/etc/ultrakv/peer-tls/tls.key
{{- end -}}
{{- end -}}

{{- define "ultrakv.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "ultrakv.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{/* The node's --model: a preset name or the checkpoint path inside the model volume. */}}
{{- define "ultrakv.model" -}}
{{- if eq .Values.model.source "preset" -}}
{{- required "model.preset is required when model.source is preset" .Values.model.preset -}}
{{- else -}}
{{- printf "/models/%s" (.Values.model.path | trimPrefix "/") | trimSuffix "/" -}}
{{- end -}}
{{- end -}}

{{/* Pods ------------------------------------------------------------------------------- */}}

{{/* Environment both ultrakv processes share. */}}
{{- define "ultrakv.env" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: ULTRAKV_ETCD
  value: {{ include "ultrakv.etcdEndpoint" . | quote }}
# Internal NodeService calls carry the cluster secret: nodes, coordinators and `ultrakv drain`
# (the preStop hook) read this file (`--cluster-secret-file` defaults to it).
- name: ULTRAKV_CLUSTER_SECRET_FILE
  value: /etc/ultrakv/cluster-secret/{{ .Values.clusterSecret.key }}
# The root filesystem is read-only: caches (torch, triton, dequantized weights) go to /tmp.
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}

{{/* An exec probe: `ultrakv health` against the local gRPC port (exit 0 only when SERVING).
     (dict "port" 50051 "service" "" "probe" .Values.x.probes.startup ["tls" $] ["peer" $]):
     with "tls", over the coordinators' client TLS (the chart's CA; its own certificate for
     mutual TLS); with "peer", over the members' mutual TLS when peerTls is on (a node's port). */}}
{{- define "ultrakv.healthProbe" -}}
exec:
  command:
    - ultrakv
    - health
    - --address=127.0.0.1:{{ .port }}
    - --timeout={{ sub (int .probe.timeoutSeconds) 1 }}
    {{- if .service }}
    - --service={{ .service }}
    {{- end }}
    {{- if and .tls .tls.Values.tls.enabled }}
    - --tls-ca=/etc/ultrakv/tls/ca.crt
    - --tls-server-name={{ include "ultrakv.fullname" .tls }}
    {{- if .tls.Values.tls.clientAuth }}
    - --tls-cert=/etc/ultrakv/tls/tls.crt
    - --tls-key=/etc/ultrakv/tls/tls.key
    {{- end }}
    {{- end }}
    {{- if and .peer .peer.Values.peerTls.enabled }}
    - --tls-ca=/etc/ultrakv/peer-tls/ca.crt
    - --tls-cert=/etc/ultrakv/peer-tls/tls.crt
    - --tls-key=/etc/ultrakv/peer-tls/tls.key
    - --tls-server-name=localhost
    {{- end }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end -}}

{{/* Volumes both ultrakv processes mount: writable /tmp, the secrets (and the members'
     mutual TLS material when peerTls is on). */}}
{{- define "ultrakv.secretVolumes" -}}
- name: tmp
  emptyDir: {}
- name: cluster-secret
  secret:
    secretName: {{ include "ultrakv.clusterSecretName" . }}
    defaultMode: 0400
{{- if .Values.peerTls.enabled }}
- name: peer-tls
  secret:
    secretName: {{ include "ultrakv.peerTlsSecretName" . }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{- define "ultrakv.secretMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cluster-secret
  mountPath: /etc/ultrakv/cluster-secret
  readOnly: true
{{- if .Values.peerTls.enabled }}
- name: peer-tls
  mountPath: /etc/ultrakv/peer-tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* Wait for etcd before the main container starts (no crash loop on a cold cluster start):
     etcdctl from the etcd image, retried by the kubelet until the endpoint answers. */}}
{{- define "ultrakv.waitForEtcd" -}}
- name: wait-for-etcd
  image: "{{ .Values.etcd.image.repository }}:{{ .Values.etcd.image.tag }}"
  imagePullPolicy: {{ .Values.etcd.image.pullPolicy }}
  command:
    - etcdctl
    - --endpoints={{ include "ultrakv.etcdEndpoint" . }}
    - --dial-timeout=60s
    - --command-timeout=30s
    - endpoint
    - health
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 32Mi}
    limits: {memory: 64Mi}
{{- end -}}
