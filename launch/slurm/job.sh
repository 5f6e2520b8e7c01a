# Sourced by the job scripts (from the repository root): the environment, the MPI launcher that works in this
# allocation, and a run that survives the time limit and preemption. Needs bash; nothing here is site-specific.
#
#   cnnpar_setup                 venv, one compute thread per rank, Open MPI's run-as-root switch when root
#   cnnpar_pick_launcher TASKS   sets CNNPAR_LAUNCHER ("... {n} ..."), prints the one `cnnpar: launcher:` line,
#                                or prints one `cnnpar: error:` line and exits 1 within seconds
#   cnnpar_run CMD...            runs CMD; a SIGUSR1 from `--signal=B:USR1@...` is passed on so the trainer
#                                checkpoints, then the job requeues itself (CNNPAR_REQUEUE=0: it does not); a
#                                SIGTERM (preemption, scontrol requeue, scancel) is passed on as well
#
# Variables: CNNPAR_VENV (default .venv), CNNPAR_SRUN_MPI (srun's --mpi plugin, and no fallback to mpiexec;
# default: the plugin that matches the MPI mpi4py links, from `python -m cnnpar.launcher plugin`), CNNPAR_PREFLIGHT_S (default 30: how
# long the check step may take before the next launcher is tried), CNNPAR_REQUEUE.

cnnpar_setup() {
  # shellcheck disable=SC1091
  source "${CNNPAR_VENV:-.venv}/bin/activate"
  # One compute thread per rank (the trainer defaults to 1; keep it equal to --cpus-per-task).
  export NUMBA_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}" OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
  export PYTHONUNBUFFERED=1
  if [ "$(id -u)" -eq 0 ]; then
    # Containers and CI run jobs as root; Open MPI's mpirun refuses that unless told (MPICH ignores these).
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
}

# Launcher commands for N ranks, best first ({n} is replaced by the count).
_cnnpar_launchers() {
  local plugin="$1" srun_first="$2" srun="" exe mpiexec=""
  if [ -n "$plugin" ] && srun --mpi=list 2>&1 | grep -qw "$plugin"; then
    # --exact: a step gets exactly the CPUs it asks for, so a sweep's small runs do not spread over the node.
    srun="srun --mpi=$plugin --ntasks={n} --cpus-per-task=${SLURM_CPUS_PER_TASK:-1} --exact --kill-on-bad-exit=1"
  fi
  # The MPI's own launcher inside the allocation (it reads Slurm's node list): where srun cannot start this MPI.
  for exe in "$VIRTUAL_ENV/bin/mpiexec" "$(command -v mpiexec || true)" "$(command -v mpirun || true)"; do
    if [ -n "$exe" ] && [ -x "$exe" ]; then
      mpiexec="$exe -n {n}"
      break
    fi
  done
  if [ -n "${CNNPAR_SRUN_MPI:-}" ]; then
    printf '%s\n' "$srun"   # the plugin was chosen by hand: that or nothing
  elif [ "$srun_first" = 1 ]; then
    printf '%s\n' "$srun" "$mpiexec"
  else
    printf '%s\n' "$mpiexec" "$srun"
  fi
}

cnnpar_pick_launcher() {
  local tasks="$1" library plugin candidate started took output reason tried=""
  if ! library=$(python -m cnnpar.launcher library 2>&1); then
    echo "cnnpar: error: launcher: mpi4py cannot load an MPI library: $(echo "$library" | tail -1)"
    exit 1
  fi
  plugin="${CNNPAR_SRUN_MPI:-$(python -m cnnpar.launcher plugin)}"
  # After a requeue the job's steps are numbered from 0 again, and a step that reuses the number of the one
  # stopped before the requeue can find that step's leftovers: MPICH names its shared memory after the PMI
  # job step (JOB.STEP) and fails in MPI_Init (the mpich wheel: `UCX ERROR failed to unpack address`);
  # Slurm's pmix plugin binds a socket named after the step, still held by the old step's slurmstepd while it
  # cleans up (Open MPI: `Cannot bind() UNIX socket .../stepd.slurm.pmix.JOB.STEP: Address already in use`,
  # then `task 0 launch failed`). The MPI's own mpiexec names neither after the step, so a requeued job
  # starts with mpiexec.
  local srun_first=1 why=""
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && [ -z "${CNNPAR_SRUN_MPI:-}" ]; then
    srun_first=0 why=", mpiexec first after a requeue"
  fi
  while IFS= read -r candidate; do
    [ -n "$candidate" ] || continue
    started=$(date +%s.%N)
    # shellcheck disable=SC2086  # the launcher is words on purpose
    if output=$(timeout -k 5 "${CNNPAR_PREFLIGHT_S:-30}" ${candidate//\{n\}/$tasks} python -m cnnpar.launcher check 2>&1); then
      took=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
      CNNPAR_LAUNCHER="$candidate"
      echo "cnnpar: launcher: ${candidate//\{n\}/N} for $library; $tasks ranks started in ${took} s$why" \
           "(job ${SLURM_JOB_ID:-?}, restart ${SLURM_RESTART_COUNT:-0}, $(date '+%F %T'))"
      return 0
    fi
    # Its first error line says why (MPI's own, or the check's `cnnpar: error:`); else its last line.
    reason=$(echo "$output" | grep -iE -m1 'error|abort|fatal|refus|timed out' || echo "$output" | grep -v '^\s*$' | tail -1)
    [ -n "$reason" ] || reason="no answer within ${CNNPAR_PREFLIGHT_S:-30} s"
    tried="$tried${tried:+; }${candidate%% --ntasks*}: $(echo "$reason" | cut -c1-200)"
  done < <(_cnnpar_launchers "$plugin" "$srun_first")
  echo "cnnpar: error: launcher: no launcher could start $tasks ranks of $library" \
       "(${tried:-no srun plugin '$plugin' and no mpiexec}); see launch/slurm/README.md, \`srun --mpi=list\`"
  exit 1
}

_cnnpar_forward() {
  CNNPAR_SIGNALLED="$1"
  echo "cnnpar: job: SIG$1 from Slurm ($2): passing it on so the run checkpoints"
  [ -n "${_cnnpar_child:-}" ] && kill -"$1" "$_cnnpar_child" 2>/dev/null || true
}

cnnpar_run() {
  CNNPAR_SIGNALLED=""
  trap '_cnnpar_forward USR1 "the time limit is near"' USR1
  trap '_cnnpar_forward TERM "preemption, requeue or scancel: Slurm requeues the job itself when it means to"' TERM
  "$@" &
  _cnnpar_child=$!
  local rc=0
  # `wait` returns early when a trapped signal arrives: wait again until the run has really ended.
  while :; do
    wait "$_cnnpar_child" && rc=0 || rc=$?
    kill -0 "$_cnnpar_child" 2>/dev/null || break
  done
  trap - USR1 TERM
  if [ "$CNNPAR_SIGNALLED" = USR1 ] && [ "${CNNPAR_REQUEUE:-1}" != 0 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "cnnpar: job: run stopped with exit $rc after SIG$CNNPAR_SIGNALLED; requeueing job $SLURM_JOB_ID" \
         "(it resumes from the checkpoint)"
    # srun returns before its step's slurmstepd has cleaned up: let the step end before the job starts
    # again under the same step numbers (at most 30 s).
    local waited=0
    while [ "$waited" -lt 30 ] && squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null \
          | grep -qE "^$SLURM_JOB_ID\.[0-9]+$"; do
      sleep 1
      waited=$((waited + 1))
    done
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "cnnpar: job: requeue refused here; resubmit the same command to resume"
  fi
  return "$rc"
}
