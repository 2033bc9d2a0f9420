#!/bin/sh
# The official image's configuration contract: KAFKA_FOO_BAR=value → foo.bar=value; storage formatted once.
set -eu
conf=/tmp/server.properties
env | sed -n 's/^KAFKA_\([A-Z0-9_]*\)=\(.*\)$/\1 \2/p' | while read -r name value; do
  printf '%s=%s\n' "$(printf '%s' "$name" | tr 'A-Z_' 'a-z.')" "$value"
done > "$conf"
grep -q '^log\.dirs=' "$conf" || echo "log.dirs=/tmp/kraft-combined-logs" >> "$conf"
java -cp '/opt/kafka/libs/*' kafka.tools.StorageTool format --ignore-formatted \
  -t "${CLUSTER_ID:-5L6g3nShT-eMCtK--X86sw}" -c "$conf"
exec java -Xms64m -Xmx512m -XX:+UseSerialGC -cp '/opt/kafka/libs/*' kafka.Kafka "$conf"
