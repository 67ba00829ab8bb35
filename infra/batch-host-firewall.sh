#!/bin/bash
# s3spot: on each AWS Batch host, at boot (the compute environment's launch template runs it).
#
# Batch runs ECS jobs in the host's network, so a job's command, which runs as a uid of 1000 or
# more (`nobody` by default), would otherwise reach what holds credentials: the instance metadata
# service (the host's role), the ECS credentials endpoint (169.254.170.2, which the ECS agent
# forwards to 127.0.0.1:51679) and the agent's own API (127.0.0.1:51678). These rules reject
# those packets for every uid from 1000 up; root (the worker, the agent) keeps them. The worker
# checks, as the command's user, that the block holds before it runs the command.
set -euo pipefail
users=1000-4294967294
if command -v nft >/dev/null 2>&1; then
  nft -f - <<RULES
table inet s3spot
delete table inet s3spot
table inet s3spot {
  chain output {
    type filter hook output priority filter; policy accept;
    meta skuid $users ip daddr { 169.254.169.254, 169.254.170.2 } reject
    meta skuid $users ip6 daddr fd00:ec2::254 reject
    meta skuid $users ip daddr 127.0.0.1 tcp dport 51678-51679 reject
  }
}
RULES
  echo "s3spot: nftables keeps uids $users from the metadata service and the ECS agent"
else
  for address in 169.254.169.254 169.254.170.2; do
    iptables -I OUTPUT -m owner --uid-owner "$users" -d "$address" -j REJECT
  done
  iptables -I OUTPUT -m owner --uid-owner "$users" -d 127.0.0.1 -p tcp --dport 51678:51679 -j REJECT
  ip6tables -I OUTPUT -m owner --uid-owner "$users" -d fd00:ec2::254 -j REJECT ||
    echo "s3spot: ip6tables could not block the IPv6 metadata address; IPv4 is blocked"
  echo "s3spot: iptables keeps uids $users from the metadata service and the ECS agent"
fi
