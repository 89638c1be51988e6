{{/* Chart name. */}}
{{- define "postcode-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: prefix of every resource name. Kept short enough for suffixes. */}}
{{- define "postcode-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "postcode-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; `component` distinguishes operator / postgresql / cleanup. */}}
{{- define "postcode-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "postcode-operator.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Common labels. Call with (dict "ctx" $ "component" "operator"). */}}
{{- define "postcode-operator.labels" -}}
helm.sh/chart: {{ include "postcode-operator.chart" .ctx }}
{{ include "postcode-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: postcode-operator
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "postcode-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "postcode-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Jobs' ServiceAccount (same name in every job namespace). */}}
{{- define "postcode-operator.jobServiceAccountName" -}}
{{- default (printf "%s-job" (include "postcode-operator.fullname" .)) .Values.jobs.serviceAccount.name }}
{{- end }}

{{/* Namespaces that get the Jobs' ServiceAccount + RBAC, one per line, unique. */}}
{{- define "postcode-operator.jobNamespaces" -}}
{{- $nss := list .Release.Namespace }}
{{- with .Values.watchNamespace }}{{ $nss = append $nss . }}{{ end }}
{{- range .Values.jobNamespaces }}{{ $nss = append $nss . }}{{ end }}
{{- range uniq $nss }}
{{ . }}
{{- end }}
{{- end }}

{{/* image reference: (dict "repository" "tag" "digest" "default") */}}
{{- define "postcode-operator.imageRef" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository (toString (default .default .tag)) }}
{{- end }}
{{- end }}

{{- define "postcode-operator.image" -}}
{{- include "postcode-operator.imageRef" (dict "repository" .Values.image.repository "tag" .Values.image.tag "digest" .Values.image.digest "default" .Chart.AppVersion) }}
{{- end }}

{{/* Image of the reader/enricher Jobs: `jobs.image`, falling back to `image`. */}}
{{- define "postcode-operator.jobImage" -}}
{{- if or .Values.jobs.image.repository .Values.jobs.image.tag }}
{{- $repo := default .Values.image.repository .Values.jobs.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.jobs.image.tag }}
{{- include "postcode-operator.imageRef" (dict "repository" $repo "tag" $tag "digest" "" "default" .Chart.AppVersion) }}
{{- else }}
{{- include "postcode-operator.image" . }}
{{- end }}
{{- end }}

{{/*
Secret holding DATABASE_URL: the user's existing one, or <fullname>-database
(created by the chart from database.url or for the bundled PostgreSQL, or
expected to be created by the user).
*/}}
{{- define "postcode-operator.databaseSecretName" -}}
{{- default (printf "%s-database" (include "postcode-operator.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{/* Whether the chart creates the database Secret. */}}
{{- define "postcode-operator.createDatabaseSecret" -}}
{{- if and (not .Values.database.existingSecret) (or .Values.database.url .Values.postgresql.enabled) }}true{{ end }}
{{- end }}

{{/* Whether UPLOAD_TOKEN is set at all. */}}
{{/* "true" when the upload API uses the shared token (upload.auth.mode=token). */}}
{{- define "postcode-operator.uploadAuth" -}}
{{- if eq .Values.upload.auth.mode "token" }}true{{ end }}
{{- end }}

{{- define "postcode-operator.uploadSecretName" -}}
{{- default (printf "%s-upload-auth" (include "postcode-operator.fullname" .)) .Values.upload.auth.existingSecret }}
{{- end }}

{{- define "postcode-operator.postgresqlName" -}}
{{- printf "%s-postgresql" (include "postcode-operator.fullname" .) }}
{{- end }}

{{- define "postcode-operator.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicas) 1) }}true{{ else }}false{{ end }}
{{- end }}

{{/* Checks of value combinations that cannot work. */}}
{{- define "postcode-operator.validate" -}}
{{- if and .Values.postgresql.enabled (or .Values.database.url .Values.database.existingSecret) }}
{{- fail "postgresql.enabled=true points DATABASE_URL at the bundled PostgreSQL: leave database.url and database.existingSecret empty" }}
{{- end }}
{{- if and .Values.postgresql.enabled (eq .Values.database.secretKey "password") }}
{{- fail "database.secretKey must not be \"password\" with postgresql.enabled=true (that key holds the PostgreSQL password)" }}
{{- end }}
{{- if and .Values.database.url .Values.database.existingSecret }}
{{- fail "set only one of database.url and database.existingSecret" }}
{{- end }}
{{- if and .Values.database.tls.caSecret (not (has .Values.database.tls.sslmode (list "require" "verify-ca" "verify-full"))) }}
{{- fail "database.tls.sslmode must be require, verify-ca or verify-full (a CA with a weaker mode would allow plaintext)" }}
{{- end }}
{{- if and .Values.upload.auth.token .Values.upload.auth.existingSecret }}
{{- fail "set only one of upload.auth.token and upload.auth.existingSecret" }}
{{- end }}
{{- $mode := .Values.upload.auth.mode }}
{{- if not (has $mode (list "kubernetes" "token" "none")) }}
{{- fail (printf "upload.auth.mode %q: use kubernetes (the default: Kubernetes tokens and RBAC), token (one shared token) or none" $mode) }}
{{- end }}
{{- if and (eq $mode "token") (not (or .Values.upload.auth.token .Values.upload.auth.existingSecret)) }}
{{- fail "upload.auth.mode=token needs upload.auth.token or upload.auth.existingSecret" }}
{{- end }}
{{- if and (ne $mode "token") (or .Values.upload.auth.token .Values.upload.auth.existingSecret) }}
{{- fail (printf "upload.auth.token/existingSecret are only used with upload.auth.mode=token (the mode is %s): set the mode, or remove the token" $mode) }}
{{- end }}
{{- if and (eq $mode "none") (ne .Values.service.type "ClusterIP") }}
{{- fail (printf "upload.auth.mode=none lets anyone who reaches the upload API create imports: it needs service.type=ClusterIP, not %s" .Values.service.type) }}
{{- end }}
{{- end }}

{{/* PGSSLROOTCERT/PGSSLMODE of the operator when database.tls.caSecret is set (deployment.yaml mounts it). */}}
{{- define "postcode-operator.databaseTlsEnv" -}}
{{- if .Values.database.tls.caSecret }}
- name: PGSSLROOTCERT
  value: /etc/postcode-operator/database-ca/ca.crt
- name: PGSSLMODE
  value: {{ .Values.database.tls.sslmode | quote }}
{{- end }}
{{- end }}
