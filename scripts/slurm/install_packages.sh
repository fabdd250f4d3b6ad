#!/usr/bin/env bash
# Install the Debian packages scripts/slurm/start.sh needs (Debian 12: Slurm 22.05, munge, MariaDB).
# Their post-install scripts try to start the system services; start.sh does not use those (it runs its
# own daemons under one directory), so a policy that blocks them, as in containers, does no harm.
set -euo pipefail
packages=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server-core mariadb-client-core)
installed=$(dpkg-query -W -f='${Status}\n' "${packages[@]}" 2>/dev/null | grep -c 'install ok installed' || true)
if [ "$installed" -ne "${#packages[@]}" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install_packages.sh: not root, cannot apt-get ${packages[*]}; the SLURM tests will be skipped" >&2
    exit 0
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi
echo "slurm packages installed: $(dpkg-query -W -f='${Package} ${Version}  ' "${packages[@]}")"
