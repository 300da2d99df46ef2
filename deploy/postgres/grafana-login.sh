#!/usr/bin/env bash
# Grafana's PostgreSQL login: a member of gradwatch_reader (SELECT on gradwatch's tables, from migration 0004),
# whose sessions are read-only as well. The postgres image runs this once, on its first start, from
# /docker-entrypoint-initdb.d; that is before `gradwatch db upgrade`, so it creates the group role too and the
# migration then grants it SELECT. Safe to run again, e.g. to change the password:
#   docker compose exec postgres /docker-entrypoint-initdb.d/10-grafana-login.sh
# Needs GRAFANA_DB_PASSWORD; GRAFANA_DB_USER (default gradwatch_grafana) and GRADWATCH_READER_ROLE (default
# gradwatch_reader) name the roles; psql connects as POSTGRES_USER to POSTGRES_DB (PG* variables work too).
set -euo pipefail
: "${GRAFANA_DB_PASSWORD:?set GRAFANA_DB_PASSWORD}"
export GRAFANA_DB_USER="${GRAFANA_DB_USER:-gradwatch_grafana}" GRADWATCH_READER_ROLE="${GRADWATCH_READER_ROLE:-gradwatch_reader}"

# The values are read with \getenv, not passed on the command line, so the password is never in argv; %I and %L
# quote the names and the password.
psql -X -q -v ON_ERROR_STOP=1 --no-password --username "${POSTGRES_USER:-postgres}" \
    --dbname "${POSTGRES_DB:-postgres}" <<'SQL'
\getenv login GRAFANA_DB_USER
\getenv password GRAFANA_DB_PASSWORD
\getenv reader GRADWATCH_READER_ROLE
SELECT format('CREATE ROLE %I NOLOGIN', :'reader')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'reader') \gexec
SELECT format('CREATE ROLE %I', :'login')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'login') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD %L',
              :'login', :'password') \gexec
SELECT format('ALTER ROLE %I SET default_transaction_read_only = on', :'login') \gexec
SELECT format('GRANT %I TO %I', :'reader', :'login') \gexec
SQL
echo "grafana-login: $GRAFANA_DB_USER can log in, reads through $GRADWATCH_READER_ROLE"
