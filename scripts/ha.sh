# shellcheck shell=bash
# The HA stores of `make up-ha` (scripts/up.sh --ha), sourced by scripts/up.sh: PostgreSQL as a
# Patroni cluster and Redis under Sentinel, all on 127.0.0.1, data and configuration in
# $run/ha/. Failover is Patroni's and Sentinel's; the mesh only follows it (multi-host
# PostgreSQL URLs with target_session_attrs=read-write, the features service asking the
# Sentinels for the master).
#
#   etcd         one member (Patroni's consensus store): client MESH_ETCD_PORT (52379),
#                peer the next port
#   patroni-1/2  a primary and a synchronous streaming standby: PostgreSQL on MESH_PG_PORT
#                (55432) and the next port, Patroni's REST API on MESH_PATRONI_PORT (58008) and
#                the next port
#   redis-1/2    a master (MESH_REDIS_PORT, 56379) and a replica (the next port), no persistence
#   sentinel-1/2/3  Sentinels on MESH_SENTINEL_PORT (56390) and the next two, quorum 2
#
# Patroni timings (chosen for failover in well under 15 s; the README has the measured times):
#   ttl 10 s: the leader key's lease; a primary whose Patroni dies is replaced after at most this.
#   loop_wait 1 s: how often each Patroni checks its PostgreSQL; a crashed primary is noticed
#     within it.
#   retry_timeout 3 s: how long etcd or PostgreSQL may fail before Patroni gives up a cycle
#     (ttl >= loop_wait + 2 * retry_timeout, as Patroni requires).
#   primary_start_timeout 0: a primary whose PostgreSQL crashed fails over at once instead of
#     being restarted in place (with 300, the default, a kill -9 means minutes of crash recovery
#     on the same node).
#   synchronous_mode: a commit is acknowledged only once the standby has it, so a failover loses
#     no acknowledged write (the logger's delivered records among them). With the standby down,
#     Patroni lets the primary commit alone (synchronous_mode_strict is off).
# Sentinel: down-after-milliseconds 1000, failover-timeout 5000.

ha_etcd_port="${MESH_ETCD_PORT:-52379}"
ha_patroni_port="${MESH_PATRONI_PORT:-58008}"
ha_sentinel_port="${MESH_SENTINEL_PORT:-56390}"
ha_dir="$run/ha"
# What the HA mode supervises in place of `postgres redis`, in start order.
ha_names=(etcd patroni-1 patroni-2 redis-1 redis-2 sentinel-1 sentinel-2 sentinel-3)

# Every port the HA stores take (for up.sh's "already in use" check).
ha_ports() {
  echo "$ha_etcd_port" $((ha_etcd_port + 1)) "$pg_port" $((pg_port + 1)) \
    "$ha_patroni_port" $((ha_patroni_port + 1)) "$redis_port" $((redis_port + 1)) \
    "$ha_sentinel_port" $((ha_sentinel_port + 1)) $((ha_sentinel_port + 2))
}

# The services' connection settings: every PostgreSQL member, writes only on the primary.
ha_export_urls() {
  export MESH_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port,127.0.0.1:$((pg_port + 1))/postgres?target_session_attrs=read-write"
  export MESH_REGISTRY_DATABASE_URL="$MESH_DATABASE_URL"
  export MESH_REDIS_SENTINELS="127.0.0.1:$ha_sentinel_port,127.0.0.1:$((ha_sentinel_port + 1)),127.0.0.1:$((ha_sentinel_port + 2))"
  export MESH_REDIS_MASTER_NAME=mesh
}

# Patroni's configuration for member $1 (1 or 2).
ha_patroni_yml() {
  local n=$1 dir="$ha_dir/pg-$1"
  local pg=$((pg_port + n - 1)) rest=$((ha_patroni_port + n - 1))
  cat <<YML
# Written by scripts/ha.sh on every start; see its header for the timings.
scope: mesh
namespace: /mesh/
name: pg-$n
log: {level: INFO}
restapi: {listen: "127.0.0.1:$rest", connect_address: "127.0.0.1:$rest"}
etcd3: {hosts: "127.0.0.1:$ha_etcd_port"}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 3
    primary_start_timeout: 0
    synchronous_mode: true
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters: {wal_log_hints: "on", max_wal_senders: 5, max_replication_slots: 5, hot_standby: "on", max_connections: 200}
  initdb: [{encoding: UTF8}, {username: postgres}, {auth: trust}]
postgresql:
  listen: "127.0.0.1:$pg"
  connect_address: "127.0.0.1:$pg"
  data_dir: "$dir/data"
  bin_dir: "$MESH_PG_BIN"
  pgpass: "$dir/pgpass"
  pg_hba: ["local all all trust", "host all all 127.0.0.1/32 trust", "host replication all 127.0.0.1/32 trust"]
  authentication:
    superuser: {username: postgres}
    replication: {username: postgres}
    rewind: {username: postgres}
  parameters: {unix_socket_directories: "$dir"}
YML
}

