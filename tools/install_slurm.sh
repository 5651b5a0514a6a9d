#!/usr/bin/env bash
# Installs Debian's SLURM (slurm-wlm 22.05: slurmctld, slurmd, the client commands) and munge,
# for the launcher test that runs launch/slurm.sbatch under a real single-host SLURM
# (tests/launch/test_slurm.py; tests/helpers/slurm.py configures and starts the daemons).
# Needs root and apt-get; elsewhere it says why and does nothing (that test then skips).
set -uo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
    command -v munged >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "tools/install_slurm.sh: not root or no apt-get: SLURM not installed (its test skips)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
packages=(slurmctld slurmd slurm-client munge)
apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null 2>&1 ||
  { apt-get update -q >/dev/null 2>&1 &&
    apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null 2>&1; } ||
  echo "tools/install_slurm.sh: apt-get could not install ${packages[*]} (its test skips)" >&2
exit 0
