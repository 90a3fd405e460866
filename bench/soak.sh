#!/bin/bash
# Soak test of `vdisk serve` (issue 14, part 4). Not a CI test: it runs for as long as
# it is told (30 minutes by default) and prints its figures.
#
# Phase 1 (SOAK_SECS): one `vdisk serve` of a qcow2 image, CLIENTS qemu-io clients
# over NBD, each on its own region of slots, issuing batches of mixed writes,
# verified reads (read -P), zero writes, discards and flushes; every slot's expected
# contents are tracked by its client and checked by every read. The server's RSS and
# open fds are sampled every SAMPLE_SECS. At the end the server is stopped, the
# image checked (qemu-img check) and every slot verified from the file.
#
# Phase 2 (CRASH_SECS): crash and restart: a client writes and flushes, the server is
# SIGKILLed a random 1-3 s after it started, restarted, and every write acknowledged
# by a successful flush before the kill must read back; qemu-img check after each
# round must find no corruption (leaks are allowed after a kill).
#
# Usage: bench/soak.sh [SOAK_SECS [CRASH_SECS]]
#   env: CLIENTS (8), SAMPLE_SECS (60), SLOTS (64 per client), VDISK (target/release/vdisk)
set -u
SOAK_SECS=${1:-1800}
CRASH_SECS=${2:-300}
CLIENTS=${CLIENTS:-8}
SAMPLE_SECS=${SAMPLE_SECS:-60}
SLOTS=${SLOTS:-64}
SLOT=65536              # bytes per slot; a client's region is SLOTS slots
here=$(cd "$(dirname "$0")/.." && pwd)
VDISK=${VDISK:-$here/target/release/vdisk}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; [ -n "${srv:-}" ] && kill -9 $srv 2>/dev/null; rm -rf "$work"' EXIT
img=$work/soak.qcow2
sock=$work/nbd.sock
size=$((CLIENTS * SLOTS * SLOT))
"$VDISK" create -q -f qcow2 "$img" $size || exit 1

start_server() {
    rm -f "$sock" "$work/pid"
    "$VDISK" serve -t --discard=unmap -f qcow2 -k "$sock" --pid-file "$work/pid" "$img" 2>>"$work/server.err" &
    srv=$!
    for _ in $(seq 200); do [ -f "$work/pid" ] && return 0; sleep 0.05; done
    echo "server did not start" >&2; exit 1
}
uri() { echo "nbd+unix:///?socket=$sock"; }

# One client: batches of 16 commands on its slots; the expected pattern of slot k is
# in pat[k] (0: zeroes). Counts go to $work/c$ID.{ops,err,bad}.
client() {
    local id=$1 end=$2 ops=0 err=0 bad=0
    local -a pat
    for ((k = 0; k < SLOTS; k++)); do pat[k]=0; done
    local base=$((id * SLOTS * SLOT))
    while [ "$(date +%s)" -lt "$end" ]; do
        local cmds=() n=0
        # The commands of a batch run in order: each read expects what the
        # commands before it left. Discarded slots read as zeroes (whole clusters,
        # no backing file, the server started with --discard=unmap).
        for ((j = 0; j < 16; j++)); do
            local k=$((RANDOM % SLOTS))
            local off=$((base + k * SLOT))
            case $((RANDOM % 10)) in
                0|1|2|3) local p=$((1 + RANDOM % 250)); cmds+=(-c "write -P $p $off $SLOT"); pat[k]=$p ;;
                4|5|6) cmds+=(-c "read -P ${pat[k]} $off $SLOT") ;;
                7) cmds+=(-c "write -z $off $SLOT"); pat[k]=0 ;;
                8) cmds+=(-c "discard $off $SLOT"); pat[k]=0 ;;
                9) cmds+=(-c "flush") ;;
            esac
            n=$((n + 1))
        done
        local out
        out=$(qemu-io -f raw "${cmds[@]}" "$(uri)" 2>&1)
        ops=$((ops + n))
        err=$((err + $(grep -v "Pattern verification" <<<"$out" | grep -c "failed\|can't open")))
        bad=$((bad + $(grep -c "Pattern verification failed" <<<"$out")))
    done
    for ((k = 0; k < SLOTS; k++)); do echo "$k ${pat[k]}"; done >"$work/c$id.pat"
    echo $ops >"$work/c$id.ops"; echo $err >"$work/c$id.err"; echo $bad >"$work/c$id.bad"
}

