#!/usr/bin/env bash
# Start a local PostgreSQL server for the concurrency tests (Debian package), and
# print the URL for NICS_FIX_TEST_POSTGRES. Idempotent: safe to run twice.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h | grep -q "^${version} main"; then
  pg_createcluster "$version" main >&2
fi
pg_ctlcluster "$version" main start >&2 2>/dev/null || true
for _ in $(seq 1 30); do
  su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1 && break
  sleep 1
done
su postgres -c "psql -qAtc \"select 1 from pg_roles where rolname='nics_fix'\"" | grep -q 1 \
  || su postgres -c "psql -qc \"create role nics_fix login password 'nics_fix' createdb\"" >&2
# createrole: tests make a role with a password of their own, to look for it in what jobs record.
su postgres -c "psql -qc \"alter role nics_fix createrole\"" >&2
echo "postgresql+psycopg2://nics_fix:nics_fix@127.0.0.1:5432/postgres"
