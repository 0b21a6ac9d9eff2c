{{/*
Shared pieces of the cdp chart. The per-component objects live in components.yaml; everything here
takes either the root context or a "component context":
  (dict "root" $ "name" <component name> "c" <component values merged over componentDefaults>)
*/}}

{{- define "cdp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cdp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Image tag without a digest, cleaned into a valid label value (labels refuse "@" and ":"). */}}
{{- define "cdp.version" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString -}}
{{- $clean := regexReplaceAll "[^A-Za-z0-9._-]" (split "@" $tag)._0 "" | trunc 63 -}}
{{- regexReplaceAll "^[^A-Za-z0-9]+|[^A-Za-z0-9]+$" $clean "" -}}
{{- end -}}

{{- define "cdp.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}

{{/* The Dockerfile's training target: image.trainingTag, else "<tag>-training" (a digest names one image,
so with one the training image's must be given). */}}
{{- define "cdp.trainingImage" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString -}}
{{- $repository := default .Values.image.repository .Values.image.trainingRepository -}}
{{- if .Values.image.trainingTag -}}
{{- printf "%s:%s" $repository (.Values.image.trainingTag | toString) -}}
{{- else if contains "@" $tag -}}
{{- fail "image.tag carries a digest: set image.trainingTag to the training image's tag and digest (components.*.training.enabled)" -}}
{{- else -}}
{{- printf "%s:%s-training" $repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "cdp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "cdp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: cdp
app.kubernetes.io/version: {{ include "cdp.version" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels must never change for the life of a release: no version in here. */}}
{{- define "cdp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cdp.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "cdp.componentLabels" -}}
{{ include "cdp.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/*
<release>-<component>. Services are DNS labels (63 characters); a StatefulSet name also ends up in
its pods' controller-revision-hash label with an 11-character suffix, hence 52. Failing beats
truncating: two truncated names could collide.
*/}}
{{- define "cdp.componentFullname" -}}
{{- $full := printf "%s-%s" (include "cdp.fullname" .root) .name -}}
{{- $max := ternary 52 63 (.c.stateful | default false) -}}
{{- if gt (len $full) $max -}}
{{- fail (printf "component %q: resource name %q is %d characters, the limit is %d; shorten the release name, fullnameOverride or the component name" .name $full (len $full) $max) -}}
{{- end -}}
{{- $full -}}
{{- end -}}

{{- define "cdp.module" -}}
{{- default (printf "cdp_%s" (.name | replace "-" "_")) .c.module -}}
{{- end -}}

{{/* nats.fullname of the official chart, so CDP_NATS_URL follows the subchart's Service. */}}
{{- define "cdp.natsUrl" -}}
{{- if .Values.nats.enabled -}}
{{- $nats := .Values.nats -}}
{{- $host := "" -}}
{{- if $nats.fullnameOverride -}}
{{- $host = $nats.fullnameOverride -}}
{{- else -}}
{{- $name := default "nats" $nats.nameOverride -}}
{{- $host = ternary .Release.Name (printf "%s-%s" .Release.Name $name) (contains $name .Release.Name) -}}
{{- end -}}
{{- printf "nats://%s:4222" ($host | trunc 63 | trimSuffix "-") -}}
{{- else -}}
{{- required "global.natsUrl is required when nats.enabled is false" .Values.global.natsUrl -}}
{{- end -}}
{{- end -}}

{{- define "cdp.mongodbFullname" -}}
{{- printf "%s-mongodb" (include "cdp.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A component's NATS credentials: <release>-<name>-nats (secret-nats.yaml). */}}
{{- define "cdp.natsSecretName" -}}
{{- printf "%s-%s-nats" (include "cdp.fullname" .root) .name -}}
{{- end -}}

{{- define "cdp.authSecretName" -}}
{{- default (printf "%s-auth-tokens" (include "cdp.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "cdp.crmConnectionsSecretName" -}}
{{- default (printf "%s-crm-connections" (include "cdp.fullname" .)) .Values.crmConnections.existingSecret -}}
{{- end -}}

{{- define "cdp.privacyHashKeySecretName" -}}
{{- default (printf "%s-privacy-hash-key" (include "cdp.fullname" .)) .Values.privacyHashKey.existingSecret -}}
{{- end -}}

{{- define "cdp.sourcesSecretName" -}}
{{- default (printf "%s-sources" (include "cdp.fullname" .)) .Values.sources.existingSecret -}}
{{- end -}}

{{/* The port the kubelet probes: a plaintext health port when there is one. */}}
{{- define "cdp.probePort" -}}
{{- if .c.ports.health -}}{{ int .c.ports.health }}{{- else -}}{{ int .c.ports.grpc }}{{- end -}}
{{- end -}}

{{/* Seconds the kubelet waits for the container to stop: the preStop sleep, the service's stop bound
(3 x CDP_SHUTDOWN_GRACE + 2, cdp_kit.service.stop_bound) and 5 s of margin. */}}
{{- define "cdp.terminationGracePeriod" -}}
{{- add (int .c.preStopSleepSeconds) (mul 3 (int .c.shutdownGraceSeconds)) 2 5 -}}
{{- end -}}

{{/* Startup probe failures allowed: probes.startup.failureThreshold at least, and enough periods to cover
the wait for the provisioning Job (natsAuth: CDP_NATS_PROVISION_WAIT) plus probes.startup.loadSeconds. */}}
{{- define "cdp.startupFailureThreshold" -}}
{{- $startup := .c.probes.startup -}}
{{- $wait := ternary (int .root.Values.natsAuth.provision.waitSeconds) 0 (.root.Values.natsAuth.enabled | default false) -}}
{{- $window := add $wait (int ($startup.loadSeconds | default 0)) -}}
{{- $period := int $startup.periodSeconds -}}
{{- max (int $startup.failureThreshold) (div (add $window (sub $period 1)) $period) -}}
{{- end -}}

{{/* Effective pod count, for checks that depend on it. */}}
{{- define "cdp.replicas" -}}
{{- if and .c.autoscaling.enabled (not .c.stateful) -}}{{ int .c.autoscaling.minReplicas }}{{- else -}}{{ int .c.replicas }}{{- end -}}
{{- end -}}

{{/* Pods get an API token only when they hold Kubernetes Leases (or values ask for one). */}}
{{- define "cdp.automountToken" -}}
{{- or .c.serviceAccount.automountToken (eq .c.ownership "kubernetes") -}}
{{- end -}}

{{/* Variables the chart owns; components.<name>.env may not set them (duplicates would be ambiguous). */}}
{{- define "cdp.managedEnv" -}}
OTEL_SERVICE_NAME CDP_NATS_URL CDP_GRPC_PORT CDP_HTTP_PORT CDP_METRICS_PORT CDP_HEALTH_PORT CDP_STORE_URL CDP_PARTITIONS CDP_LOG_LEVEL CDP_LOG_FORMAT CDP_AUTH_MODE CDP_AUTH_TOKENS_FILE CDP_TLS_CERT_FILE CDP_TLS_KEY_FILE CDP_TLS_CLIENT_CA_FILE OTEL_EXPORTER_OTLP_ENDPOINT CDP_COLLECTOR_SOURCES_FILE CDP_PRIVACY_HASH_KEY_FILE CDP_CRM_CONNECTIONS_FILE CDP_CRM_WEBHOOK_PORT CDP_SHUTDOWN_GRACE CDP_POD_NAME CDP_POD_ORDINAL CDP_REPLICAS CDP_OWNERSHIP CDP_POD_NAMESPACE CDP_NATS_CREDENTIALS_FILE CDP_NATS_PROVISION_WAIT CDP_NATS_TLS_CA_FILE CDP_NATS_TLS_CERT_FILE CDP_NATS_TLS_KEY_FILE
{{- end -}}

{{/*
Cross-field rules a JSON schema cannot express well. Each failure names the values key to change.
*/}}
{{- define "cdp.validateComponent" -}}
{{- $root := .root -}}{{- $c := .c -}}{{- $name := .name -}}
{{- if and $root.Values.tls.enabled (not $c.ports.health) -}}
{{- fail (printf "component %q: tls.enabled=true but ports.health is 0. Kubelet gRPC probes cannot speak TLS; set componentDefaults.ports.health (or components.%s.ports.health) to a plaintext port serving grpc.health.v1" $name $name) -}}
{{- end -}}
{{- if and $c.ports.health (or (eq (int $c.ports.health) (int $c.ports.grpc)) (eq (int $c.ports.health) (int $c.ports.http)) (eq (int $c.ports.health) (int $c.ports.metrics))) -}}
{{- fail (printf "component %q: ports.health=%d must differ from the grpc, http and metrics ports" $name (int $c.ports.health)) -}}
{{- end -}}
{{- $module := include "cdp.module" . -}}
{{- range $devOnly := list "cdp_testing" "cdp_crm_emulators" "cdpctl" -}}
{{- if or (eq $module $devOnly) (hasPrefix (printf "%s." $devOnly) $module) -}}
{{- fail (printf "component %q: module %s is development and test code (local channel servers, CRM emulators, the CLI); it is not in the image and never deployed. Point the service at a real provider through envFromSecrets instead" $name $module) -}}
{{- end -}}
{{- end -}}
{{- $mounts := list "/etc/cdp/auth" "/etc/cdp/tls" "/etc/cdp/sources" "/etc/cdp/privacy-hash" "/etc/cdp/crm" "/etc/cdp/nats" "/etc/cdp/nats-tls" "/etc/cdp/peer-token" -}}
{{- range $c.secretFiles -}}
{{- if has .mountPath $mounts -}}
{{- fail (printf "component %q: secretFiles mountPath %s is taken (by the chart or another entry); give each Secret a folder of its own under /etc/cdp" $name .mountPath) -}}
{{- end -}}
{{- $mounts = append $mounts .mountPath -}}
{{- end -}}
{{- if and $c.probes.readiness.httpPath (not $c.ports.http) -}}
{{- fail (printf "component %q: probes.readiness.httpPath needs ports.http (the probe asks that port)" $name) -}}
{{- end -}}
{{- if and $c.singleWriter (eq $c.ownership "static") (gt (int $c.replicas) 1) -}}
{{- fail (printf "component %q: %d replicas with ownership=static: it has one writer (singleWriter), and static ownership gives every replica the same work, so the extra ones refuse to start. Set components.%s.replicas: 1, or ownership: kubernetes (or nats) with store.kind: mongodb for hot standbys (componentDefaults.replicas reaches it too)" $name (int $c.replicas) $name) -}}
{{- end -}}
{{- if and $c.stateful (eq $c.ownership "static") (ne $c.store.kind "mongodb") (gt (int $c.replicas) 1) (not $c.singleWriter) (not $c.acknowledgeFixedReplicas) -}}
{{- fail (printf "component %q: %d replicas with ownership=static and store.kind=%s: each partition's state stays on the volume of the pod that owned it, and a later change of the replica count gives partitions to pods that do not hold it (its state is lost to the service). Use ownership: kubernetes with store.kind: mongodb, replicas: 1, or set components.%s.acknowledgeFixedReplicas: true to keep this count for the volumes' life" $name (int $c.replicas) $c.store.kind $name) -}}
{{- end -}}
{{- if and (ne $c.ownership "static") (not $c.stateful) -}}
{{- fail (printf "component %q: ownership=%s needs stateful: true (only components that own partitions hold leases)" $name $c.ownership) -}}
{{- end -}}
{{- if and (ne $c.ownership "static") (ne $c.store.kind "mongodb") -}}
{{- fail (printf "component %q: ownership=%s moves partitions between pods, but store.kind=%s gives each pod a store of its own, so the new owner would not find what the old one wrote; set store.kind: mongodb (one store every pod shares) or ownership: static" $name $c.ownership $c.store.kind) -}}
{{- end -}}
{{- if and $c.ports.http (eq (int $c.ports.http) (int $c.ports.grpc)) -}}
{{- fail (printf "component %q: ports.http and ports.grpc are both %d" $name (int $c.ports.grpc)) -}}
{{- end -}}
{{- if and $c.ports.metrics (or (eq (int $c.ports.metrics) (int $c.ports.grpc)) (eq (int $c.ports.metrics) (int $c.ports.http))) -}}
{{- fail (printf "component %q: ports.metrics=%d clashes with the grpc or http port" $name (int $c.ports.metrics)) -}}
{{- end -}}
{{- if and (eq $c.store.kind "mongodb") (not $root.Values.mongodb.enabled) (not $root.Values.global.mongodbUri.existingSecret) -}}
{{- fail (printf "component %q: store.kind=mongodb needs global.mongodbUri.existingSecret (a Secret with the mongodb:// URI) or mongodb.enabled=true" $name) -}}
{{- end -}}
{{- if and $c.stateful $c.autoscaling.enabled -}}
{{- fail (printf "component %q: stateful components own partitions by ordinal and need a fixed replica count; set autoscaling.enabled=false" $name) -}}
{{- end -}}
{{- if and $c.stateful $c.persistence.existingClaim -}}
{{- fail (printf "component %q: persistence.existingClaim cannot be shared by a StatefulSet's pods; each pod gets its own claim" $name) -}}
{{- end -}}
{{- $replicas := include "cdp.replicas" . | int -}}
{{- if and (not $c.stateful) $c.persistence.enabled (gt $replicas 1) (has "ReadWriteOnce" $c.persistence.accessModes) (not (has "ReadWriteMany" $c.persistence.accessModes)) -}}
{{- fail (printf "component %q: %d replicas would share one ReadWriteOnce claim; set stateful: true for a claim per pod, replicas: 1, or a ReadWriteMany access mode" $name $replicas) -}}
{{- end -}}
{{- if and $c.pdb.enabled (not (kindIs "invalid" $c.pdb.minAvailable)) (ge (int $c.pdb.minAvailable) $replicas) -}}
{{- fail (printf "component %q: pdb.minAvailable=%d with %d replicas would block every node drain; lower it or use pdb.maxUnavailable" $name (int $c.pdb.minAvailable) $replicas) -}}
{{- end -}}
{{- if and $c.autoscaling.enabled (gt (int $c.autoscaling.minReplicas) (int $c.autoscaling.maxReplicas)) -}}
{{- fail (printf "component %q: autoscaling.minReplicas=%d is above maxReplicas=%d" $name (int $c.autoscaling.minReplicas) (int $c.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- range $peer := $c.calls -}}
{{- $raw := get $root.Values.components $peer -}}
{{- if not (hasKey $root.Values.components $peer) -}}
{{- fail (printf "components.%s.calls: no component named %q (known: %s)" $name $peer (keys $root.Values.components | sortAlpha | join ", ")) -}}
{{- end -}}
{{- if and (kindIs "map" $raw) (hasKey $raw "enabled") (not $raw.enabled) -}}
{{- fail (printf "components.%s.calls: %q is disabled (components.%s.enabled=false)" $name $peer $peer) -}}
{{- end -}}
{{- if hasKey $c.env (printf "CDP_%s_ADDRESS" ($peer | upper | replace "-" "_")) -}}
{{- fail (printf "components.%s.env: CDP_%s_ADDRESS is set by calls: [%s]; remove one" $name ($peer | upper | replace "-" "_") $peer) -}}
{{- end -}}
{{- end -}}
{{- $managed := include "cdp.managedEnv" . | splitList " " -}}
{{- range $var, $_ := $c.env -}}
{{- if has $var $managed -}}
{{- fail (printf "components.%s.env.%s: the chart sets %s itself; use its own values key (ports, log, store, global, auth, tls)" $name $var $var) -}}
{{- end -}}
{{- end -}}
{{- range $c.extraEnv -}}
{{- if has .name $managed -}}
{{- fail (printf "components.%s.extraEnv: the chart sets %s itself; use its own values key (ports, log, store, global, auth, tls)" $name .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cdp.validateRelease" -}}
{{- range $reserved, $enabled := dict "nats" .Values.nats.enabled "mongodb" .Values.mongodb.enabled -}}
{{- if and $enabled (hasKey $.Values.components $reserved) -}}
{{- fail (printf "component %q would collide with the in-release %s (%s.enabled=true): rename the component" $reserved $reserved $reserved) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) -}}
{{- fail "tls.enabled=true needs tls.existingSecret: a kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt), e.g. issued by cert-manager" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.clientAuth) -}}
{{- fail "tls.enabled=true with tls.clientAuth=false: a service trusts only the CA file it is given as CDP_TLS_CLIENT_CA_FILE (the same file asks its own callers for certificates), so without it every call to a peer's privately issued certificate fails. Set tls.clientAuth: true (ca.crt in tls.existingSecret)" -}}
{{- end -}}
{{- if and .Values.auth.existingSecret .Values.auth.tokens -}}
{{- fail "auth.existingSecret and auth.tokens are both set; keep one (the Secret, in production)" -}}
{{- end -}}
{{- if and .Values.crmConnections.existingSecret .Values.crmConnections.inline.connections -}}
{{- fail "crmConnections.existingSecret and crmConnections.inline.connections are both set; keep one" -}}
{{- end -}}
{{- if and .Values.sources.existingSecret .Values.sources.inline.sources -}}
{{- fail "sources.existingSecret and sources.inline.sources are both set; keep one (the Secret, in production)" -}}
{{- end -}}
{{- if and .Values.serviceMonitor.enabled (not (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor")) -}}
{{- fail "serviceMonitor.enabled=true but the cluster does not serve monitoring.coreos.com/v1 ServiceMonitor: install the Prometheus Operator CRDs first (offline rendering: --api-versions monitoring.coreos.com/v1/ServiceMonitor)" -}}
{{- end -}}
{{- end -}}

{{/* The container's environment: all configuration is environment variables (deploy/README.md, where each variable comes from). */}}
{{- define "cdp.env" -}}
{{- $root := .root -}}{{- $c := .c -}}{{- $name := .name -}}
- name: OTEL_SERVICE_NAME
  value: {{ $name | quote }}
- name: CDP_NATS_URL
  value: {{ include "cdp.natsUrl" $root | quote }}
{{- if $root.Values.natsAuth.enabled }}
- name: CDP_NATS_CREDENTIALS_FILE
  value: /etc/cdp/nats/credentials.json
{{- /* Its streams are made by the provisioning Job, which runs beside the pods (templates/provision.yaml). */}}
- name: CDP_NATS_PROVISION_WAIT
  value: {{ int $root.Values.natsAuth.provision.waitSeconds | quote }}
{{- end }}
{{- if $root.Values.natsAuth.tls.existingSecret }}
- name: CDP_NATS_TLS_CA_FILE
  value: /etc/cdp/nats-tls/ca.crt
{{- if $root.Values.natsAuth.tls.clientCertificate }}
- name: CDP_NATS_TLS_CERT_FILE
  value: /etc/cdp/nats-tls/tls.crt
- name: CDP_NATS_TLS_KEY_FILE
  value: /etc/cdp/nats-tls/tls.key
{{- end }}
{{- end }}
- name: CDP_GRPC_PORT
  value: {{ int $c.ports.grpc | quote }}
- name: CDP_METRICS_PORT
  value: {{ int $c.ports.metrics | quote }}
{{- if $c.ports.http }}
- name: {{ $c.httpPortVariable | default "CDP_HTTP_PORT" }}
  value: {{ int $c.ports.http | quote }}
{{- end }}
{{- if $c.ports.health }}
- name: CDP_HEALTH_PORT
  value: {{ int $c.ports.health | quote }}
{{- end }}
{{- if eq $c.store.kind "sqlite" }}
- name: CDP_STORE_URL
  value: {{ printf "sqlite:////var/lib/cdp/%s.db" $name | quote }}
{{- else if eq $c.store.kind "memory" }}
- name: CDP_STORE_URL
  value: "memory://"
{{- else if $root.Values.mongodb.enabled }}
- name: CDP_STORE_URL
  value: {{ printf "mongodb://%s:27017/%s" (include "cdp.mongodbFullname" $root) $root.Values.mongodb.database | quote }}
{{- else }}
- name: CDP_STORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.global.mongodbUri.existingSecret }}
      key: {{ $root.Values.global.mongodbUri.key }}
{{- end }}
- name: CDP_PARTITIONS
  value: {{ int $root.Values.global.partitions | quote }}
- name: CDP_LOG_LEVEL
  value: {{ $c.log.level | quote }}
- name: CDP_LOG_FORMAT
  value: {{ $c.log.format | quote }}
- name: CDP_AUTH_MODE
  value: {{ $root.Values.auth.mode | quote }}
{{- if eq $root.Values.auth.mode "tokens" }}
- name: CDP_AUTH_TOKENS_FILE
  value: /etc/cdp/auth/tokens.json
{{- end }}
{{- if $root.Values.tls.enabled }}
- name: CDP_TLS_CERT_FILE
  value: /etc/cdp/tls/tls.crt
- name: CDP_TLS_KEY_FILE
  value: /etc/cdp/tls/tls.key
{{- if $root.Values.tls.clientAuth }}
- name: CDP_TLS_CLIENT_CA_FILE
  value: /etc/cdp/tls/ca.crt
{{- end }}
{{- end }}
{{- with $root.Values.global.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- if $c.mountSources }}
- name: CDP_COLLECTOR_SOURCES_FILE
  value: /etc/cdp/sources/sources.json
{{- end }}
{{- if $c.mountPrivacyHashKey }}
- name: CDP_PRIVACY_HASH_KEY_FILE
  value: /etc/cdp/privacy-hash/key
{{- end }}
{{- if $c.mountCrmConnections }}
- name: CDP_CRM_CONNECTIONS_FILE
  value: {{ printf "/etc/cdp/crm/%s" $root.Values.crmConnections.key | quote }}
{{- end }}
- name: CDP_SHUTDOWN_GRACE
  value: {{ int $c.shutdownGraceSeconds | quote }}
{{- if $c.stateful }}
{{- /* The pod's own name and ordinal come from the downward API, so they stay right whatever
`kubectl scale` does. CDP_REPLICAS is rendered only for static ownership: with leases the split
follows the live pods and nothing may depend on the count the chart was rendered with. */}}
- name: CDP_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: CDP_POD_ORDINAL
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
{{- if eq $c.ownership "static" }}
- name: CDP_REPLICAS
  value: {{ int $c.replicas | quote }}
{{- else }}
- name: CDP_OWNERSHIP
  value: {{ $c.ownership | quote }}
{{- end }}
{{- if eq $c.ownership "kubernetes" }}
- name: CDP_POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end }}
{{- end }}
{{- range $peer := $c.calls }}
{{- $raw := get $root.Values.components $peer }}
{{- $pc := mergeOverwrite (deepCopy $root.Values.componentDefaults) (deepCopy ($raw | default dict)) }}
- name: CDP_{{ $peer | upper | replace "-" "_" }}_ADDRESS
  {{- /* The Service's name in the cluster's DNS, which is what TLS checks the peer's certificate against. */}}
  value: {{ printf "%s.%s.svc:%d" (include "cdp.componentFullname" (dict "root" $root "name" $peer "c" $pc)) $root.Release.Namespace (int $pc.ports.grpc) | quote }}
{{- if $root.Values.serviceTokens.existingSecret }}
{{- /* The token for this peer, from a file re-read when the Secret changes (cdp_kit.auth: outbound). */}}
- name: CDP_{{ $peer | upper | replace "-" "_" }}_TOKEN_FILE
  value: /etc/cdp/peer-token/token
{{- end }}
{{- end }}
{{- range $var, $value := $c.env }}
- name: {{ $var }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- with $c.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "cdp.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cdp.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The pod template shared by the Deployment and the StatefulSet of a component. */}}
{{- define "cdp.podTemplate" -}}
{{- $root := .root -}}{{- $c := .c -}}{{- $name := .name -}}
{{- $fullname := include "cdp.componentFullname" . -}}
{{- $probePort := include "cdp.probePort" . | int -}}
metadata:
  labels:
    {{- /* The chart's labels win: a podLabels entry must not detach pods from their selector. */}}
    {{- merge (include "cdp.componentLabels" . | fromYaml) ($c.podLabels | default dict) | toYaml | nindent 4 }}
  {{- $annotations := dict }}
  {{- /* Config files written from values roll the pods that read them, so `helm upgrade --wait`
  returns once every pod has the new file. Existing Secrets (the production path) are outside the
  chart's sight; the services re-read those files when they change, without a restart. */}}
  {{- $config := "" }}
  {{- if eq $root.Values.auth.mode "tokens" }}
  {{- $config = include (print $root.Template.BasePath "/secret-auth.yaml") $root }}
  {{- end }}
  {{- if $c.mountSources }}
  {{- $config = print $config (include (print $root.Template.BasePath "/secret-sources.yaml") $root) }}
  {{- end }}
  {{- if $c.mountCrmConnections }}
  {{- $config = print $config (include (print $root.Template.BasePath "/secret-crm-connections.yaml") $root) }}
  {{- end }}
  {{- if trim $config }}
  {{- $_ := set $annotations "checksum/config" ($config | sha256sum) }}
  {{- end }}
  {{- $annotations = merge $annotations ($c.podAnnotations | default dict) }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ $fullname }}
  automountServiceAccountToken: {{ include "cdp.automountToken" . }}
  enableServiceLinks: false
  {{- /* The preStop sleep, then the service's own stop bound (cdp_kit.service.stop_bound: 3 x grace + 2 s),
  then 5 s of margin before the kubelet's SIGKILL. */}}
  terminationGracePeriodSeconds: {{ include "cdp.terminationGracePeriod" . }}
  securityContext:
    {{- include "cdp.podSecurityContext" . | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- with $c.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $c.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $c.spreadAcrossNodes }}
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "cdp.selectorLabels" . | nindent 10 }}
  {{- end }}
  containers:
    - name: {{ $name }}
      image: {{ include (ternary "cdp.trainingImage" "cdp.image" (dig "training" "enabled" false $c)) $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["python", "-m", {{ include "cdp.module" . | quote }}]
      ports:
        - name: grpc
          containerPort: {{ int $c.ports.grpc }}
          protocol: TCP
        {{- if $c.ports.http }}
        - name: http
          containerPort: {{ int $c.ports.http }}
          protocol: TCP
        {{- end }}
        {{- if $c.ports.metrics }}
        - name: metrics
          containerPort: {{ int $c.ports.metrics }}
          protocol: TCP
        {{- end }}
        {{- if $c.ports.health }}
        - name: health
          containerPort: {{ int $c.ports.health }}
          protocol: TCP
        {{- end }}
      env:
        {{- include "cdp.env" . | nindent 8 }}
      {{- with $c.envFromSecrets }}
      {{- /* Every key of these existing Secrets becomes a variable (provider credentials and settings:
      which keys are present decides what the service enables). `env` above wins on a clash. */}}
      envFrom:
        {{- range . }}
        - secretRef:
            name: {{ .name }}
            optional: {{ .optional | default false }}
        {{- end }}
      {{- end }}
      {{- /* Kubelet's built-in gRPC probes ask grpc.health.v1 directly: no probe binary in the image. */}}
      {{- if $c.preStopSleepSeconds }}
      {{- /* Endpoints drop a terminating pod asynchronously: keep serving a moment before SIGTERM. */}}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ int $c.preStopSleepSeconds }}
      {{- end }}
      startupProbe:
        grpc:
          port: {{ $probePort }}
        periodSeconds: {{ int $c.probes.startup.periodSeconds }}
        failureThreshold: {{ include "cdp.startupFailureThreshold" . }}
      livenessProbe:
        grpc:
          port: {{ $probePort }}
        periodSeconds: {{ int $c.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ int $c.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ int $c.probes.liveness.failureThreshold }}
      readinessProbe:
        {{- if $c.probes.readiness.httpPath }}
        {{- /* Plaintext HTTP on the component's own http port (the collector's /readyz knows about NATS). */}}
        httpGet:
          path: {{ $c.probes.readiness.httpPath }}
          port: http
        {{- else }}
        grpc:
          port: {{ $probePort }}
          {{- with $c.probes.readiness.service }}
          {{- /* Ready = this gRPC service answers (identity's standbys are alive, not ready). */}}
          service: {{ . | quote }}
          {{- end }}
        {{- end }}
        periodSeconds: {{ int $c.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ int $c.probes.readiness.timeoutSeconds }}
        failureThreshold: {{ int $c.probes.readiness.failureThreshold }}
      resources:
        {{- toYaml $c.resources | nindent 8 }}
      securityContext:
        {{- include "cdp.containerSecurityContext" . | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: data
          mountPath: /var/lib/cdp
        {{- if eq $root.Values.auth.mode "tokens" }}
        {{- /* A whole-directory mount (no subPath), so an updated Secret reaches the running pod. */}}
        - name: auth-tokens
          mountPath: /etc/cdp/auth
          readOnly: true
        {{- end }}
        {{- if $root.Values.tls.enabled }}
        - name: tls
          mountPath: /etc/cdp/tls
          readOnly: true
        {{- end }}
        {{- if $c.mountSources }}
        - name: sources
          mountPath: /etc/cdp/sources
          readOnly: true
        {{- end }}
        {{- if $c.mountPrivacyHashKey }}
        - name: privacy-hash-key
          mountPath: /etc/cdp/privacy-hash
          readOnly: true
        {{- end }}
        {{- if $c.mountCrmConnections }}
        - name: crm-connections
          mountPath: /etc/cdp/crm
          readOnly: true
        {{- end }}
        {{- if $root.Values.natsAuth.enabled }}
        - name: nats-credentials
          mountPath: /etc/cdp/nats
          readOnly: true
        {{- end }}
        {{- if $root.Values.natsAuth.tls.existingSecret }}
        - name: nats-tls
          mountPath: /etc/cdp/nats-tls
          readOnly: true
        {{- end }}
        {{- if and $root.Values.serviceTokens.existingSecret $c.calls }}
        - name: peer-token
          mountPath: /etc/cdp/peer-token
          readOnly: true
        {{- end }}
        {{- range $c.secretFiles }}
        - name: secret-{{ .volume }}
          mountPath: {{ .mountPath }}
          readOnly: true
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ $c.tmpSizeLimit }}
    {{- if not $c.persistence.enabled }}
    - name: data
      emptyDir:
        sizeLimit: {{ $c.persistence.size }}
    {{- else if not $c.stateful }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ default (printf "%s-data" $fullname) $c.persistence.existingClaim }}
    {{- end }}
    {{- if eq $root.Values.auth.mode "tokens" }}
    - name: auth-tokens
      secret:
        secretName: {{ include "cdp.authSecretName" $root }}
        defaultMode: 0440
        items:
          - key: {{ $root.Values.auth.key }}
            path: tokens.json
    {{- end }}
    {{- if $root.Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ $root.Values.tls.existingSecret }}
        defaultMode: 0440
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
          {{- if $root.Values.tls.clientAuth }}
          - key: ca.crt
            path: ca.crt
          {{- end }}
    {{- end }}
    {{- if $c.mountSources }}
    - name: sources
      secret:
        secretName: {{ include "cdp.sourcesSecretName" $root }}
        defaultMode: 0440
        items:
          - key: {{ $root.Values.sources.key }}
            path: sources.json
    {{- end }}
    {{- if $c.mountPrivacyHashKey }}
    - name: privacy-hash-key
      secret:
        secretName: {{ include "cdp.privacyHashKeySecretName" $root }}
        defaultMode: 0440
        items:
          - key: {{ $root.Values.privacyHashKey.key }}
            path: key
    {{- end }}
    {{- if $c.mountCrmConnections }}
    - name: crm-connections
      secret:
        secretName: {{ include "cdp.crmConnectionsSecretName" $root }}
        defaultMode: 0440
        items:
          - key: {{ $root.Values.crmConnections.key }}
            path: {{ $root.Values.crmConnections.key }}
    {{- end }}
    {{- if $root.Values.natsAuth.enabled }}
    {{- /* This component's NATS user only (secret-nats.yaml); re-read at every reconnect. */}}
    - name: nats-credentials
      secret:
        secretName: {{ include "cdp.natsSecretName" . }}
        defaultMode: 0440
        items:
          - key: credentials.json
            path: credentials.json
    {{- end }}
    {{- if $root.Values.natsAuth.tls.existingSecret }}
    - name: nats-tls
      secret:
        secretName: {{ $root.Values.natsAuth.tls.existingSecret }}
        defaultMode: 0440
        items:
          - key: ca.crt
            path: ca.crt
          {{- if $root.Values.natsAuth.tls.clientCertificate }}
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
          {{- end }}
    {{- end }}
    {{- if and $root.Values.serviceTokens.existingSecret $c.calls }}
    {{- /* Only this component's own token (the key named after it), never another's. */}}
    - name: peer-token
      secret:
        secretName: {{ $root.Values.serviceTokens.existingSecret }}
        defaultMode: 0440
        items:
          - key: {{ $name }}
            path: token
    {{- end }}
    {{- range $c.secretFiles }}
    {{- /* Every key a file, the whole directory mounted (no subPath): an updated Secret reaches the pod. */}}
    - name: secret-{{ .volume }}
      secret:
        secretName: {{ .secret }}
        defaultMode: 0440
        optional: {{ .optional | default false }}
    {{- end }}
{{- end -}}

{{- /*
Egress rules of one component's NetworkPolicy (networkPolicy.egress.enabled): DNS, NATS, the components
its `calls` name (and itself with callsSelf), its store, the API server (ownership: kubernetes), the OTLP
collector, and what networkPolicy.egress.extra.<name> / allowInternet add. A destination the chart cannot
derive and nobody gave fails the render, naming the value to set: a policy must not silently cut a
component off. Called with the component context (root, name, c).
*/ -}}
{{- define "cdp.egressRules" -}}
{{- $root := .root -}}
{{- $name := .name -}}
{{- $c := .c -}}
{{- $eg := $root.Values.networkPolicy.egress -}}
{{- $extra := get ($eg.extra | default dict) $name | default list -}}
{{- $internet := has $name ($eg.allowInternet | default list) -}}
{{- if and $c.networkPolicy.needsInternet (not $extra) (not $internet) -}}
{{- fail (printf "components.%s: networkPolicy.egress.enabled=true and %s calls APIs outside the cluster, but no egress was given for them: set networkPolicy.egress.extra.%s (NetworkPolicyEgressRule list, e.g. an ipBlock 0.0.0.0/0 except the cluster CIDRs) or list %s in networkPolicy.egress.allowInternet" $name $name $name $name) -}}
{{- end -}}
{{- if not $eg.dns -}}
{{- fail "networkPolicy.egress.enabled=true with networkPolicy.egress.dns empty: no pod could resolve a name. Set networkPolicy.egress.dns to the cluster DNS pods' peers" -}}
{{- end -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
  to:
    {{- toYaml $eg.dns | nindent 4 }}
{{- if $root.Values.nats.enabled }}
- ports:
    - port: {{ int (dig "config" "nats" "port" 4222 $root.Values.nats) }}
      protocol: TCP
  to:
    - podSelector:
        matchLabels:
          app.kubernetes.io/name: {{ default "nats" $root.Values.nats.nameOverride }}
          app.kubernetes.io/instance: {{ $root.Release.Name }}
{{- else }}
{{- if not $eg.natsTo -}}
{{- fail (printf "networkPolicy.egress.enabled=true with nats.enabled=false: set networkPolicy.egress.natsTo to the peers of the NATS at global.natsUrl (%s), e.g. [{ipBlock: {cidr: 10.0.5.0/24}}]" $root.Values.global.natsUrl) -}}
{{- end }}
{{- $natsHost := (urlParse (first (splitList "," $root.Values.global.natsUrl))).host }}
{{- $natsPort := $eg.natsPort | default (ternary (last (splitList ":" $natsHost)) "4222" (contains ":" $natsHost)) }}
- ports:
    - port: {{ int $natsPort }}
      protocol: TCP
  to:
    {{- toYaml $eg.natsTo | nindent 4 }}
{{- end }}
{{- $callees := $c.calls | default list }}
{{- if and $c.callsSelf (not (has $name $callees)) }}
{{- $callees = append $callees $name }}
{{- end }}
{{- if $callees }}
- ports:
    - port: grpc
      protocol: TCP
  to:
    {{- range $callees }}
    - podSelector:
        matchLabels:
          {{- include "cdp.selectorLabels" (dict "root" $root "name" .) | nindent 10 }}
    {{- end }}
{{- end }}
{{- if eq $c.store.kind "mongodb" }}
{{- if $root.Values.mongodb.enabled }}
- ports:
    - port: 27017
      protocol: TCP
  to:
    - podSelector:
        matchLabels:
          {{- include "cdp.selectorLabels" (dict "root" $root "name" "mongodb") | nindent 10 }}
{{- else if $eg.storeTo }}
- ports:
    - port: {{ int $eg.storePort }}
      protocol: TCP
  to:
    {{- toYaml $eg.storeTo | nindent 4 }}
{{- else }}
{{- fail (printf "components.%s: store.kind=mongodb on the MongoDB of global.mongodbUri with networkPolicy.egress.enabled=true: set networkPolicy.egress.storeTo to its peers (e.g. an ipBlock)" $name) }}
{{- end }}
{{- end }}
{{- if eq $c.ownership "kubernetes" }}
{{- if not $eg.apiServerTo }}
{{- fail (printf "components.%s: ownership=kubernetes takes Leases from the API server, and networkPolicy.egress.enabled=true: set networkPolicy.egress.apiServerTo to the API server's address, e.g. [{ipBlock: {cidr: 10.0.0.1/32}}] (kubectl get endpoints kubernetes)" $name) }}
{{- end }}
- ports:
    {{- range $eg.apiServerPorts }}
    - port: {{ int . }}
      protocol: TCP
    {{- end }}
  to:
    {{- toYaml $eg.apiServerTo | nindent 4 }}
{{- end }}
{{- with $root.Values.global.otlpEndpoint }}
{{- if not $eg.telemetryTo }}
{{- fail (printf "global.otlpEndpoint is set with networkPolicy.egress.enabled=true: set networkPolicy.egress.telemetryTo to the OTLP collector's peers") }}
{{- end }}
{{- $otlpHost := (urlParse .).host }}
- ports:
    - port: {{ int ($eg.telemetryPort | default (ternary (last (splitList ":" $otlpHost)) "4318" (contains ":" $otlpHost))) }}
      protocol: TCP
  to:
    {{- toYaml $eg.telemetryTo | nindent 4 }}
{{- end }}
{{- if $internet }}
- to:
    - ipBlock:
        cidr: 0.0.0.0/0
        {{- with $eg.clusterCIDRs }}
        except:
          {{- toYaml . | nindent 10 }}
        {{- end }}
{{- end }}
{{- with $extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}
