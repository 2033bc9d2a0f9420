#!/bin/sh
# Health check at the official image's path: succeeds once the broker answers an admin request
# (usage as the official script: --bootstrap-server HOST:PORT).
exec java -Xmx64m -XX:TieredStopAtLevel=1 -cp '/opt/kafka/libs/*:/opt/kafka/check' ApiVersionsCheck "$@"
