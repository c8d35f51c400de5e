#!/usr/bin/env bash
# A throwaway single-node Slurm cluster for the tests (munged, slurmctld, slurmd), all
# state, logs and pids in DIR.
#
#   scripts/slurm.sh start DIR   # prints the path of its slurm.conf (SLURM_CONF)
#   scripts/slurm.sh stop DIR    # stops what start started
#
# Needs root and Debian's slurm-wlm and munge (.ci/run installs them). The node is
# this machine with its cores and 8000 MB; jobs are scheduled at once
# (batch_sched_delay=0) and a cancelled job's processes get KillWait=5 s after SIGTERM.
set -euo pipefail
cmd=${1:?usage: slurm.sh start|stop DIR}
S=${2:?usage: slurm.sh start|stop DIR}

stop_pidfile() {
  local f=$1
  [ -f "$f" ] || return 0
  local pid
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

case "$cmd" in
start)
  H=$(hostname -s)
  mkdir -p "$S"/{state,spool,log}
  chmod 755 "$S"
  cat >"$S/slurm.conf" <<CONF
ClusterName=stoa-test
SlurmctldHost=$H
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$S/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
KillWait=5
ReturnToService=2
MpiDefault=none
NodeName=$H CPUs=$(nproc) RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF=$S/slurm.conf
  install -d -o munge -g munge -m 0755 /run/munge
  # A munged that answers is shared; a stale socket is not one.
  if ! munge -n </dev/null >/dev/null 2>&1; then
    setsid /usr/sbin/runuser -u munge -- /usr/sbin/munged -F >"$S/log/munged.out" 2>&1 </dev/null &
    echo $! >"$S/munged.launcher.pid"
  fi
  for _ in $(seq 100); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.05; done
  setsid /usr/sbin/slurmctld -D -f "$S/slurm.conf" >"$S/log/slurmctld.out" 2>&1 </dev/null &
  echo $! >"$S/slurmctld.launcher.pid"
  setsid /usr/sbin/slurmd -D -f "$S/slurm.conf" >"$S/log/slurmd.out" 2>&1 </dev/null &
  echo $! >"$S/slurmd.launcher.pid"
  for _ in $(seq 200); do sinfo -h -o %T 2>/dev/null | grep -q idle && break; sleep 0.05; done
  if ! sinfo -h -o %T 2>/dev/null | grep -q idle; then
    echo "slurm.sh: the node did not come up; see $S/log" >&2
    exit 1
  fi
  echo "$S/slurm.conf"
  ;;
stop)
  export SLURM_CONF=$S/slurm.conf
  # Jobs first (their processes), then the daemons.
  scancel --full --quiet -u "$(id -un)" 2>/dev/null || true
  stop_pidfile "$S/slurmd.launcher.pid"
  stop_pidfile "$S/slurmctld.launcher.pid"
  if [ -f "$S/munged.launcher.pid" ]; then
    for p in $(ps -o pid= --ppid "$(cat "$S/munged.launcher.pid")" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    stop_pidfile "$S/munged.launcher.pid"
  fi
  ;;
*)
  echo "usage: slurm.sh start|stop DIR" >&2
  exit 2
  ;;
esac