# Sentinel's configuration for Sentinel $1 (Sentinel rewrites it while it runs).
ha_sentinel_conf() {
  cat <<CONF
port $((ha_sentinel_port + $1 - 1))
bind 127.0.0.1
dir $ha_dir
sentinel monitor mesh 127.0.0.1 $redis_port 2
sentinel down-after-milliseconds mesh 1000
sentinel failover-timeout mesh 5000
sentinel parallel-syncs mesh 1
CONF
}

# Writes every configuration (fresh each start; the data directories are kept).
ha_prepare() {
  local n
  mkdir -p "$ha_dir/etcd"
  for n in 1 2; do
    mkdir -p "$ha_dir/pg-$n"
    ha_patroni_yml "$n" >"$ha_dir/patroni-$n.yml"
    if [ "$(id -u)" -eq 0 ]; then
      chown postgres:postgres "$ha_dir/pg-$n" "$ha_dir/patroni-$n.yml"
    fi
    chmod 700 "$ha_dir/pg-$n"
  done
  for n in 1 2 3; do ha_sentinel_conf "$n" >"$ha_dir/sentinel-$n.conf"; done
}

# Starts store $1 in the background (its own session: Ctrl-C reaches the services, not the
# stores, which up.sh stops once the services have drained), output to $2.
ha_launch() {
  local name=$1 log=$2 n
  case $name in
    etcd)
      setsid etcd --name mesh-etcd --data-dir "$ha_dir/etcd" \
        --listen-client-urls "http://127.0.0.1:$ha_etcd_port" \
        --advertise-client-urls "http://127.0.0.1:$ha_etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$((ha_etcd_port + 1))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((ha_etcd_port + 1))" \
        --initial-cluster "mesh-etcd=http://127.0.0.1:$((ha_etcd_port + 1))" >>"$log" 2>&1 &
      ;;
    patroni-*)
      n=${name#patroni-}
      # From a directory the postgres user can enter; exec keeps $! the PID of patroni itself.
      (cd "$ha_dir" && exec setsid "${pg_run[@]}" patroni "$ha_dir/patroni-$n.yml") >>"$log" 2>&1 &
      ;;
    redis-1)
      setsid redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$ha_dir" --dbfilename redis-1.rdb >>"$log" 2>&1 &
      ;;
    redis-2)
      # A replica keeps the snapshot it synced from in --dir.
      setsid redis-server --port $((redis_port + 1)) --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$ha_dir" --dbfilename redis-2.rdb --replicaof 127.0.0.1 "$redis_port" >>"$log" 2>&1 &
      ;;
    sentinel-*)
      n=${name#sentinel-}
      setsid redis-sentinel "$ha_dir/sentinel-$n.conf" >>"$log" 2>&1 &
      ;;
  esac
}

# Waits (at most 90 s) until a primary accepts writes through the multi-host URL and the
# Sentinels know the master.
ha_wait_ready() {
  local i
  for i in $(seq 1 900); do
    "$MESH_PG_BIN/psql" -q "$MESH_DATABASE_URL" -Atc 'SELECT 1' >/dev/null 2>&1 && break
    sleep 0.1
  done
  if ! "$MESH_PG_BIN/psql" -q "$MESH_DATABASE_URL" -Atc 'SELECT 1' >/dev/null 2>&1; then
    say "no Patroni primary within 90 s; see $(show "$logs")/patroni-1.log, patroni-2.log, etcd.log"
    return 1
  fi
  for i in $(seq 1 100); do
    redis-cli -p "$ha_sentinel_port" sentinel get-master-addr-by-name mesh 2>/dev/null | grep -q . && return 0
    sleep 0.1
  done
  say "the Sentinels name no Redis master; see $(show "$logs")/sentinel-1.log"
  return 1
}

# One line on where the HA stores are, for up.sh's banner.
ha_describe() {
  local leader
  leader=$("$MESH_PG_BIN/psql" -q "$MESH_DATABASE_URL" -Atc 'SELECT inet_server_port()' 2>/dev/null || echo '?')
  say "PostgreSQL (Patroni): primary on 127.0.0.1:$leader, members $pg_port and $((pg_port + 1)), REST $ha_patroni_port/$((ha_patroni_port + 1)); Redis master 127.0.0.1:$redis_port, replica $((redis_port + 1)), Sentinels $ha_sentinel_port-$((ha_sentinel_port + 2))"
}