sample() {
    local rss fds
    rss=$(awk '/VmRSS/ {print $2}' /proc/$srv/status 2>/dev/null)
    fds=$(ls /proc/$srv/fd 2>/dev/null | wc -l)
    echo "$(( $(date +%s) - t0 ))s rss=${rss}kB fds=$fds load=$(cut -d' ' -f1-3 /proc/loadavg)"
}

echo "== phase 1: $CLIENTS clients, ${SOAK_SECS}s, image $((size >> 20)) MiB"
start_server
t0=$(date +%s)
end=$((t0 + SOAK_SECS))
for ((i = 0; i < CLIENTS; i++)); do client $i $end & done
sample
while [ "$(date +%s)" -lt "$end" ]; do
    sleep $(( SAMPLE_SECS < end - $(date +%s) ? SAMPLE_SECS : (end - $(date +%s) > 0 ? end - $(date +%s) : 1) ))
    sample
done
wait $(jobs -p | grep -v "^$srv$") 2>/dev/null
sample
kill -TERM $srv; wait $srv; srv_rc=$?; srv=
ops=0; errs=0; bad=0
for ((i = 0; i < CLIENTS; i++)); do
    ops=$((ops + $(cat $work/c$i.ops))); errs=$((errs + $(cat $work/c$i.err))); bad=$((bad + $(cat $work/c$i.bad)))
done
# Every slot from the file, after the server's clean exit.
final_bad=0
for ((i = 0; i < CLIENTS; i++)); do
    cmds=()
    while read -r k p; do cmds+=(-c "read -P $p $(( (i * SLOTS + k) * SLOT )) $SLOT"); done <"$work/c$i.pat"
    final_bad=$((final_bad + $(qemu-io -f qcow2 -r "${cmds[@]}" "$img" 2>&1 | grep -c "failed")))
done
check=$(qemu-img check "$img" 2>&1 | head -1)
echo "phase 1: ops=$ops errors=$errs verify_failures=$bad final_verify_failures=$final_bad server_exit=$srv_rc check: $check"

echo "== phase 2: crash and restart, ${CRASH_SECS}s"
t0=$(date +%s); end=$((t0 + CRASH_SECS)); rounds=0; lost=0; corrupt=0; cops=0
declare -A flushed
while [ "$(date +%s)" -lt "$end" ]; do
    start_server
    ( sleep "1.$((RANDOM % 10))"; sleep $((RANDOM % 2)); kill -9 $srv 2>/dev/null ) &
    killer=$!
    # Write and flush in small batches until the server dies; remember what a
    # successful flush covered.
    while kill -0 $srv 2>/dev/null; do
        declare -A batch=()
        cmds=()
        for ((j = 0; j < 8; j++)); do
            k=$((RANDOM % (CLIENTS * SLOTS))); p=$((1 + RANDOM % 250))
            cmds+=(-c "write -P $p $((k * SLOT)) $SLOT"); batch[$k]=$p
        done
        cmds+=(-c flush)
        out=$(qemu-io -f raw "${cmds[@]}" "$(uri)" 2>&1) || true
        cops=$((cops + 9))
        if ! grep -q "failed\|can't open\|Connection\|error" <<<"$out" && \
           [ "$(grep -c '^wrote' <<<"$out")" -eq 8 ]; then
            for k in "${!batch[@]}"; do flushed[$k]=${batch[$k]}; done
        else
            # Not flushed: these slots may hold the old or any new pattern.
            for k in "${!batch[@]}"; do unset "flushed[$k]"; done
        fi
        unset batch
    done
    { wait $killer; wait $srv; } 2>/dev/null; srv=
    rounds=$((rounds + 1))
    if qemu-img check "$img" 2>&1 | grep -q "ERROR\|corrupt"; then corrupt=$((corrupt + 1)); fi
    cmds=()
    for k in "${!flushed[@]}"; do cmds+=(-c "read -P ${flushed[$k]} $((k * SLOT)) $SLOT"); done
    if [ ${#cmds[@]} -gt 0 ]; then
        lost=$((lost + $(qemu-io -f qcow2 -r "${cmds[@]}" "$img" 2>&1 | grep -c "failed")))
    fi
done
echo "phase 2: rounds=$rounds ops=$cops flushed_slots=${#flushed[@]} lost_flushed_writes=$lost corrupt_checks=$corrupt"
[ -s "$work/server.err" ] && { echo "server stderr (last lines):"; tail -5 "$work/server.err"; }
[ "$errs" -eq 0 ] && [ "$bad" -eq 0 ] && [ "$final_bad" -eq 0 ] && [ "$lost" -eq 0 ] && [ "$corrupt" -eq 0 ]
